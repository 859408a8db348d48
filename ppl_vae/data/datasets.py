"""Image datasets as in-memory tensors: ``digits``, ``mnist`` and ``fashion-mnist``.

:func:`load` returns a :class:`Dataset` of three :class:`Split` objects (train, validation,
test), each holding images flattened to ``(N, D)`` floats in [0, 1] and int64 labels. The
validation split is carved from the training set with a permutation seeded by ``seed``; the
test split never depends on ``seed``.

Binarisation (for Bernoulli likelihoods):

- ``"none"``: grey levels in [0, 1].
- ``"static"``: every split drawn once, x ~ Bernoulli(grey level). Train and validation use
  a generator seeded by ``seed``; the test split uses a fixed generator, so it is the same
  set for every seed and for both binarised modes.
- ``"dynamic"``: the training images stay grey and :func:`batches` draws a fresh
  Bernoulli sample every epoch (``Dataset.train_batches`` does this for you); the
  validation and test splits are binarised once, exactly as in ``"static"``, which is the
  usual protocol for reporting a test NLL.

Fashion-MNIST and MNIST are read from IDX files (gzipped or not), looked for in order in:
the ``data_dir`` argument, ``$PPL_VAE_DATA``, the Debian package's folder
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``; Fashion-MNIST
only) and the user cache ``~/.cache/ppl-vae/<name>`` (filled by :func:`download`). In each
folder the files may also sit in ``<name>/`` or in torchvision's ``FashionMNIST/raw/`` or
``MNIST/raw/``. Every header is checked before any byte is trusted, so a corrupt, truncated
or mismatched file raises :class:`~ppl_vae.errors.DataError` naming the file and the fix.

``digits`` is scikit-learn's 8x8 digits set (1,797 images, grey levels 0..16 scaled to
[0, 1]); it ships with scikit-learn, so it needs no files and no network.
"""

from __future__ import annotations

import gzip
import math
import numbers
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, NoReturn, overload

import numpy as np
import torch
from torch import Tensor

from ppl_vae.errors import DataError, DatasetNotFoundError

__all__ = [
    "BINARIZE_MODES",
    "DATASETS",
    "DATA_ENV_VAR",
    "DEBIAN_DIRS",
    "Dataset",
    "Split",
    "batches",
    "binarize",
    "cache_dir",
    "default_search_dirs",
    "download",
    "from_tensors",
    "load",
    "read_idx",
]

BinarizeMode = Literal["none", "static", "dynamic"]

DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "mnist")
"""Names accepted by :func:`load`."""

BINARIZE_MODES: tuple[str, ...] = ("none", "static", "dynamic")
"""Values accepted for ``binarize``."""

DATA_ENV_VAR = "PPL_VAE_DATA"
"""Environment variable naming a folder that holds the IDX files."""

DEBIAN_DIRS: dict[str, Path] = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
"""Where Debian packages install a dataset, by dataset name."""

_DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}
_TORCHVISION_NAMES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_PRETTY_NAMES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "digits": "digits"}
_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}

# The four IDX files of an MNIST-style dataset, by role, without the optional ".gz".
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, columns)
_IDX_LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)
_IDX_MAX_BYTES = 1 << 30  # far above MNIST's 47 MB; guards against absurd headers and gzip bombs
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
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
    and ``source``, where the data was read from."""

    name: str
    image_shape: tuple[int, int, int]
    binarize: str
    train: Split
    validation: Split
    test: Split
    source: str

    @property
    def data_dim(self) -> int:
        """Number of values in one flattened image (C * H * W)."""
        return math.prod(self.image_shape)

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
# Binarisation and batching
# --------------------------------------------------------------------------------------------


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
    n = int(images.shape[0])
    order = None
    label_order = None
    if shuffle:
        device = generator.device if generator is not None else images.device
        order = torch.randperm(n, generator=generator, device=device).to(images.device)
        if labels is not None:
            label_order = order.to(labels.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        if order is None:
            x = images[start:end]
            y = labels[start:end] if labels is not None else None
        else:
            x = images.index_select(0, order[start:end])
            y = labels.index_select(0, label_order[start:end]) if labels is not None else None
        if dynamic_binarize:
            x = _bernoulli(x, generator)
        yield x if y is None else (x, y)


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------


def read_idx(
    path: str | os.PathLike[str],
    kind: Literal["images", "labels"],
    *,
    fix: str | None = None,
) -> Tensor:
    """Read one IDX file, gzipped or not, checking its header and size first: ``"images"``
    gives uint8 (N, H, W), ``"labels"`` uint8 (N,). Any defect raises DataError naming the
    file and ``fix`` (what to do about it)."""
    if kind not in ("images", "labels"):
        raise DataError(f"kind must be 'images' or 'labels', got {kind!r}")
    path = Path(path)
    fix = fix or "replace it with a good copy (re-install the package or re-download the file)"

    def fail(problem: str) -> NoReturn:
        raise DataError(f"IDX {kind} file {path} {problem}; {fix}")

    try:
        raw = open(path, "rb")  # closed by the "with raw" below
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"IDX {kind} file {path} does not exist; {fix}") from exc
    except OSError as exc:
        fail(f"cannot be opened ({type(exc).__name__}: {exc})")
    try:
        with raw:
            if raw.read(2) == _GZIP_MAGIC:
                raw.seek(0)
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    payload, dims = _read_idx_stream(stream, kind, fail, file_size=None)
            else:
                raw.seek(0)
                size = os.fstat(raw.fileno()).st_size
                payload, dims = _read_idx_stream(raw, kind, fail, file_size=size)
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        fail(f"cannot be read or decompressed ({type(exc).__name__}: {exc})")
    return torch.frombuffer(payload, dtype=torch.uint8).view(*dims)


def _read_idx_stream(
    stream: IO[bytes],
    kind: str,
    fail: Callable[[str], NoReturn],
    *,
    file_size: int | None,
) -> tuple[bytearray, tuple[int, ...]]:
    """Check an IDX header and read exactly the payload it promises, never more than
    ``_IDX_MAX_BYTES``; ``file_size`` (uncompressed files only) is checked before reading."""
    head = _read_up_to(stream, 4)
    if not head:
        fail("is empty")
    if len(head) < 4:
        fail(f"is truncated: {len(head)} bytes, shorter than the 4-byte IDX magic number")
    magic = struct.unpack(">I", head)[0]
    expected = _IDX_IMAGE_MAGIC if kind == "images" else _IDX_LABEL_MAGIC
    if magic != expected:
        if magic in (_IDX_IMAGE_MAGIC, _IDX_LABEL_MAGIC):
            other = "images" if magic == _IDX_IMAGE_MAGIC else "labels"
            fail(f"holds {other}, not {kind} (magic number 0x{magic:08X})")
        fail(
            f"has magic number 0x{magic:08X}, expected 0x{expected:08X}; "
            "it is not an IDX file of unsigned bytes"
        )
    ndim = magic & 0xFF
    dims_bytes = _read_up_to(stream, 4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        fail(f"is truncated inside its header ({4 + len(dims_bytes)} of {4 + 4 * ndim} bytes)")
    dims = struct.unpack(f">{ndim}I", dims_bytes)
    if any(d == 0 for d in dims):
        fail(f"has a zero dimension in its header {dims}; it holds no data")
    n_bytes = math.prod(dims)
    if n_bytes > _IDX_MAX_BYTES:
        fail(f"has header dimensions {dims} promising {n_bytes} bytes, more than any dataset here")
    header_size = 4 + 4 * ndim
    if file_size is not None:
        if file_size < header_size + n_bytes:
            fail(
                f"is truncated: its header promises {n_bytes} data bytes {dims}, "
                f"the file holds {file_size - header_size}"
            )
        if file_size > header_size + n_bytes:
            fail(
                f"has {file_size - header_size - n_bytes} unexpected bytes after the "
                f"{n_bytes} data bytes its header promises {dims}"
            )
        payload = bytearray(n_bytes)
        got = _read_into(stream, payload)
    else:
        payload = bytearray()
        while len(payload) < n_bytes:  # grow with the data actually there: no huge allocation
            chunk = stream.read(min(_CHUNK, n_bytes - len(payload)))
            if not chunk:
                break
            payload += chunk
        got = len(payload)
    if got < n_bytes:
        fail(f"is truncated: its header promises {n_bytes} data bytes {dims}, the file holds {got}")
    if stream.read(1):  # for gzip, reaching the end also checks the CRC
        fail(f"has unexpected bytes after the {n_bytes} data bytes its header promises {dims}")
    return payload, dims


def _read_up_to(stream: IO[bytes], n: int) -> bytes:
    """Read n bytes, fewer only at the end of the stream."""
    parts = []
    remaining = n
    while remaining > 0:
        part = stream.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _read_into(stream: IO[bytes], buffer: bytearray) -> int:
    """Fill ``buffer`` from ``stream``; return how many bytes were read."""
    view = memoryview(buffer)
    got = 0
    while got < len(buffer):
        n = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


# --------------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key.replace("-", ""), key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def cache_dir(name: str) -> Path:
    """The user cache folder of a dataset: ``$XDG_CACHE_HOME/ppl-vae/<name>``, by default
    ``~/.cache/ppl-vae/<name>``; :func:`download` puts files there."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "ppl-vae" / _canonical(name)


def default_search_dirs(name: str) -> list[Path]:
    """Folders searched after ``data_dir`` and ``$PPL_VAE_DATA``: the Debian package's
    folder (if the dataset has one), then the user cache."""
    name = _canonical(name)
    dirs = [DEBIAN_DIRS[name]] if name in DEBIAN_DIRS else []
    dirs.append(cache_dir(name))
    return dirs


def _search_dirs(name: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.extend(default_search_dirs(name))
    return dirs


def _candidates(name: str, base: Path) -> list[Path]:
    """Folders under one search folder where the four files may sit. The named subfolders
    come first: MNIST and Fashion-MNIST files have the same names, so a folder holding
    both sets must keep them apart."""
    return [base / name, base / _TORCHVISION_NAMES[name] / "raw", base]


def _locate(name: str, data_dir: str | os.PathLike[str] | None) -> dict[str, Path]:
    """The four IDX files of the first folder that holds them all; else DatasetNotFoundError."""
    searched: list[Path] = []
    partial: list[str] = []
    for base in _search_dirs(name, data_dir):
        searched.append(base)
        for folder in _candidates(name, base):
            if not folder.is_dir():
                continue
            found: dict[str, Path] = {}
            for role, stem in _IDX_FILES.items():
                for filename in (stem, stem + ".gz"):  # prefer the unpacked file
                    if (folder / filename).is_file():
                        found[role] = folder / filename
                        break
            if len(found) == len(_IDX_FILES):
                return found
            if found:
                missing = [_IDX_FILES[r] for r in _IDX_FILES if r not in found]
                partial.append(f"  {folder} lacks {', '.join(missing)}")
    raise DatasetNotFoundError(_not_found_message(name, searched, partial))


def _not_found_message(name: str, searched: list[Path], partial: list[str]) -> str:
    pretty = _PRETTY_NAMES[name]
    files = ", ".join(_IDX_FILES.values())
    lines = [
        f"{pretty} was not found. Looked for {files} (each may end in .gz), in these folders "
        f"and in their {name}/ and {_TORCHVISION_NAMES[name]}/raw/ subfolders:",
        *(f"  {d}" for d in searched),
    ]
    if partial:
        lines += ["Incomplete copies:", *partial]
    ways = []
    if name in _DEBIAN_PACKAGES:
        ways.append(
            f"apt-get install {_DEBIAN_PACKAGES[name]}   "
            f"(Debian/Ubuntu; installs to {DEBIAN_DIRS[name]})"
        )
    ways.append(f"--data-dir DIR or {DATA_ENV_VAR}=DIR, with DIR a folder holding the IDX files")
    ways.append(f"ppl-vae download {name}   (needs internet; saves to {cache_dir(name)})")
    lines.append(f"Get it in one of these {len(ways)} ways:")
    lines += [f"  {i}. {way}" for i, way in enumerate(ways, 1)]
    return "\n".join(lines)


def _fix_for(name: str, path: Path) -> str:
    debian = DEBIAN_DIRS.get(name)
    if debian is not None and debian in path.parents:
        return f"re-install the package: apt-get install --reinstall {_DEBIAN_PACKAGES[name]}"
    return f"re-download it (ppl-vae download {name}) or replace it with a good copy"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _generator(seed: int, stream: int) -> torch.Generator:
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
    fixed 20% of its 1,797 images. See the module docstring for where files are looked for
    and for ``binarize``.
    """
    key = _canonical(name)
    if key == "digits":
        return _load_digits(binarize, validation_size, seed, device, dtype)
    files = _locate(key, data_dir)
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
    )


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
) -> Dataset:
    """Build a Dataset from (images, labels) pairs, images (N, D) or (N, C, H, W) floats in
    [0, 1]: checks them, carves the validation split, binarises as :func:`load` does."""
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
    )


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def download(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Download MNIST or Fashion-MNIST with torchvision (needs internet) into ``root``, by
    default :func:`cache_dir`, where :func:`load` finds it; return the folder of the files."""
    key = _canonical(name)
    if key == "digits":
        raise DataError("'digits' ships with scikit-learn; there is nothing to download")
    root = Path(root).expanduser() if root is not None else cache_dir(key)
    from torchvision import datasets  # local import: only this path needs torchvision

    cls = datasets.FashionMNIST if key == "fashion-mnist" else datasets.MNIST
    root.mkdir(parents=True, exist_ok=True)
    try:
        cls(str(root), train=True, download=True)  # fetches train and test files alike
    except (OSError, RuntimeError) as exc:
        message = _not_found_message(key, [root], [])
        raise DatasetNotFoundError(
            f"downloading {_PRETTY_NAMES[key]} into {root} failed ({exc}).\n{message}"
        ) from exc
    return root / _TORCHVISION_NAMES[key] / "raw"
