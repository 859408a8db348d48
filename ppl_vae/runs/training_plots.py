"""Figures of training and of the sampled ELBO, each a function from data to a matplotlib Figure
(write them with :func:`ppl_vae.runs.image_plots.save`).

- the sampled ELBO against the number of particles, beside the exact ELBO and log p(x): the
  gap log p(x) - ELBO = KL(q || p(z | x));
- per-epoch curves of reconstruction E_q[log p(x | z)], KL(q(z | x) || p(z)) and the ELBO =
  reconstruction - KL against the step, with the steps of beta warm-up shaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ppl_vae.elbo import parse_objective

__all__ = ["particles_figure", "training_curves_figure"]


def particles_figure(
    num_particles: Sequence[int],
    estimates: Sequence[float],
    stderrs: Sequence[float],
    exact_elbo: float,
    log_evidence: float,
    *,
    title: str = "Sampled ELBO against the number of particles",
) -> Figure:
    """The sampled ELBO (mean ± 2 s.e.) against N, with the exact ELBO and log p(x) as lines
    and the gap between them shaded: the bound, its estimate, and what it bounds."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.axhspan(
        exact_elbo,
        log_evidence,
        color="tab:orange",
        alpha=0.15,
        label=f"gap = KL(q || p(z|x)) = {log_evidence - exact_elbo:.4f}",
    )
    ax.axhline(log_evidence, color="black", lw=1.5, label=f"log p(x) = {log_evidence:.4f}")
    ax.axhline(
        exact_elbo, color="tab:orange", lw=1.5, ls="--", label=f"exact ELBO = {exact_elbo:.4f}"
    )
    ax.errorbar(
        num_particles,
        estimates,
        yerr=[2 * s for s in stderrs],
        fmt="o",
        color="tab:blue",
        capsize=3,
        label="sampled ELBO ± 2 s.e. (Trace_ELBO)",
    )
    ax.set_xscale("log")
    ax.set_xlabel("particles N")
    ax.set_ylabel("nats")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def _rows(history: Any) -> list[Mapping[str, Any]]:
    rows = list(getattr(history, "rows", history))
    if not rows:
        raise ValueError("the history has no rows: train for at least one epoch")
    return rows


def _column(rows: Sequence[Mapping[str, Any]], name: str) -> list[float]:
    """A history column as floats, NaN where missing (no validation set, say)."""
    out = []
    for row in rows:
        value = row.get(name)
        out.append(math.nan if value is None or value == "" else float(value))
    return out


def _warmup_spans(
    schedule: Callable[[int], float] | None, rows: Sequence[Mapping[str, Any]], last_step: int
) -> list[tuple[float, float]]:
    """Step intervals where beta is below its largest value: the warm-up (or each cycle's
    rise), from the schedule step by step when given, else from the per-epoch beta column."""
    if schedule is not None:
        steps = list(range(last_step + 1))
        betas = [float(schedule(s)) for s in steps]
    else:
        steps = [0] + [int(r["step"]) for r in rows]
        betas = _column(rows, "beta")
        betas = [betas[0], *betas]
    finite = [b for b in betas if math.isfinite(b)]
    if not finite or max(finite) - min(finite) < 1e-12:
        return []
    top = max(finite)
    spans, start = [], None
    for step, beta in zip(steps, betas, strict=True):
        if beta < top - 1e-12 and start is None:
            start = step
        elif beta >= top - 1e-12 and start is not None:
            spans.append((start, step))
            start = None
    if start is not None:
        spans.append((start, steps[-1]))
    return spans


def _objective_label(objective: str) -> str:
    kind, k = parse_objective(objective)
    if kind == "elbo":
        return "training objective (beta)"
    return f"training objective ({k}-sample IWAE bound, {kind})"


def training_curves_figure(
    history: Any,
    *,
    schedule: Callable[[int], float] | None = None,
    min_rate: float | None = None,
    title: str = "Training: reconstruction, KL and ELBO",
    trained_on: str = "elbo",
) -> Figure:
    """Per-epoch curves against the optimisation step: validation reconstruction
    E_q[log p(x | z)], validation KL(q(z | x) || p(z)) (the rate; near zero = posterior
    collapse), and the validation ELBO = reconstruction - KL beside the training objective
    E_q[log p(x | z)] - beta KL. Steps where beta is below its final value (warm-up, or the
    rising part of each cycle) are shaded, and beta is drawn on the KL panel's right axis.

    :param history: a :class:`ppl_vae.training.History` or its rows (``history.json``).
    :param schedule: beta(step), to shade the warm-up step by step (default: the history's
        per-epoch beta column).
    :param min_rate: the collapse level drawn on the KL panel (default
        :data:`ppl_vae.vae.diagnostics.MIN_RATE`).
    :param trained_on: the run's ``TrainConfig.objective``: with ``"iwae:K"`` or ``"dreg:K"``
        the training curve is labelled as the K-sample bound it is.
    """
    from ppl_vae.vae import MIN_RATE

    rows = _rows(history)
    min_rate = MIN_RATE if min_rate is None else min_rate
    steps = [int(r["step"]) for r in rows]
    recon = _column(rows, "val_reconstruction")
    kl = _column(rows, "val_kl")
    elbo = _column(rows, "val_elbo")
    objective = _column(rows, "train_objective")
    betas = _column(rows, "beta")
    spans = _warmup_spans(schedule, rows, steps[-1])
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    for ax in axes:
        for i, (a, b) in enumerate(spans):
            ax.axvspan(
                a, b, color="tab:orange", alpha=0.12, lw=0, label="beta warm-up" if i == 0 else None
            )
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax = axes[0]
    ax.plot(steps, recon, "o-", color="tab:blue", ms=3, label="validation")
    ax.set_title("reconstruction E_q[log p(x|z)]", fontsize=10)
    ax.set_ylabel("nats per image")
    ax = axes[1]
    ax.plot(steps, kl, "o-", color="tab:red", ms=3, label="validation KL = rate R")
    ax.axhline(min_rate, color="gray", ls=":", lw=1, label=f"collapse level {min_rate:g}")
    finite_kl = [v for v in kl if math.isfinite(v)]
    if finite_kl and finite_kl[-1] < min_rate:
        ax.text(
            0.5,
            0.5,
            "posterior collapse:\nKL ~ 0",
            transform=ax.transAxes,
            ha="center",
            color="tab:red",
            fontsize=11,
        )
    ax.set_ylim(bottom=0)
    ax.set_title("KL(q(z|x) || p(z))", fontsize=10)
    twin = ax.twinx()
    twin.step(steps, betas, where="pre", color="tab:orange", lw=1, label="beta")
    twin.set_ylabel("beta", color="tab:orange")
    twin.set_ylim(bottom=0)
    ax = axes[2]
    ax.plot(steps, elbo, "o-", color="black", ms=3, label="validation ELBO (beta = 1)")
    ax.plot(steps, objective, "s--", color="tab:green", ms=3, label=_objective_label(trained_on))
    ax.set_title("ELBO = reconstruction - KL", fontsize=10)
    for ax in axes:
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
