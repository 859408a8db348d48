"""check_pair: validate a model/guide pair's sampled ELBO against exact values.

For a pair whose latent sites are all discrete, the exact ELBO (enumeration), log p(x)
(enumeration with an empty guide) and KL(q || p(z | x)) (a brute-force posterior, independent
of the ELBO code) test the stochastic ``Trace_ELBO`` estimate (z-score against its standard
error) and the gap identity log p(x) - ELBO = KL(q(z | x) || p(z | x)). For continuous latents
the report names the estimators that stand in for exact values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ppl_vae.errors import NotEnumerableError
from ppl_vae.evidence import exact_log_evidence, iwae_log_evidence
from ppl_vae.ledger import Ledger, elbo_ledger
from ppl_vae.pair import inspect_pair
from ppl_vae.posterior import enumerate_joint

__all__ = ["CheckReport", "SweepPoint", "check_pair", "particle_sweep"]


@dataclass(frozen=True)
class CheckReport:
    """Exact vs sampled ELBO of one pair on one data set (nats, totals over the data passed).

    ``estimators`` says how each quantity was obtained; where it is not exact, it names the
    estimator and its sample size.
    """

    exact_elbo: float
    sampled_elbo: float
    sampled_stderr: float
    z_score: float
    log_evidence: float
    gap: float
    kl_to_posterior: float
    reconstruction: float
    kl: float
    num_particles: int
    exact: bool
    ledger: Ledger
    estimators: dict[str, str] = field(default_factory=dict)
    title: str = "check_pair"

    @property
    def gap_minus_kl(self) -> float:
        """gap - KL(q || p(z | x)): zero up to rounding when the gap identity holds."""
        return self.gap - self.kl_to_posterior

    def __str__(self) -> str:
        e = self.estimators
        rows = [
            (
                "ELBO" + (" (exact)" if self.exact else " (reference)"),
                self.exact_elbo,
                self.ledger.elbo_stderr,
                e["exact_elbo"],
            ),
            ("  reconstruction E_q[log p(x|z)]", self.reconstruction, None, ""),
            ("  KL(q(z|x) || p(z))", self.kl, None, ""),
        ]
        if len(self.ledger.terms) > 2:
            rows += [
                (f"    {t.kind} '{t.site}'", t.value, None, t.method) for t in self.ledger.terms
            ]
        rows += [
            (
                "ELBO (sampled, Trace_ELBO)",
                self.sampled_elbo,
                self.sampled_stderr,
                e["sampled_elbo"],
            ),
            ("  z-score (sampled - ELBO) / s.e.", self.z_score, None, "|z| < 4 expected"),
            (
                "log p(x)" + ("" if self.exact else " (lower bound)"),
                self.log_evidence,
                None,
                e["log_evidence"],
            ),
            ("gap = log p(x) - ELBO", self.gap, None, ""),
            ("KL(q(z|x) || p(z|x))", self.kl_to_posterior, None, e["kl_to_posterior"]),
            ("gap - KL(q || posterior)", self.gap_minus_kl, None, "~0 when the identity holds"),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [
            f"{self.title}  [nats, totals over the data passed]",
            f"{'quantity':<{width}}  {'value':>10}  {'± s.e.':>8}  how",
        ]
        for name, value, stderr, how in rows:
            se = "" if stderr is None else ("exact" if stderr == 0 else f"{stderr:.4f}")
            lines.append(f"{name:<{width}}  {value:>10.4f}  {se:>8}  {how}")
        return "\n".join(lines)


def check_pair(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1000,
    iwae_samples: int = 5000,
    max_configurations: int = 2**16,
    **kwargs,
) -> CheckReport:
    """Check ``(model, guide)`` on ``args``: exact vs sampled ELBO and the gap identity.

    :param num_particles: vectorised particles of the sampled ``Trace_ELBO`` estimate (and
        10x as many for the reference ELBO when latents are continuous).
    :param iwae_samples: K of the IWAE bound that stands in for log p(x) when it is not exact.
    :param max_configurations: size limit of the brute-force posterior table.
    """
    structure = inspect_pair(model, guide, args, kwargs)
    sampled = elbo_ledger(
        model, guide, *args, exact=False, num_particles=num_particles, analytic_kl=False, **kwargs
    )
    estimators = {
        "sampled_elbo": f"score-function/reparameterised, {num_particles} vectorised particles"
    }
    if structure.enumerable:
        ledger = elbo_ledger(model, guide, *args, exact=True, **kwargs)
        log_evidence = exact_log_evidence(model, *args, **kwargs)
        estimators["exact_elbo"] = "enumeration (TraceEnum_ELBO)"
        estimators["log_evidence"] = "enumeration (TraceEnum_ELBO, empty guide)"
        try:
            table = enumerate_joint(
                model, guide, *args, max_configurations=max_configurations, **kwargs
            )
            kl_to_posterior = table.kl_q_to_posterior()
            estimators["kl_to_posterior"] = (
                f"brute-force posterior over {table.num_configurations} configurations"
            )
        except NotEnumerableError:
            kl_to_posterior = math.nan
            estimators["kl_to_posterior"] = (
                f"not checked: more than {max_configurations} joint configurations"
            )
    else:
        reference = 10 * num_particles
        ledger = elbo_ledger(
            model, guide, *args, exact=False, num_particles=reference, analytic_kl=False, **kwargs
        )
        log_evidence = iwae_log_evidence(
            model, guide, *args, num_samples=iwae_samples, **kwargs
        ).total
        # Sampled KL terms, not analytic ones: near the posterior log p(x, z) - log q(z) is
        # nearly constant, and a closed-form KL would break that cancellation.
        estimators["exact_elbo"] = f"sampled estimate, {reference} particles (not exact)"
        estimators["log_evidence"] = f"IWAE bound, K={iwae_samples} (not exact)"
        kl_to_posterior = math.nan
        estimators["kl_to_posterior"] = "no exact posterior for continuous latents"
    spread = math.hypot(sampled.elbo_stderr, ledger.elbo_stderr)
    difference = sampled.elbo - ledger.elbo
    # Below float32 rounding of a sum of log-probabilities the particles agree exactly (q is
    # the true posterior: every particle gives log p(x)); the z-score is then 0 or infinite.
    rounding = 1e-6 * (1 + abs(ledger.elbo))
    if spread > rounding:
        z_score = difference / spread
    else:
        z_score = 0.0 if abs(difference) <= rounding else math.copysign(math.inf, difference)
    title = f"check_pair: {_name(model)} / {_name(guide)}"
    return CheckReport(
        exact_elbo=ledger.elbo,
        sampled_elbo=sampled.elbo,
        sampled_stderr=sampled.elbo_stderr,
        z_score=z_score,
        log_evidence=log_evidence,
        gap=log_evidence - ledger.elbo,
        kl_to_posterior=kl_to_posterior,
        reconstruction=ledger.reconstruction,
        kl=ledger.kl,
        num_particles=num_particles,
        exact=structure.enumerable,
        ledger=ledger,
        estimators=estimators,
        title=title,
    )


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
