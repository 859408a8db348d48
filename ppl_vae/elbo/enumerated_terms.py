"""Per-datapoint ELBO terms of a pair whose guide has discrete sites, summed out exactly.

For a guide q(d, c | x) with discrete sites d (enumerated) and continuous sites c (one draw
per value of d), each site's term is weighted by q(d | x) and summed over d:

    reconstruction_i = sum_d q(d | x_i) log p(x_i | d, c_d),
    KL_i = sum_d q(d | x_i) [log q(d, c_d | x_i) - log p(d, c_d)],

an unbiased estimate of each datapoint's ELBO whose only noise is that of c (none when the
guide is all discrete). The enumeration is Pyro's (``poutine.enum`` over the guide marked by
``config_enumerate``, the model replayed against it); the weights are the guide's own
probabilities. This is the per-datapoint counterpart of ``TraceEnum_ELBO``'s total, which
validation and evaluation need for standard errors over datapoints.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine
from pyro.infer import config_enumerate

from ppl_vae.elbo.ledger import TermKind, _analytic_kl, kept_dims, sampled_site_terms
from ppl_vae.elbo.pair import PairStructure, inspect_pair, sum_except
from ppl_vae.errors import NotEnumerableError

__all__ = ["enumerated_site_terms", "site_terms"]


def site_terms(
    model: Callable,
    guide: Callable,
    *args,
    keep_plates: tuple[str, ...] = (),
    analytic_kl: bool = True,
    structure: PairStructure | None = None,
    **kwargs,
) -> dict[str, tuple[TermKind, str, torch.Tensor]]:
    """One draw of every site's term, ``{site: (kind, method, (1, *kept plate sizes))}``:
    discrete guide sites summed out (:func:`enumerated_site_terms`) when there are any, else
    :func:`~ppl_vae.elbo.ledger.sampled_site_terms` with one particle."""
    if structure is None:
        structure = inspect_pair(model, guide, args, kwargs)
    if structure.enumerable_latent:
        return enumerated_site_terms(
            model,
            guide,
            *args,
            keep_plates=keep_plates,
            analytic_kl=analytic_kl,
            structure=structure,
            **kwargs,
        )
    return sampled_site_terms(
        model,
        guide,
        *args,
        num_particles=1,
        analytic_kl=analytic_kl,
        keep_plates=keep_plates,
        structure=structure,
        **kwargs,
    )


def enumerated_site_terms(
    model: Callable,
    guide: Callable,
    *args,
    keep_plates: tuple[str, ...] = (),
    analytic_kl: bool = True,
    structure: PairStructure | None = None,
    **kwargs,
) -> dict[str, tuple[TermKind, str, torch.Tensor]]:
    """Each site's term with the guide's discrete sites summed out, continuous ones drawn once
    per discrete value: ``{site: (kind, method, tensor)}``, tensors of shape
    ``(1, *sizes of keep_plates)`` (the layout of ``sampled_site_terms``), summed over the
    other plates. Terms carry the pair's scales; the weights q(d | x) do not.

    :raises NotEnumerableError: when the model has discrete latent sites the guide leaves out
        (their sum belongs to the model's marginal, not to a per-site term).
    """
    if structure is None:
        structure = inspect_pair(model, guide, args, kwargs)
    if structure.model_enumerated:
        names = [s.name for s in structure.model_enumerated]
        raise NotEnumerableError(
            f"per-datapoint terms need every discrete latent site in the guide; the model sums "
            f"out {names} itself: use elbo_ledger for the total"
        )
    nesting = structure.max_plate_nesting
    enumerated = {s.name for s in structure.enumerable_latent}
    guide_enum = poutine.enum(config_enumerate(guide, "parallel"), first_available_dim=-1 - nesting)
    guide_trace = poutine.trace(guide_enum).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    # q(d | x) of the enumerated values: a tensor broadcasting over the enum dims (1 when this
    # call's batch holds no discrete site, e.g. M2 with every row labelled).
    weight: torch.Tensor | float = 1.0
    for name in enumerated & set(guide_trace.nodes):
        weight = weight * guide_trace.nodes[name]["unscaled_log_prob"].exp()

    rank = nesting + 1
    keep = kept_dims(structure, keep_plates)

    def expect(term: torch.Tensor) -> torch.Tensor:
        """sum_d q(d | x) term(d), then summed over the plates not kept."""
        weighted = weight * term
        if weighted.dim() > nesting:  # the enum dims, left of the plates
            weighted = weighted.reshape(-1, *weighted.shape[weighted.dim() - nesting :]).sum(0)
        kept = sum_except(weighted.unsqueeze(0) if nesting else weighted.reshape(1), keep, rank)
        return kept.reshape(1, *(kept.shape[d] for d in sorted(keep[1:])))

    out: dict[str, tuple[TermKind, str, torch.Tensor]] = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            out[name] = ("reconstruction", "enumerated", expect(site["log_prob"]))
            continue
        guide_site = guide_trace.nodes[name]
        if name in enumerated:
            out[name] = ("kl", "exact", expect(guide_site["log_prob"] - site["log_prob"]))
            continue
        kl = _analytic_kl(guide_site, site) if analytic_kl else None
        if kl is None:
            out[name] = ("kl", "sampled", expect(guide_site["log_prob"] - site["log_prob"]))
        else:
            out[name] = ("kl", "analytic", expect(kl))
    return out
