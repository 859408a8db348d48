"""Figures, each a function from data to a matplotlib Figure (save with :func:`save`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files: no display is needed or assumed

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["particles_figure", "save"]


def save(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (parents created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


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
