"""Figures of images, each a function from data to a matplotlib Figure, and :func:`save`.

Images are (N, D) rows with values in [0, 1], D = C x H x W: samples E[x | z], z ~ N(0, I),
from the prior, reconstructions E[x | z = mu(x)] beside their inputs, and interpolations
decoded along straight lines in z.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid

__all__ = ["image_grid", "interpolations_figure", "reconstructions_figure", "save"]


def save(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (parents created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def _tile(images: torch.Tensor, image_shape: Sequence[int], ncol: int) -> torch.Tensor:
    """(N, D) images -> one (H', W') or (H', W', C) canvas, ``ncol`` tiles a row, with a
    1-pixel line of value 1 between the tiles and around them."""
    c, h, w = (1, *image_shape) if len(image_shape) == 2 else tuple(image_shape)
    tiles = images.detach().float().cpu().clamp(0, 1).reshape(-1, c, h, w)
    # make_grid repeats a single channel three times: keep one.
    canvas = make_grid(tiles, nrow=ncol, padding=1, pad_value=1.0)
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


def interpolations_figure(
    rows: torch.Tensor,
    image_shape: Sequence[int],
    *,
    title: str = "decoded z on straight lines between two test images' codes",
) -> Figure:
    """Latent interpolations: ``rows`` (pairs, steps, D) decoded images, one line per pair,
    from the first image's code (left) to the second's (right)."""
    rows = torch.as_tensor(rows)
    if rows.dim() == 2:
        rows = rows[None]
    if rows.dim() != 3 or rows.shape[1] < 2:
        raise ValueError(f"rows must be (pairs, steps >= 2, D), got shape {tuple(rows.shape)}")
    return image_grid(
        rows.reshape(-1, rows.shape[-1]), image_shape, ncol=rows.shape[1], title=title
    )
