"""The ELBO of a model/guide pair, broken into one term per site.

ELBO = sum_obs E_q[log p(x | ...)] - sum_latent E_q[log q(z | ...) - log p(z | ...)]:
a reconstruction term for each observed site and a KL term for each latent site (for sites
that depend on others, the KL term is the expected conditional KL, and the terms add up to
KL(q(z | x) || p(z))). Terms are exact when every latent site of the guide is discrete and
enumerable (Pyro's ``TraceEnum_ELBO`` machinery weights each term by q), and estimated with N
vectorised particles otherwise (mean and standard error; analytic KL where
``torch.distributions.kl_divergence`` knows the pair of distributions).

Terms carry whatever ``poutine.scale`` the pair applies: a beta on the latent sites scales the
KL terms, so call the pair with beta = 1 for the true ELBO.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.infer.traceenum_elbo import _find_ordinal
from pyro.infer.util import Dice

from ppl_vae.pair import PairStructure, inspect_pair, sum_except, vectorized_traces

__all__ = ["Ledger", "SiteTerm", "elbo_ledger", "sampled_site_terms"]

TermKind = Literal["reconstruction", "kl"]


@dataclass(frozen=True)
class SiteTerm:
    """One site's share of the ELBO, in nats (totals over the data passed).

    ``value`` is E_q[log p(x | ...)] for a ``"reconstruction"`` term and
    E_q[log q(z | ...) - log p(z | ...)] for a ``"kl"`` term; ``stderr`` is 0 when exact.
    """

    site: str
    kind: TermKind
    value: float
    stderr: float
    method: str  # "exact", "analytic" (closed-form KL, sampled parents) or "sampled"


@dataclass(frozen=True)
class Ledger:
    """The ELBO and its per-site terms: ELBO = reconstruction - kl (nats, totals over data)."""

    terms: tuple[SiteTerm, ...]
    elbo: float
    elbo_stderr: float
    exact: bool
    num_particles: int  # 0 when exact

    @property
    def reconstruction(self) -> float:
        """Sum of the reconstruction terms, E_q[log p(x | z)] (= -distortion)."""
        return sum(t.value for t in self.terms if t.kind == "reconstruction")

    @property
    def kl(self) -> float:
        """Sum of the KL terms, KL(q(z | x) || p(z)) (= rate)."""
        return sum(t.value for t in self.terms if t.kind == "kl")

    def term(self, site: str) -> SiteTerm:
        """The term of the named site."""
        for term in self.terms:
            if term.site == site:
                return term
        raise KeyError(f"no site '{site}' in this ledger; sites: {[t.site for t in self.terms]}")

    def __str__(self) -> str:
        how = "exact, by enumeration" if self.exact else f"sampled, {self.num_particles} particles"
        lines = [f"ELBO ledger ({how}), nats", f"  {'site':<12} {'term':<26} {'value':>10}  ± s.e."]
        for t in self.terms:
            label = "E_q[log p(x|.)]" if t.kind == "reconstruction" else "KL(q || p)"
            label += f" [{t.method}]"
            lines.append(f"  {t.site:<12} {label:<26} {t.value:>10.4f}  {_se(t.stderr)}")
        lines.append(f"  {'':<12} {'reconstruction':<26} {self.reconstruction:>10.4f}")
        lines.append(f"  {'':<12} {'KL':<26} {self.kl:>10.4f}")
        lines.append(
            f"  {'':<12} {'ELBO = recon - KL':<26} {self.elbo:>10.4f}  {_se(self.elbo_stderr)}"
        )
        return "\n".join(lines)


def _se(stderr: float) -> str:
    return "exact" if stderr == 0 else f"{stderr:.4f}"


def elbo_ledger(
    model: Callable,
    guide: Callable,
    *args,
    exact: bool | None = None,
    num_particles: int = 1000,
    analytic_kl: bool = True,
    **kwargs,
) -> Ledger:
    """The ELBO of ``(model, guide)`` on ``args``, term by term.

    :param exact: ``True`` demands enumeration (raising :class:`NotEnumerableError` when a
        latent site cannot be enumerated), ``False`` demands sampling, ``None`` picks exact
        whenever possible.
    :param num_particles: vectorised particles for the sampled estimate.
    :param analytic_kl: use closed-form KL terms where ``kl_divergence`` has the pair.
    """
    structure = inspect_pair(model, guide, args, kwargs)
    if exact is None:
        exact = structure.enumerable
    if exact:
        structure.require_enumerable("an exact ELBO")
        return _exact_ledger(model, guide, args, kwargs, structure)
    return _sampled_ledger(model, guide, args, kwargs, structure, num_particles, analytic_kl)


def _exact_ledger(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, structure: PairStructure
) -> Ledger:
    # TraceEnum_ELBO builds the enumerated, packed traces; Dice weights each site's cost by the
    # guide's enumerated probabilities, which is exactly how TraceEnum_ELBO sums its own loss.
    enum_elbo = TraceEnum_ELBO(max_plate_nesting=structure.max_plate_nesting)
    values: dict[str, float] = {}
    with torch.no_grad():
        for model_trace, guide_trace in enum_elbo._get_traces(
            model, config_enumerate(guide, "parallel"), args, kwargs
        ):
            ordering = {
                name: _find_ordinal(trace, site)
                for trace in (model_trace, guide_trace)
                for name, site in trace.nodes.items()
                if site["type"] == "sample"
            }
            dice = Dice(guide_trace, ordering)

            def expect(cost: torch.Tensor, ordinal: frozenset, dice: Dice = dice) -> float:
                """E_q[cost], q the enumerated guide (the weighting TraceEnum_ELBO uses)."""
                return float(dice.compute_expectation({ordinal: [cost]}))

            for name, site in model_trace.nodes.items():
                if site["type"] != "sample":
                    continue
                log_p = site["packed"]["log_prob"]
                if site["is_observed"]:
                    value = expect(log_p, ordering[name])
                else:
                    log_q = guide_trace.nodes[name]["packed"]["log_prob"]
                    value = expect(log_q, ordering[name]) - expect(log_p, ordering[name])
                values[name] = values.get(name, 0.0) + value
    terms = _ordered_terms(structure, {n: (v, 0.0, "exact") for n, v in values.items()})
    elbo = sum(t.value if t.kind == "reconstruction" else -t.value for t in terms)
    return Ledger(terms=terms, elbo=elbo, elbo_stderr=0.0, exact=True, num_particles=0)


def sampled_site_terms(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1,
    analytic_kl: bool = True,
    keep_plates: tuple[str, ...] = (),
    structure: PairStructure | None = None,
    **kwargs,
) -> dict[str, tuple[TermKind, str, torch.Tensor]]:
    """Per-particle site terms: ``{site: (kind, method, tensor)}``.

    Each tensor has shape ``(num_particles, *sizes of keep_plates)``: reconstruction terms are
    log p(x | ...) and KL terms log q - log p (or the closed-form KL given the particle's
    parents), summed over every plate not kept. Gradients flow (reparameterised sites).
    """
    if structure is None:
        structure = inspect_pair(model, guide, args, kwargs)
    nesting = structure.max_plate_nesting
    model_trace, guide_trace = vectorized_traces(model, guide, args, kwargs, num_particles, nesting)
    rank = nesting + 1
    plate_dims = {
        name: dim for site in structure.latent + structure.observed for name, dim, _ in site.plates
    }
    missing = [p for p in keep_plates if p not in plate_dims]
    if missing:
        raise ValueError(f"no plate named {missing} in this pair; plates: {sorted(plate_dims)}")
    keep = (-rank, *(plate_dims[p] for p in keep_plates))

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        kept = sum_except(tensor, keep, rank)
        return kept.reshape(num_particles, *(kept.shape[d] for d in sorted(keep[1:])))

    out: dict[str, tuple[TermKind, str, torch.Tensor]] = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            out[name] = ("reconstruction", "sampled", reduce(site["log_prob"]))
            continue
        guide_site = guide_trace.nodes[name]
        kl = _analytic_kl(guide_site, site) if analytic_kl else None
        if kl is None:
            out[name] = ("kl", "sampled", reduce(guide_site["log_prob"] - site["log_prob"]))
        else:
            out[name] = ("kl", "analytic", reduce(kl))
    return out


def _analytic_kl(guide_site: dict, model_site: dict) -> torch.Tensor | None:
    try:
        kl = torch.distributions.kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        return None
    return scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])


def _sampled_ledger(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    structure: PairStructure,
    num_particles: int,
    analytic_kl: bool,
) -> Ledger:
    with torch.no_grad():
        per_particle = sampled_site_terms(
            model,
            guide,
            *args,
            num_particles=num_particles,
            analytic_kl=analytic_kl,
            structure=structure,
            **kwargs,
        )
    values = {
        name: (float(t.mean()), _stderr(t), method) for name, (_, method, t) in per_particle.items()
    }
    elbo_particles = sum(
        t if kind == "reconstruction" else -t for kind, _, t in per_particle.values()
    )
    return Ledger(
        terms=_ordered_terms(structure, values),
        elbo=float(elbo_particles.mean()),
        elbo_stderr=_stderr(elbo_particles),
        exact=False,
        num_particles=num_particles,
    )


def _stderr(samples: torch.Tensor) -> float:
    """Standard error of the mean of i.i.d. particles: sd / sqrt(N) (0 for a single one)."""
    n = samples.shape[0]
    return float(samples.std() / math.sqrt(n)) if n > 1 else math.nan


def _ordered_terms(
    structure: PairStructure, values: dict[str, tuple[float, float, str]]
) -> tuple[SiteTerm, ...]:
    # Observed sites first (reconstruction), then latent sites in guide order (KL).
    terms = [SiteTerm(s.name, "reconstruction", *values[s.name]) for s in structure.observed]
    terms += [SiteTerm(s.name, "kl", *values[s.name]) for s in structure.latent]
    return tuple(terms)
