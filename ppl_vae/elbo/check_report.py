"""CheckReport: what :func:`ppl_vae.elbo.check.check_pair` found, and its table.

Every value is in nats, a total over the minibatch passed, for the beta = 1 pair; the gap
identity log p(x) - ELBO = KL(q(z | x) || p(z | x)) is shown as gap - KL, zero up to the
float32 rounding the report states, and the sampled ELBO as a z-score against the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ppl_vae.elbo.evidence import IWAEEstimate
from ppl_vae.elbo.gradcheck import EstimatorComparison, GradientCheck, format_comparisons
from ppl_vae.elbo.ledger import Ledger

__all__ = ["CheckReport"]

Z_LIMIT = 4.0
"""|z| beyond which a sampled estimate disagrees with its reference: for a normal z-score
this happens by chance with probability 6e-5."""


@dataclass(frozen=True)
class CheckReport:
    """Exact vs sampled ELBO of one pair on one minibatch (nats, totals over the data passed).

    Every value is for the beta = 1 pair on the minibatch; ``objective`` is the pair's own
    beta-weighted ELBO, ``full_data`` the N/m-scaled estimates of a subsampled pair.
    ``estimators`` says how each quantity was obtained; ``notes`` what could not be done.
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
    exact_elbo_stderr: float = 0.0
    log_evidence_stderr: float = 0.0
    log_evidence_exact: bool = True
    iwae: IWAEEstimate | None = None
    sampled: Ledger | None = None
    objective: float | None = None
    full_data: dict[str, tuple[float, str]] = field(default_factory=dict)
    gradients: tuple[GradientCheck, ...] = ()
    comparisons: tuple[EstimatorComparison, ...] = ()
    notes: tuple[str, ...] = ()
    rounding: float = 0.0  # float32 rounding gap - KL may show (check._rounding)

    @property
    def gap_minus_kl(self) -> float:
        """gap - KL(q || p(z | x)): zero up to rounding when the gap identity holds."""
        return self.gap - self.kl_to_posterior

    @property
    def gap_stderr(self) -> float:
        """s.e. of the gap: the ELBO's and log p(x)'s, from independent draws, in quadrature."""
        return math.hypot(self.exact_elbo_stderr, self.log_evidence_stderr)

    def __str__(self) -> str:
        return _format(self)


def _format(report: CheckReport) -> str:
    """The report as one table (nats), then the notes, gradients and estimator comparison."""
    e = report.estimators
    ledger = report.ledger
    kind = "exact" if report.exact else "reference"
    rows: list[tuple[str, float, float | None, str]] = [
        (f"ELBO ({kind})", report.exact_elbo, report.exact_elbo_stderr, e["exact_elbo"]),
        ("  reconstruction E_q[log p(x|z)]", report.reconstruction, None, ""),
        ("  KL(q(z|x) || p(z))", report.kl, None, ""),
    ]
    if len(ledger.terms) > 2:
        rows += [(f"    {t.kind} '{t.site}'", t.value, t.stderr, t.method) for t in ledger.terms]
    if report.objective is not None:
        rows.append(("beta-objective (the pair's scales)", report.objective, None, "training"))
    rows += [
        ("ELBO (sampled)", report.sampled_elbo, report.sampled_stderr, e["sampled_elbo"]),
        ("  z-score (sampled - ELBO) / s.e.", report.z_score, None, f"|z| < {Z_LIMIT:g} expected"),
        (
            "log p(x)" + ("" if report.log_evidence_exact else " (lower bound)"),
            report.log_evidence,
            report.log_evidence_stderr,
            e["log_evidence"],
        ),
        (
            "gap = log p(x) - ELBO" + ("" if report.log_evidence_exact else " (lower bound)"),
            report.gap,
            report.gap_stderr,
            "",
        ),
        ("KL(q(z|x) || p(z|x))", report.kl_to_posterior, None, e["kl_to_posterior"]),
        (
            "gap - KL(q || posterior)",
            report.gap_minus_kl,
            None,
            f"~0 when the identity holds (float32 rounding: ±{report.rounding:.1g})",
        ),
    ]
    for name, (value, how) in report.full_data.items():
        label = {"elbo": "full-data ELBO (estimate)", "log_evidence": "full-data log p(x)"}[name]
        rows.append((label, value, None, how))
    width = max(len(r[0]) for r in rows)
    lines = [
        f"{report.title}  [nats, totals over the minibatch passed, beta = 1]",
        f"{'quantity':<{width}}  {'value':>10}  {'± s.e.':>8}  how",
    ]
    for name, value, stderr, how in rows:
        lines.append(f"{name:<{width}}  {_number(value):>10}  {_stderr(stderr):>8}  {how}")
    lines += [f"note: {note}" for note in report.notes]
    if report.gradients:
        lines += ["", *map(str, report.gradients)]
    if report.comparisons:
        lines += ["", format_comparisons(report.comparisons)]
    return "\n".join(lines)


def _number(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.4f}" if math.isfinite(value) else ("-inf" if value < 0 else "inf")


def _stderr(stderr: float | None) -> str:
    if stderr is None:
        return ""
    if math.isnan(stderr):
        return "n/a"
    return "exact" if stderr == 0 else f"{stderr:.4f}"
