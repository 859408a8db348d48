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
from pyro.infer.traceenum_elbo import _compute_dice_elbo, _find_ordinal
from pyro.infer.util import Dice

from ppl_vae.elbo.pair import (
    BoundPair,
    PairStructure,
    ScaleMode,
    bind_pair,
    inspect_pair,
    sum_except,
    vectorized_traces,
)

__all__ = [
    "MARGINAL_TERM",
    "REPEATS",
    "Ledger",
    "SiteTerm",
    "bound_ledger",
    "elbo_ledger",
    "sampled_site_terms",
]

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
    method: str = ""  # how it was estimated: "exact (enumeration)", "enumerated over ...", ...
    repeats: int = 0  # > 0: the s.e. comes from this many independent repeats

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
        how = (
            "exact, by enumeration"
            if self.exact
            else f"{self.method}, {self.num_particles} particles"
        )
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


ElboMethod = Literal["auto", "exact", "enumerated", "sampled"]

REPEATS = 25
"""Independent repeats behind the standard error of an enumerated-and-sampled estimate (its
particles are contracted by Pyro, not kept): s.e. = sd of the repeat means / sqrt(25), a t
statistic with 24 degrees of freedom (|t| > 4 with probability 5e-4)."""


def elbo_ledger(
    model: Callable,
    guide: Callable,
    *args,
    exact: bool | None = None,
    num_particles: int = 1000,
    analytic_kl: bool = True,
    **kwargs,
) -> Ledger:
    """The ELBO of ``(model, guide)`` on ``args``, term by term, with the pair's own scales.

    :param exact: ``True`` demands enumeration (raising :class:`NotEnumerableError` when a
        latent site cannot be enumerated), ``False`` demands sampling, ``None`` enumerates
        every discrete guide site and samples the rest (exact when nothing is left to sample).
    :param num_particles: vectorised particles for the sampled estimate.
    :param analytic_kl: use closed-form KL terms where ``kl_divergence`` has the pair.
    """
    bound = bind_pair(model, guide, args, kwargs)
    method: ElboMethod = "auto" if exact is None else ("exact" if exact else "sampled")
    return bound_ledger(
        bound, "as_written", method=method, num_particles=num_particles, analytic_kl=analytic_kl
    )


def bound_ledger(
    bound: BoundPair,
    mode: ScaleMode = "true",
    *,
    method: ElboMethod = "auto",
    num_particles: int = 1000,
    analytic_kl: bool = True,
) -> Ledger:
    """The ledger of a bound pair under the scales of ``mode`` (see :class:`BoundPair`).

    ``"exact"``: every guide site enumerated; ``"enumerated"``: the guide's discrete sites
    enumerated and its continuous ones sampled; ``"sampled"``: every guide site sampled.
    Discrete model sites absent from the guide are summed out in the model in all three.
    """
    structure = bound.structure
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    if method == "auto":
        method = "exact" if structure.enumerable else "enumerated"
    if method == "exact":
        structure.require_enumerable("an exact ELBO")
    if method == "enumerated" and not structure.enumerable_latent:
        method = "sampled"
    if method == "sampled" and not structure.model_enumerated:
        return _sampled_ledger(bound, mode, num_particles, analytic_kl)
    return _enumerated_ledger(bound, mode, method, num_particles)


def _enumerated_ledger(
    bound: BoundPair, mode: ScaleMode, method: ElboMethod, num_particles: int
) -> Ledger:
    structure = bound.structure
    model = config_enumerate(bound.model_fn(mode), "parallel")
    guide = bound.guide_fn(mode)
    if method in ("exact", "enumerated"):
        guide = config_enumerate(guide, "parallel")
    if method == "exact":
        runs, particles = [_dice_run(bound, model, guide, 1)], 0
    else:
        if num_particles < 2:
            raise ValueError(f"a sampled estimate needs num_particles >= 2, got {num_particles}")
        repeats = min(REPEATS, num_particles)
        per_run = max(1, num_particles // repeats)
        runs = [_dice_run(bound, model, guide, per_run) for _ in range(repeats)]
        particles = repeats * per_run
    values = {}
    for name in runs[0]:
        column = torch.tensor([run[name] for run in runs], dtype=torch.float64)
        kind = "exact" if method == "exact" else "sampled"
        values[name] = (float(column.mean()), _stderr(column) if particles else 0.0, kind)
    total = values.pop(_TOTAL)
    terms = _ordered_terms(structure, values)
    return Ledger(
        terms=terms,
        elbo=total[0],
        elbo_stderr=total[1],
        exact=method == "exact",
        num_particles=particles,
        method=_describe(structure, method),
        repeats=len(runs) if particles else 0,
    )


_TOTAL = "\0elbo"  # the key of the total in a run's values (no site can be named so)


def _dice_run(bound: BoundPair, model: Callable, guide: Callable, particles: int) -> dict:
    """One TraceEnum_ELBO run: the ELBO and each site's term, averaged over ``particles``.

    Costs are weighted by the enumerated guide's probabilities through Pyro's ``Dice``,
    exactly as ``TraceEnum_ELBO`` sums its own loss; sites whose model factor involves a
    model-enumerated site are summed out with it and reported as one marginal term.
    """
    structure = bound.structure
    enum_elbo = TraceEnum_ELBO(
        max_plate_nesting=structure.max_plate_nesting,
        num_particles=particles,
        vectorize_particles=particles > 1,
    )
    marginalised = {s.name for s in structure.model_enumerated}
    out: dict[str, float] = {}
    with torch.no_grad():
        for model_trace, guide_trace in enum_elbo._get_traces(
            model, guide, bound.args, bound.kwargs
        ):
            out[_TOTAL] = float(_compute_dice_elbo(model_trace, guide_trace)) / particles
            enum_dims = {model_trace.nodes[n]["infer"].get("_enumerate_dim") for n in marginalised}
            ordering = {
                name: _find_ordinal(trace, site)
                for trace in (model_trace, guide_trace)
                for name, site in trace.nodes.items()
                if site["type"] == "sample"
            }
            dice = Dice(guide_trace, ordering)

            def expect(cost: torch.Tensor, ordinal: frozenset, dice: Dice = dice) -> float:
                """E_q[cost], q the enumerated guide (the weighting TraceEnum_ELBO uses)."""
                return float(dice.compute_expectation({ordinal: [cost]})) / particles

            for name in (s.name for s in structure.latent + structure.observed):
                model_site = model_trace.nodes[name]
                if _touches(model_site, enum_dims):
                    continue  # it involves a summed-out site: part of the marginal term
                log_p = model_site["packed"]["log_prob"]
                if model_site["is_observed"]:
                    out[name] = expect(log_p, ordering[name])
                else:
                    log_q = guide_trace.nodes[name]["packed"]["log_prob"]
                    out[name] = expect(log_q, ordering[name]) - expect(log_p, ordering[name])
    if marginalised:
        # The sites summed out in the model, with every factor that involves them, hold the
        # rest of the ELBO: marginal = ELBO - (recon - KL) over the terms above.
        observed = {s.name for s in structure.observed}
        rest = sum(v if k in observed else -v for k, v in out.items() if k != _TOTAL)
        out[MARGINAL_TERM] = out[_TOTAL] - rest
    return out


MARGINAL_TERM = "(summed out)"
"""The ledger's name for the term of the sites summed out in the model, together with every
site whose factor involves them: E_q[log sum_l p(x, l | ...)] over those sites."""


def _touches(site: dict, enum_dims: set) -> bool:
    """Whether a model site's log-probability depends on a model-enumerated site."""
    dims = {d for d in enum_dims if d is not None}
    shape = site["log_prob"].shape
    return any(-d <= len(shape) and shape[d] > 1 for d in dims)


def _describe(structure: PairStructure, method: ElboMethod) -> str:
    """How an estimate was made, e.g. "enumerated over ['y'], sampled over ['z']"."""
    summed = [s.name for s in structure.model_enumerated]
    in_model = f"; summed out in the model over {summed}" if summed else ""
    if method == "exact":
        return "exact (enumeration)" + in_model
    enumerated = [s.name for s in structure.enumerable_latent] if method == "enumerated" else []
    sampled = [s.name for s in structure.latent if s.name not in enumerated]
    if enumerated:
        return f"enumerated over {enumerated}, sampled over {sampled}" + in_model
    return "sampled" + in_model


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
    keep = kept_dims(structure, keep_plates)

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


def kept_dims(structure: PairStructure, keep_plates: tuple[str, ...]) -> tuple[int, ...]:
    """The dims a per-site term keeps: the particle dim, then those of ``keep_plates``.

    :raises ValueError: naming a plate the pair does not have.
    """
    plate_dims = {
        name: dim for site in structure.latent + structure.observed for name, dim, _ in site.plates
    }
    missing = [p for p in keep_plates if p not in plate_dims]
    if missing:
        raise ValueError(f"no plate named {missing} in this pair; plates: {sorted(plate_dims)}")
    return (-(structure.max_plate_nesting + 1), *(plate_dims[p] for p in keep_plates))


def _analytic_kl(guide_site: dict, model_site: dict) -> torch.Tensor | None:
    try:
        kl = torch.distributions.kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        return None
    return scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])


def _sampled_ledger(
    bound: BoundPair, mode: ScaleMode, num_particles: int, analytic_kl: bool
) -> Ledger:
    with torch.no_grad():
        per_particle = sampled_site_terms(
            bound.model_fn(mode),
            bound.guide_fn(mode),
            *bound.args,
            num_particles=num_particles,
            analytic_kl=analytic_kl,
            structure=bound.structure,
            **bound.kwargs,
        )
    values = {
        name: (float(t.mean()), _stderr(t), method) for name, (_, method, t) in per_particle.items()
    }
    elbo_particles = sum(
        t if kind == "reconstruction" else -t for kind, _, t in per_particle.values()
    )
    return Ledger(
        terms=_ordered_terms(bound.structure, values),
        elbo=float(elbo_particles.mean()),
        elbo_stderr=_stderr(elbo_particles),
        exact=False,
        num_particles=num_particles,
        method=_describe(bound.structure, "sampled"),
    )


def _stderr(samples: torch.Tensor) -> float:
    """Standard error of the mean of i.i.d. draws: sd / sqrt(N); NaN for a single one.

    A draw of -inf (q puts mass where p has none) makes the mean -inf for certain: s.e. 0.
    """
    n = samples.shape[0]
    if bool(torch.isinf(samples).any()) and math.isinf(float(samples.mean())):
        return 0.0
    return float(samples.std() / math.sqrt(n)) if n > 1 else math.nan


def _ordered_terms(
    structure: PairStructure, values: dict[str, tuple[float, float, str]]
) -> tuple[SiteTerm, ...]:
    # Observed sites first (reconstruction), then latent sites in guide order (KL), then the
    # term of the sites summed out in the model; a site merged into that term has none.
    terms = [
        SiteTerm(s.name, "reconstruction", *values[s.name])
        for s in structure.observed
        if s.name in values
    ]
    if MARGINAL_TERM in values:
        terms.append(SiteTerm(MARGINAL_TERM, "reconstruction", *values[MARGINAL_TERM]))
    terms += [SiteTerm(s.name, "kl", *values[s.name]) for s in structure.latent if s.name in values]
    return tuple(terms)
