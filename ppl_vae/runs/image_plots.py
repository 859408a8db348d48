"""Figures of images, each a function from data to a matplotlib Figure, and :func:`save`.

Images are (N, D) rows with values in [0, 1], D = C x H x W: samples E[x | z], z ~ N(0, I),
from the prior, reconstructions E[x | z = mu(x)] beside their inputs, interpolations
decoded along straight lines in z, and images by class, one row per class named at its left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid

__all__ = [
    "class_rows_figure",
    "image_grid",
    "interpolations_figure",
    "reconstructions_figure",
    "save",
]


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


def class_rows_figure(
    images: torch.Tensor,
    image_shape: Sequence[int],
    class_names: Sequence[str],
    *,
    title: str = "",
) -> Figure:
    """Images by class: ``images`` (C, n, D) with values in [0, 1], row c showing the n
    images of class c with ``class_names[c]`` at its left (the row's y tick label)."""
    images = torch.as_tensor(images)
    shape = tuple(int(s) for s in image_shape)
    d = math.prod(shape)
    if len(shape) not in (2, 3) or images.dim() != 3 or images.shape[-1] != d:
        raise ValueError(
            f"images must be (classes, n, D) with D = {' x '.join(map(str, shape))} = {d} "
            f"for image_shape {shape}; got shape {tuple(images.shape)}"
        )
    n_rows, n_cols = int(images.shape[0]), int(images.shape[1])
    if n_rows == 0 or n_cols == 0:
        raise ValueError(
            f"images must hold at least one class and one image each, got {n_rows} x {n_cols}"
        )
    if isinstance(class_names, str):
        raise ValueError(f"class_names must be a sequence of names, not one string {class_names!r}")
    names = list(class_names)
    if len(names) != n_rows:
        raise ValueError(
            f"class_names must name each of the {n_rows} rows of images, one name a row; "
            f"got {len(names)} names"
        )
    canvas = _tile(images.reshape(-1, d), shape, n_cols)
    h = shape[-2]
    width = n_cols * 0.6 + 1.2  # room at the left for the names
    fig, ax = plt.subplots(figsize=(width, canvas.shape[0] / canvas.shape[1] * n_cols * 0.6))
    ax.imshow(canvas.numpy(), cmap="gray_r" if canvas.dim() == 2 else None, vmin=0, vmax=1)
    # Row c's tiles cover pixels 1 + c (h + 1) .. c (h + 1) + h; its centre is between them.
    ax.set_yticks([1 + c * (h + 1) + (h - 1) / 2 for c in range(n_rows)])
    ax.set_yticklabels([str(name) for name in names], fontsize=8)
    ax.set_xticks([])
    ax.tick_params(axis="y", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=9)
    return fig
