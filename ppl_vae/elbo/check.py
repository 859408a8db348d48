"""check_pair: validate a model/guide pair's sampled ELBO against exact values.

The pair is bound to its data once (:func:`ppl_vae.elbo.pair.bind_pair`): one minibatch for every
estimator, and every checked quantity is computed on the beta = 1 pair without the
subsampling factor, where the gap identity log p(x) - ELBO = KL(q(z | x) || p(z | x)) holds.
Discrete guide sites are enumerated (``TraceEnum_ELBO``), continuous ones sampled; discrete
model sites the guide leaves out are summed out in the model. log p(x) is exact by
enumeration when every latent site is discrete, else the IWAE bound with its standard error,
effective sample size and Pareto k-hat. KL(q || p(z | x)) comes from a brute-force posterior
table that shares no code with the ELBO. A quantity that cannot be computed right is reported
as missing with the reason, never as a plausible number. The report and its table are in
:mod:`ppl_vae.elbo.check_report`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ppl_vae.elbo.check_report import CheckReport
from ppl_vae.elbo.evidence import IWAEEstimate, exact_log_evidence, iwae_log_evidence
from ppl_vae.elbo.gradcheck import check_gradients, compare_estimators, parse_estimators
from ppl_vae.elbo.ledger import MARGINAL_TERM, Ledger, bound_ledger, elbo_ledger
from ppl_vae.elbo.pair import BoundPair, bind_pair
from ppl_vae.elbo.posterior import enumerate_joint
from ppl_vae.elbo.psis import (
    KHAT_UNRELIABLE,
    effective_sample_size,
    log_mean_exp_stderr,
    pareto_khat,
)
from ppl_vae.errors import ArgumentError, NotEnumerableError, PairExecutionError

__all__ = ["SweepPoint", "check_pair", "particle_sweep"]


def check_pair(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1000,
    iwae_samples: int = 5000,
    max_configurations: int = 2**16,
    gradients: bool = False,
    estimators: tuple[str, ...] | str = (),
    **kwargs,
) -> CheckReport:
    """Check ``(model, guide)`` on ``args``: exact vs sampled ELBO and the gap identity.

    :param num_particles: particles of the sampled estimate (and of the enumerated-and-sampled
        one when some latents are continuous; 10x as many for an all-sampled reference).
    :param iwae_samples: K of the IWAE bound that stands in for log p(x) when it is not exact.
    :param max_configurations: size limit of the brute-force posterior's truly joint part.
    :param gradients: also compare every parameter's sampled gradient with the exact one.
    :param estimators: also compare these estimators on the pair, e.g. ``("trace",
        "iwae:10", "dreg:10")`` (see :func:`ppl_vae.elbo.gradcheck.parse_estimators`).
    :raises ArgumentError: for a particle or sample count below 2.
    """
    for name, value in (("num_particles", num_particles), ("iwae_samples", iwae_samples)):
        if not isinstance(value, int) or value < 2:
            raise ArgumentError(
                f"{name} must be an integer >= 2 (a standard error needs two draws), got {value!r}"
            )
    specs = parse_estimators(estimators)
    bound = bind_pair(model, guide, args, kwargs)
    try:
        return _check(bound, num_particles, iwae_samples, max_configurations, gradients, specs)
    except (IndexError, RuntimeError, TypeError, KeyError) as error:
        # Raised inside the user's model or guide under enumeration or many particles (an
        # index out of a table's range, a shape that does not broadcast): say so in one line.
        raise PairExecutionError(
            f"the pair raised {type(error).__name__} while being checked: "
            f"{' '.join(str(error).split())[:300]}. Check that the guide's values lie in the "
            "model's supports and that the model handles enumeration dims (index with "
            "tensors, not Python ints)."
        ) from error


def _check(
    bound: BoundPair,
    num_particles: int,
    iwae_samples: int,
    max_configurations: int,
    gradients: bool,
    specs: tuple[str, ...],
) -> CheckReport:
    model, guide = bound.model, bound.guide
    structure = bound.structure
    estimators_used: dict[str, str] = {}
    notes: list[str] = []
    if bound.cast_float64:
        notes.append("float64 data cast to float32, the parameters' dtype (enumeration needs one)")
    if bound.subsampled:
        shown = ", ".join(f"'{p}': {m} of {n}" for p, (m, n) in bound.subsampled.items())
        notes.append(f"one minibatch ({shown}), the same for every estimator")

    sampled = bound_ledger(
        bound, "true", method="sampled", num_particles=num_particles, analytic_kl=False
    )
    estimators_used["sampled_elbo"] = f"{sampled.method}, {sampled.num_particles} particles" + (
        f" (s.e. from {sampled.repeats} repeats)" if sampled.repeats else ""
    )
    if structure.enumerable:
        reference = bound_ledger(bound, "true", method="exact")
    elif structure.enumerable_latent or structure.model_enumerated:
        reference = bound_ledger(bound, "true", method="enumerated", num_particles=num_particles)
    else:
        reference = bound_ledger(
            bound, "true", method="sampled", num_particles=10 * num_particles, analytic_kl=False
        )
    estimators_used["exact_elbo"] = reference.method + (
        "" if reference.exact else f", {reference.num_particles} particles (not exact)"
    )
    z_score = _z_score(sampled, reference)

    log_evidence, log_evidence_se, iwae = _log_evidence(bound, iwae_samples, estimators_used)
    kl_to_posterior = _kl_to_posterior(bound, max_configurations, estimators_used)
    objective = _objective(bound, reference, notes)
    return CheckReport(
        exact_elbo=reference.elbo,
        sampled_elbo=sampled.elbo,
        sampled_stderr=sampled.elbo_stderr,
        z_score=z_score,
        log_evidence=log_evidence,
        gap=log_evidence - reference.elbo,
        kl_to_posterior=kl_to_posterior,
        reconstruction=reference.reconstruction,
        kl=reference.kl,
        num_particles=num_particles,
        exact=reference.exact,
        ledger=reference,
        estimators=estimators_used,
        title=f"check_pair: {_name(model)} / {_name(guide)}",
        exact_elbo_stderr=reference.elbo_stderr,
        log_evidence_stderr=log_evidence_se,
        log_evidence_exact=iwae is None,
        iwae=iwae,
        sampled=sampled,
        objective=objective,
        full_data=_full_data(bound, reference, log_evidence, iwae, notes),
        gradients=check_gradients(bound, num_particles=num_particles) if gradients else (),
        comparisons=compare_estimators(
            bound,
            specs,
            num_particles=num_particles,
            elbo_target=(reference.elbo, reference.exact),
            log_evidence=(log_evidence, iwae is None),
        )
        if specs
        else (),
        notes=tuple(notes),
        rounding=_rounding(bound, log_evidence, reference.elbo),
    )


def _rounding(bound: BoundPair, log_evidence: float, elbo: float) -> float:
    """How far float32 sums of n log-probabilities may put gap - KL from 0: pairwise summation
    errs by ~log2(n) eps relative per stage; four stages (log-probs, plates, contraction,
    difference) of the two totals bound it."""
    n = max((math.prod(s.batch_shape) for s in bound.structure.observed), default=1)
    magnitude = abs(log_evidence) + abs(elbo)
    return 4 * math.log2(n + 1) * 2**-24 * magnitude if math.isfinite(magnitude) else 0.0


def _z_score(sampled: Ledger, reference: Ledger) -> float:
    """(sampled - reference) / s.e.; explicit when both are the same infinity or exact."""
    difference = sampled.elbo - reference.elbo
    if math.isinf(sampled.elbo) or math.isinf(reference.elbo):
        return 0.0 if sampled.elbo == reference.elbo else math.copysign(math.inf, difference)
    spread = math.hypot(sampled.elbo_stderr, reference.elbo_stderr)
    # Below float32 rounding of a sum of log-probabilities the particles agree exactly (q is
    # the true posterior: every particle gives log p(x)); the z-score is then 0 or infinite.
    rounding = 1e-6 * (1 + abs(reference.elbo))
    if spread > rounding:
        return difference / spread
    return 0.0 if abs(difference) <= rounding else math.copysign(math.inf, difference)


def _log_evidence(
    bound: BoundPair, iwae_samples: int, how: dict[str, str]
) -> tuple[float, float, IWAEEstimate | None]:
    """log p(x) on the minibatch: exact by enumeration, else the IWAE bound with its s.e."""
    structure = bound.structure
    if structure.enumerable:
        how["log_evidence"] = "enumeration (TraceEnum_ELBO, empty guide)"
        return exact_log_evidence(bound.model_fn("true"), *bound.args, **bound.kwargs), 0.0, None
    if structure.model_enumerated:
        return _marginal_iwae(bound, min(iwae_samples, 1000), how)
    iwae = iwae_log_evidence(
        bound.model_fn("true"),
        bound.guide_fn("true"),
        *bound.args,
        num_samples=iwae_samples,
        **bound.kwargs,
    )
    items = iwae.per_item.numel()
    how["log_evidence"] = (
        f"IWAE bound, K={iwae_samples}, {items} item(s); s.e. by the delta method; "
        f"min ESS {float(iwae.ess_per_item.min()):.0f}, {_khat(iwae.max_khat)}"
    )
    return iwae.total, iwae.stderr, iwae


def _marginal_iwae(
    bound: BoundPair, samples: int, how: dict[str, str]
) -> tuple[float, float, IWAEEstimate]:
    """IWAE with the model's discrete sites summed out: log w_k = log sum_l p(x, l, g_k) -
    log q(g_k), one single-particle TraceEnum_ELBO run per sample (the whole minibatch)."""
    from pyro.infer import TraceEnum_ELBO, config_enumerate

    elbo = TraceEnum_ELBO(max_plate_nesting=bound.structure.max_plate_nesting)
    model = config_enumerate(bound.model_fn("true"), "parallel")
    guide = bound.guide_fn("true")
    with torch.no_grad():
        log_w = torch.tensor(
            [-elbo.loss(model, guide, *bound.args, **bound.kwargs) for _ in range(samples)],
            dtype=torch.float64,
        )
    per_item = torch.logsumexp(log_w, 0) - math.log(samples)
    estimate = IWAEEstimate(
        per_item=per_item,
        num_samples=samples,
        plates=(),
        stderr_per_item=log_mean_exp_stderr(log_w),
        ess_per_item=effective_sample_size(log_w),
        khat_per_item=pareto_khat(log_w),
    )
    how["log_evidence"] = (
        f"IWAE bound over the guide's sites, K={samples}, summed out in the model over "
        f"{[s.name for s in bound.structure.model_enumerated]}; "
        f"ESS {float(estimate.ess_per_item):.0f}, {_khat(estimate.max_khat)}"
    )
    return estimate.total, estimate.stderr, estimate


def _khat(khat: float) -> str:
    """The Pareto k-hat for the table, flagged as the loo package does above 0.7."""
    if math.isnan(khat):
        return "k-hat n/a (too few samples or constant weights)"
    if khat > KHAT_UNRELIABLE:
        return f"max k-hat {khat:.2f} (> {KHAT_UNRELIABLE}: s.e. unreliable)"
    return f"max k-hat {khat:.2f}"


def _kl_to_posterior(bound: BoundPair, max_configurations: int, how: dict[str, str]) -> float:
    if not bound.structure.enumerable:
        how["kl_to_posterior"] = "no exact posterior for continuous latents"
        return math.nan
    try:
        table = enumerate_joint(
            bound.model_fn("true"),
            bound.guide_fn("true"),
            *bound.args,
            max_configurations=max_configurations,
            **bound.kwargs,
        )
    except NotEnumerableError as error:
        how["kl_to_posterior"] = f"not checked: {error}"
        return math.nan
    how["kl_to_posterior"] = table.method
    if table.kl_reason:
        how["kl_to_posterior"] += f"; infinite: {table.kl_reason}"
    return table.kl_q_to_posterior()


def _objective(bound: BoundPair, ledger: Ledger, notes: list[str]) -> float | None:
    """The pair's own beta-objective on the minibatch, recon - sum_sites beta_s KL_s, from the
    beta = 1 terms (the ELBO is linear in each latent site's scale)."""
    scales = bound.latent_scales
    weighted = {name: s for name, s in scales.items() if s is None or s != 1.0}
    if not weighted:
        return None
    if any(s is None for s in weighted.values()):
        varying = [n for n, s in weighted.items() if s is None]
        notes.append(f"the beta-objective is not shown: the scale of {varying} varies by element")
        return None
    if any(t.site == MARGINAL_TERM for t in ledger.terms):
        notes.append("the beta-objective is not shown: scaled sites are summed out with others")
        return None
    objective = ledger.reconstruction - sum(
        scales.get(t.site, 1.0) * t.value for t in ledger.terms if t.kind == "kl"
    )
    shown = ", ".join(f"'{n}': {s:g}" for n, s in weighted.items())
    notes.append(f"KL weights (poutine.scale) on {shown}: every check uses beta = 1")
    return objective


def _full_data(
    bound: BoundPair,
    ledger: Ledger,
    log_evidence: float,
    iwae: IWAEEstimate | None,
    notes: list[str],
) -> dict[str, tuple[float, str]]:
    """N/m-scaled estimates of a subsampled pair: each site's term times its factor."""
    if not bound.subsampled:
        return {}
    structure = bound.structure
    factors = {s.name: s.subsample_factor for s in structure.latent + structure.observed}
    marginal = {s.subsample_factor for s in structure.model_enumerated + structure.observed}
    if any(t.site == MARGINAL_TERM for t in ledger.terms) and len(marginal) > 1:
        notes.append("no full-data ELBO: sites summed out in the model span different plates")
        return {}
    factors[MARGINAL_TERM] = next(iter(marginal), 1.0)
    elbo = sum(
        factors[t.site] * (t.value if t.kind == "reconstruction" else -t.value)
        for t in ledger.terms
    )
    out = {"elbo": (elbo, "sum over sites of N/m x the minibatch term (Pyro's objective)")}
    every = {s.subsample_factor for s in structure.latent + structure.observed}
    if len(every) == 1:
        (factor,) = every
        how = f"N/m = {factor:g} x the minibatch log p(x) (all sites local to the plate)"
        if iwae is not None and iwae.per_item.numel() >= 10:
            spread = float(iwae.per_item.std()) * math.sqrt(iwae.per_item.numel())
            how += f"; subsampling s.e. {factor * spread:.3g}"
        elif iwae is not None:
            how += "; fewer than 10 datapoints: no subsampling s.e."
        out["log_evidence"] = (factor * log_evidence, how)
    else:
        notes.append(
            "no full-data log p(x): a latent site outside the subsampled plate couples the data"
        )
    return out


def _name(fn: Callable) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


@dataclass(frozen=True)
class SweepPoint:
    """The sampled ELBO with ``num_particles`` particles: mean and standard error (nats)."""

    num_particles: int
    elbo: float
    stderr: float


def particle_sweep(
    model: Callable,
    guide: Callable,
    *args,
    particles: tuple[int, ...] = (10, 100, 1000, 10000),
    **kwargs,
) -> list[SweepPoint]:
    """The Trace_ELBO estimate at each particle count: its s.e. shrinks as 1 / sqrt(N)."""
    points = []
    for n in particles:
        ledger = elbo_ledger(
            model, guide, *args, exact=False, num_particles=n, analytic_kl=False, **kwargs
        )
        points.append(SweepPoint(n, ledger.elbo, ledger.elbo_stderr))
    return points
