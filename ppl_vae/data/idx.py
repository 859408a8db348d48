"""The IDX file reader: MNIST-style images and labels, gzipped or not, checked before trusted.

An IDX file is a 4-byte big-endian magic number ``0x00000800 + ndim`` (0x08: unsigned bytes),
``ndim`` big-endian uint32 sizes, then ``prod(sizes)`` bytes in row-major order; nothing may
follow. :func:`read_idx` checks the magic, the sizes and the file's length against each other
before it allocates or reads the payload, so a corrupt, truncated, mismatched or absurd file
raises :class:`~ppl_vae.errors.DataError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Literal, NoReturn

import torch
from torch import Tensor

from ppl_vae.errors import DataError, DatasetNotFoundError

__all__ = ["read_idx"]

_IDX_IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, columns)
_IDX_LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)
_IDX_MAX_BYTES = 1 << 30  # far above MNIST's 47 MB; guards against absurd headers and gzip bombs
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


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
    ``_IDX_MAX_BYTES``; ``file_size`` (uncompressed files only) is checked before reading.

    ``stream`` is a buffered file or a GzipFile, whose ``read(n)`` returns fewer than n
    bytes only at the end of the data."""
    dims = _read_header(stream, kind, fail)
    n_bytes = math.prod(dims)
    if file_size is not None:
        header_size = 4 + 4 * len(dims)
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
        got = stream.readinto(payload)  # type: ignore[attr-defined]
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


def _read_header(stream: IO[bytes], kind: str, fail: Callable[[str], NoReturn]) -> tuple[int, ...]:
    """The sizes in an IDX header, after checking its magic number against ``kind``; sizes
    that hold no data or more than ``_IDX_MAX_BYTES`` are refused."""
    head = stream.read(4)
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
    dims_bytes = stream.read(4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        fail(f"is truncated inside its header ({4 + len(dims_bytes)} of {4 + 4 * ndim} bytes)")
    dims = struct.unpack(f">{ndim}I", dims_bytes)
    if any(d == 0 for d in dims):
        fail(f"has a zero dimension in its header {dims}; it holds no data")
    n_bytes = math.prod(dims)
    if n_bytes > _IDX_MAX_BYTES:
        fail(f"has header dimensions {dims} promising {n_bytes} bytes, more than any dataset here")
    return dims
