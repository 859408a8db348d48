"""Binarisation and batches of in-memory images.

:func:`binarize` draws x ~ Bernoulli(p) per value, as ``1[u < p]`` with u ~ U[0, 1), for grey
levels p in [0, 1]. :func:`batches` is one epoch over the rows of a tensor: consecutive
``batch_size`` slices of one random permutation (or of the rows in order), each optionally
replaced by a fresh Bernoulli draw ("dynamic" binarisation).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import overload

import torch
from torch import Tensor

from ppl_vae.errors import DataError

__all__ = ["batches", "binarize"]


def binarize(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One Bernoulli draw per value: 1 with probability ``images`` (grey levels in [0, 1]),
    else 0; same shape, dtype and device. Values outside [0, 1] are not checked here."""
    return _bernoulli(images, generator)


def _bernoulli(images: Tensor, generator: torch.Generator | None) -> Tensor:
    # Named apart from binarize(), which the ``binarize`` arguments of load() shadow.
    if not images.is_floating_point():
        raise DataError(
            f"binarize expects floating-point grey levels in [0, 1], got dtype {images.dtype}; "
            "convert with images.float() / 255 (or the right scale) first"
        )
    device = generator.device if generator is not None else images.device
    uniform = torch.rand(images.shape, generator=generator, device=device, dtype=images.dtype)
    # In place: u < p written as 0/1 in u's own float storage (half the time of a bool
    # comparison converted back to float).
    return uniform.to(images.device).lt_(images)


@overload
def batches(
    images: Tensor,
    batch_size: int,
    *,
    labels: None = None,
    shuffle: bool = ...,
    generator: torch.Generator | None = ...,
    dynamic_binarize: bool = ...,
    drop_last: bool = ...,
) -> Iterator[Tensor]: ...


@overload
def batches(
    images: Tensor,
    batch_size: int,
    *,
    labels: Tensor,
    shuffle: bool = ...,
    generator: torch.Generator | None = ...,
    dynamic_binarize: bool = ...,
    drop_last: bool = ...,
) -> Iterator[tuple[Tensor, Tensor]]: ...


def batches(
    images: Tensor,
    batch_size: int,
    *,
    labels: Tensor | None = None,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    dynamic_binarize: bool = False,
    drop_last: bool = False,
) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor]]:
    """One epoch over ``images`` (and ``labels``, if given: then yields (images, labels)) in
    batches along dim 0, in the order of one random permutation (or in order if not shuffled).

    The last batch is smaller when ``batch_size`` does not divide N, unless ``drop_last``.
    ``dynamic_binarize`` replaces each batch by a Bernoulli draw (see :func:`binarize`).
    ``generator`` drives both the permutation and the draws; for CUDA tensors, a generator
    on the same device avoids a host-to-device copy per batch. Unshuffled, un-binarised
    batches are views of ``images``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if images.dim() < 1:
        raise DataError("batches needs a tensor with a leading batch dimension, got a scalar")
    n = int(images.shape[0])
    if labels is not None and (labels.dim() < 1 or int(labels.shape[0]) != n):
        raise DataError(
            f"labels must have one entry per image: {n} images but labels of shape "
            f"{tuple(labels.shape)}"
        )
    return _epoch(images, labels, batch_size, shuffle, generator, dynamic_binarize, drop_last)


def _epoch(
    images: Tensor,
    labels: Tensor | None,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    dynamic_binarize: bool,
    drop_last: bool,
) -> Iterator:
    # A generator function: the permutation is drawn when the first batch is asked for.
    n = int(images.shape[0])
    order = None
    if shuffle:
        device = generator.device if generator is not None else images.device
        order = torch.randperm(n, generator=generator, device=device).to(images.device)
    stop = n - n % batch_size if drop_last else n
    if stop == 0:  # split() would still give one empty batch
        return
    xs = _pieces(images, order, stop, batch_size)
    ys = itertools.repeat(None) if labels is None else _pieces(labels, order, stop, batch_size)
    for x, y in zip(xs, ys, strict=False):  # without labels, ys is endless
        if dynamic_binarize:
            x = _bernoulli(x, generator)
        yield x if y is None else (x, y)


def _pieces(values: Tensor, order: Tensor | None, stop: int, batch_size: int) -> Iterator[Tensor]:
    """The first ``stop`` rows of ``values`` (taken in ``order`` if given) in ``batch_size``
    pieces: views when unordered; gathered one piece at a time when ordered, so an epoch
    never holds a shuffled copy of the whole tensor."""
    if order is None:
        return iter(values[:stop].split(batch_size))
    index = order[:stop].to(values.device)
    return (values.index_select(0, part) for part in index.split(batch_size))
