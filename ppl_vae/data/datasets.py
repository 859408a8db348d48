"""Image datasets in memory: the :class:`Split` and :class:`Dataset` containers, :func:`load`
for ``digits``, ``mnist`` and ``fashion-mnist``, and :func:`from_tensors` for any images.

A Dataset holds three Splits (train, validation, test), each with images flattened to
``(N, D)`` floats in [0, 1] and int64 labels. The validation split is carved from the
training set with a permutation seeded by ``seed``; the test split never depends on ``seed``.

Binarisation (for Bernoulli likelihoods):

- ``"none"``: grey levels in [0, 1].
- ``"static"``: every split drawn once, x ~ Bernoulli(grey level). Train and validation use
  a generator seeded by ``seed``; the test split uses a fixed generator, so it is the same
  set for every seed and for both binarised modes.
- ``"dynamic"``: the training images stay grey and
  :func:`~ppl_vae.data.batching.batches` draws a fresh Bernoulli sample every epoch
  (``Dataset.train_batches`` does this for you); the validation and test splits are
  binarised once, exactly as in ``"static"``, which is the usual protocol for reporting a
  test NLL.

Fashion-MNIST and MNIST are read from IDX files (:mod:`ppl_vae.data.idx`) found as
:mod:`ppl_vae.data.files` describes; a missing dataset raises
:class:`~ppl_vae.errors.DatasetNotFoundError` saying how to get it. ``digits`` is
scikit-learn's 8x8 digits set (1,797 images, grey levels 0..16 scaled to [0, 1]); it ships
with scikit-learn, so it needs no files and no network.

Labels are class indices 0..K-1, and every Dataset names its classes (``class_names[k]``
names label k): :data:`CLASS_NAMES` gives them for the datasets :func:`load` knows.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ppl_vae.data.batching import _bernoulli, batches
from ppl_vae.data.files import _PRETTY_NAMES, _canonical, _fix_for, _locate
from ppl_vae.data.idx import read_idx
from ppl_vae.errors import DataError

__all__ = ["BINARIZE_MODES", "CLASS_NAMES", "Dataset", "Split", "from_tensors", "load"]

BinarizeMode = Literal["none", "static", "dynamic"]

BINARIZE_MODES: tuple[str, ...] = ("none", "static", "dynamic")
"""Values accepted for ``binarize``."""

_DIGIT_NAMES = tuple(str(k) for k in range(10))

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "digits": _DIGIT_NAMES,
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "mnist": _DIGIT_NAMES,
}
"""The class names of each dataset :func:`load` knows, by dataset name: entry k names label k."""

_MNIST_SHAPE = (1, 28, 28)
_MNIST_VALIDATION = 10_000
_N_CLASSES = 10

_DIGITS_SHAPE = (1, 8, 8)
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_VALIDATION = 0.1

# Independent random streams, seeded with (seed, stream) through numpy's SeedSequence.
_STREAM_VALIDATION_SPLIT = 1
_STREAM_BINARIZE_TRAIN = 2
_STREAM_BINARIZE_TEST = 3
_STREAM_DIGITS_TEST_SPLIT = 4
_FIXED_SEED = 0  # for what must not depend on the user's seed: test splits and their binarisation


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Split:
    """One split: ``images`` (N, D) floats in [0, 1], ``labels`` (N,) int64, and ``shape``,
    the (C, H, W) shape of one image (D = C * H * W)."""

    images: Tensor
    labels: Tensor
    shape: tuple[int, int, int]

    def __len__(self) -> int:
        """Number of images."""
        return int(self.images.shape[0])

    def unflatten(self) -> Tensor:
        """The images as an (N, C, H, W) view."""
        return self.images.view(len(self), *self.shape)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset in memory: three splits, the (C, H, W) image shape, the binarisation mode,
    ``source``, where the data was read from, and ``class_names``, one per class (entry k
    names label k)."""

    name: str
    image_shape: tuple[int, int, int]
    binarize: str
    train: Split
    validation: Split
    test: Split
    source: str
    class_names: tuple[str, ...]

    @property
    def data_dim(self) -> int:
        """Number of values in one flattened image (C * H * W)."""
        return math.prod(self.image_shape)

    @property
    def num_classes(self) -> int:
        """Number of classes K, labels being 0..K-1 (some may be absent from a small set)."""
        return len(self.class_names)

    def train_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[Tensor]:
        """One epoch of training images in batches; in ``"dynamic"`` mode each batch is a
        fresh Bernoulli draw."""
        return batches(
            self.train.images,
            batch_size,
            shuffle=shuffle,
            generator=generator,
            dynamic_binarize=self.binarize == "dynamic",
            drop_last=drop_last,
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for stream ``stream`` of ``seed``. Its 64-bit SeedSequence state
    (``ppl_vae.rng.sub_seed`` gives 32 bits) fixes every split and binarisation drawn here."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def load(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    binarize: BinarizeMode = "none",
    validation_size: int | float | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load ``"digits"``, ``"mnist"`` or ``"fashion-mnist"`` into memory as a Dataset.

    ``validation_size`` (images, or a fraction of the training set) is carved from the
    training set by a permutation seeded by ``seed``; by default 10,000 for MNIST and
    Fashion-MNIST (leaving 50,000 to train) and 10% for digits. The digits test split is a
    fixed 20% of its 1,797 images. See :mod:`ppl_vae.data.files` for where files are looked
    for and the module docstring for ``binarize``.
    """
    key = _canonical(name)
    if key == "digits":
        return _load_digits(binarize, validation_size, seed, device, dtype)
    files = _locate(key, data_dir)
    tensors = _read_mnist(key, files)

    def grey(images: Tensor) -> Tensor:
        return images.reshape(images.shape[0], -1).to(dtype).div_(255)

    return from_tensors(
        key,
        (grey(tensors["train_images"]), tensors["train_labels"].long()),
        (grey(tensors["test_images"]), tensors["test_labels"].long()),
        image_shape=_MNIST_SHAPE,
        binarize=binarize,
        validation_size=_MNIST_VALIDATION if validation_size is None else validation_size,
        seed=seed,
        device=device,
        dtype=dtype,
        source=str(files["train_images"].parent),
        class_names=CLASS_NAMES[key],
    )


def _read_mnist(key: str, files: dict[str, Path]) -> dict[str, Tensor]:
    """The four uint8 tensors of an MNIST-style dataset, by role, after checking that each
    split's images and labels agree in count, that images are 28x28 and labels 0..9."""
    fixes = {role: _fix_for(key, path) for role, path in files.items()}
    tensors = {
        role: read_idx(path, "images" if role.endswith("images") else "labels", fix=fixes[role])
        for role, path in files.items()
    }
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        image_path, label_path = files[f"{split}_images"], files[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{image_path} holds {images.shape[0]} images but {label_path} holds "
                f"{labels.shape[0]} labels; they must match. {fixes[f'{split}_images']}"
            )
        if tuple(images.shape[1:]) != _MNIST_SHAPE[1:]:
            raise DataError(
                f"{image_path} holds {tuple(images.shape[1:])} images, {_PRETTY_NAMES[key]} "
                f"images are {_MNIST_SHAPE[1]}x{_MNIST_SHAPE[2]}; {fixes[f'{split}_images']}"
            )
        top = int(labels.max())
        if top >= _N_CLASSES:
            raise DataError(
                f"{label_path} holds label {top}, {_PRETTY_NAMES[key]} labels are "
                f"0..{_N_CLASSES - 1}; {fixes[f'{split}_labels']}"
            )
    return tensors


def _load_digits(
    binarize: BinarizeMode,
    validation_size: int | float | None,
    seed: int,
    device: str | torch.device,
    dtype: torch.dtype,
) -> Dataset:
    from sklearn.datasets import load_digits  # local import: scikit-learn is slow to import

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.data, dtype=np.float64) / 16.0).to(dtype)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    n = images.shape[0]
    n_test = round(_DIGITS_TEST_FRACTION * n)
    order = torch.randperm(n, generator=_generator(_FIXED_SEED, _STREAM_DIGITS_TEST_SPLIT))
    test_idx, train_idx = order[:n_test].sort().values, order[n_test:].sort().values
    return from_tensors(
        "digits",
        (images[train_idx], labels[train_idx]),
        (images[test_idx], labels[test_idx]),
        image_shape=_DIGITS_SHAPE,
        binarize=binarize,
        validation_size=_DIGITS_VALIDATION if validation_size is None else validation_size,
        seed=seed,
        device=device,
        dtype=dtype,
        source="sklearn.datasets.load_digits",
        class_names=CLASS_NAMES["digits"],
    )


def _check_images(
    images: Tensor, split: str, image_shape: tuple[int, int, int], dtype: torch.dtype
) -> Tensor:
    """Check floating point and size, convert to ``dtype`` on the CPU, flatten to (N, D),
    then check finite and in [0, 1]."""
    d = math.prod(image_shape)
    if images.dim() < 1 or math.prod(images.shape[1:]) != d:
        raise DataError(
            f"images of split {split!r} have shape {tuple(images.shape)}; expected (N, {d}) "
            f"or (N, {', '.join(map(str, image_shape))})"
        )
    if not images.is_floating_point():
        raise DataError(
            f"images of split {split!r} have dtype {images.dtype}; expected floats in [0, 1] "
            "(divide by the maximum grey level)"
        )
    images = images.detach().to("cpu", dtype).reshape(images.shape[0], d)
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(images).sum())
        n_inf = int((~finite).sum()) - n_nan
        first = int((~finite).any(dim=1).nonzero()[0, 0])
        raise DataError(
            f"images of split {split!r} contain {n_nan} NaN and {n_inf} infinite values "
            f"(first in image {first}); clean or drop those images"
        )
    if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
        raise DataError(
            f"images of split {split!r} range over [{float(images.min()):g}, "
            f"{float(images.max()):g}]; expected grey levels in [0, 1]"
        )
    return images


def _check_labels(labels: Tensor, split: str, n: int) -> Tensor:
    if labels.dim() != 1 or labels.shape[0] != n:
        raise DataError(
            f"labels of split {split!r} have shape {tuple(labels.shape)}; expected ({n},), "
            "one per image"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"labels of split {split!r} have dtype {labels.dtype}; expected integers")
    return labels.long()


def _class_names(
    class_names: Sequence[str] | None, train_y: Tensor, test_y: Tensor
) -> tuple[str, ...]:
    """The names of classes 0..K-1, checked against the labels: each label indexes a name."""
    for split, labels in (("train", train_y), ("test", test_y)):
        if labels.numel() and int(labels.min()) < 0:
            raise DataError(
                f"labels of split {split!r} include {int(labels.min())}; labels are class "
                "indices 0..K-1 (map them to 0, 1, ... first)"
            )
    # The training split holds at least one image (_validation_count checks it).
    top = max(int(y.max()) for y in (train_y, test_y) if y.numel())
    if class_names is None:
        return tuple(str(k) for k in range(top + 1))
    if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
        raise DataError(
            f"class_names must be a sequence of strings, one per class; got {class_names!r}"
        )
    names = tuple(class_names)
    if len(names) <= top:
        raise DataError(
            f"{len(names)} class_names for labels up to {top}: {top + 1} classes are present "
            f"(0..{top}); give one name per class"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"class_names repeat {repeated}; give each class its own name")
    return names


def _validation_count(validation_size: int | float, n_train: int) -> int:
    if isinstance(validation_size, bool) or not isinstance(validation_size, numbers.Real):
        raise DataError(f"validation_size must be an int or a fraction, got {validation_size!r}")
    if not isinstance(validation_size, numbers.Integral):
        if not 0.0 <= float(validation_size) < 1.0:
            raise DataError(
                f"a fractional validation_size must lie in [0, 1), got {validation_size}"
            )
        count = round(float(validation_size) * n_train)
    else:
        count = int(validation_size)
    if not 0 <= count < n_train:
        raise DataError(
            f"validation_size {validation_size!r} leaves no training images: the training set "
            f"has {n_train}; use a smaller validation_size"
        )
    return count


def from_tensors(
    name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    image_shape: tuple[int, int, int],
    binarize: BinarizeMode = "none",
    validation_size: int | float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    source: str = "tensors",
    class_names: Sequence[str] | None = None,
) -> Dataset:
    """Build a Dataset from (images, labels) pairs, images (N, D) or (N, C, H, W) floats in
    [0, 1] and labels class indices 0..K-1: checks them, carves the validation split,
    binarises as :func:`load` does.

    :param class_names: one distinct name per class, entry k naming label k; at least one
        more than the largest label (classes absent from the tensors may be named too). By
        default the labels' own values, ``"0"`` up to the largest label.
    """
    if binarize not in BINARIZE_MODES:
        raise DataError(f"binarize must be one of {', '.join(BINARIZE_MODES)}; got {binarize!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if not dtype.is_floating_point:
        raise DataError(f"dtype must be a floating-point dtype, got {dtype}")
    image_shape = tuple(int(s) for s in image_shape)  # type: ignore[assignment]
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise DataError(f"image_shape must be (C, H, W) of positive sizes, got {image_shape}")

    train_x = _check_images(train[0], "train", image_shape, dtype)
    test_x = _check_images(test[0], "test", image_shape, dtype)
    train_y = _check_labels(train[1].detach().cpu(), "train", train_x.shape[0])
    test_y = _check_labels(test[1].detach().cpu(), "test", test_x.shape[0])
    n_val = _validation_count(validation_size, train_x.shape[0])
    names = _class_names(class_names, train_y, test_y)

    order = torch.randperm(train_x.shape[0], generator=_generator(seed, _STREAM_VALIDATION_SPLIT))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values

    if binarize == "none":
        val_x = train_x[val_idx]
    else:
        # Draw the whole training set once, so that an image's draw does not depend on the
        # split, and validation is the same set in "static" and "dynamic" mode.
        drawn = _bernoulli(train_x, _generator(seed, _STREAM_BINARIZE_TRAIN))
        val_x = drawn[val_idx]
        if binarize == "static":
            train_x = drawn
        test_x = _bernoulli(test_x, _generator(_FIXED_SEED, _STREAM_BINARIZE_TEST))

    def split(x: Tensor, y: Tensor) -> Split:
        return Split(images=x.to(device), labels=y.to(device), shape=image_shape)

    return Dataset(
        name=name,
        image_shape=image_shape,
        binarize=binarize,
        train=split(train_x[train_idx], train_y[train_idx]),
        validation=split(val_x, train_y[val_idx]),
        test=split(test_x, test_y),
        source=source,
        class_names=names,
    )
