"""Figures, each a function from data to a matplotlib Figure (save with :func:`save`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files: no display is needed or assumed

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

__all__ = ["image_grid", "particles_figure", "reconstructions_figure", "save"]


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


def _tile(images: torch.Tensor, image_shape: Sequence[int], ncol: int) -> torch.Tensor:
    """(N, D) images -> one (rows*H, ncol*W[, C]) array, 1-pixel gaps between tiles."""
    c, h, w = (1, *image_shape) if len(image_shape) == 2 else tuple(image_shape)
    n = images.shape[0]
    nrow = -(-n // ncol)
    canvas = torch.ones(c, nrow * (h + 1) - 1, ncol * (w + 1) - 1)
    tiles = images.detach().float().cpu().clamp(0, 1).reshape(n, c, h, w)
    for i in range(n):
        r, k = divmod(i, ncol)
        canvas[:, r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = tiles[i]
    return canvas[0] if c == 1 else canvas.permute(1, 2, 0)


def image_grid(
    images: torch.Tensor, image_shape: Sequence[int], *, ncol: int = 10, title: str = ""
) -> Figure:
    """A grid of (N, D) images with values in [0, 1] (samples from the prior, say)."""
    canvas = _tile(images, image_shape, ncol)
    fig, ax = plt.subplots(figsize=(ncol * 0.6, canvas.shape[0] / canvas.shape[1] * ncol * 0.6))
    ax.imshow(canvas.numpy(), cmap="gray_r" if canvas.dim() == 2 else None, vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return fig


def reconstructions_figure(
    inputs: torch.Tensor,
    reconstructions: torch.Tensor,
    image_shape: Sequence[int],
    *,
    title: str = "inputs (odd rows) and their reconstructions (even rows)",
) -> Figure:
    """Inputs with their reconstructions beneath them, 10 per row pair."""
    n = inputs.shape[0] - inputs.shape[0] % 10 or inputs.shape[0]
    pairs = torch.stack(
        [
            inputs[:n].reshape(-1, 10, inputs.shape[-1]),
            reconstructions[:n].reshape(-1, 10, inputs.shape[-1]),
        ],
        dim=1,
    )  # (rows, 2, 10, D)
    return image_grid(pairs.reshape(-1, inputs.shape[-1]), image_shape, ncol=10, title=title)
