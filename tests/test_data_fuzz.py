"""Seeded fuzzing of the IDX reader: random and mutated files give a DataError or a
consistent tensor, never another exception."""

from __future__ import annotations

import gzip
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import ppl_vae.data as data
from ppl_vae.data import files as data_files
from ppl_vae.errors import DataError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def valid_images(rng: random.Random, n: int, h: int, w: int) -> bytes:
    return struct.pack(">IIII", 0x803, n, h, w) + rng.randbytes(n * h * w)


def valid_labels(rng: random.Random, n: int) -> bytes:
    return struct.pack(">II", 0x801, n) + bytes(rng.randrange(10) for _ in range(n))


def mutate(rng: random.Random, raw: bytes) -> bytes:
    """One random defect, or none (a valid file must still load)."""
    how = rng.choice(
        ["keep", "keep", "truncate", "header-flip", "any-flip", "append", "prepend", "shrink-dim"]
    )
    b = bytearray(raw)
    if how == "truncate":
        return bytes(b[: rng.randrange(len(b))])
    if how == "header-flip":
        i = rng.randrange(min(len(b), 16))
        b[i] ^= 1 << rng.randrange(8)
    elif how == "any-flip":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif how == "append":
        b += rng.randbytes(rng.randint(1, 20))
    elif how == "prepend":
        b[:0] = rng.randbytes(rng.randint(1, 8))
    elif how == "shrink-dim":
        b[7] = max(b[7] - 1, 0)
    return bytes(b)


def wrap(rng: random.Random, raw: bytes) -> bytes:
    """Store unpacked, gzipped, or gzipped and then damaged."""
    how = rng.choice(
        ["plain", "plain", "gzip", "gzip", "gzip-truncated", "gzip-flipped", "gzip-junk"]
    )
    if how == "plain":
        return raw
    packed = bytearray(gzip.compress(raw, compresslevel=rng.choice([1, 9])))
    if how == "gzip-truncated":
        return bytes(packed[: rng.randrange(len(packed))])
    if how == "gzip-flipped":
        packed[rng.randrange(len(packed))] ^= 1 << rng.randrange(8)
    elif how == "gzip-junk":
        packed += rng.randbytes(rng.randint(1, 30))
    return bytes(packed)


def unpacked(raw: bytes) -> bytes | None:
    """What the reader should see, computed independently; None if not decompressible."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error):
        return None


def check_success(tensor: torch.Tensor, raw: bytes, kind: str) -> None:
    """A file that was accepted must be a well-formed IDX file, read exactly."""
    content = unpacked(raw)
    assert content is not None
    ndim = 3 if kind == "images" else 1
    assert struct.unpack(">I", content[:4])[0] == (0x803 if kind == "images" else 0x801)
    dims = struct.unpack(f">{ndim}I", content[4 : 4 + 4 * ndim])
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == dims
    assert len(content) == 4 + 4 * ndim + tensor.numel()
    assert tensor.flatten().numpy().tobytes() == content[4 + 4 * ndim :]


def test_fuzz_read_idx(tmp_path: Path) -> None:
    rng = random.Random(0)
    path = tmp_path / "file"
    outcomes = {"ok": 0, "error": 0}
    for i in range(700):
        if i % 5 == 0:  # random bytes, sometimes with a plausible start
            kind = rng.choice(["images", "labels"])
            raw = rng.randbytes(rng.randint(0, 80))
            if rng.random() < 0.5:
                raw = bytes.fromhex(rng.choice(["00000803", "00000801", "1f8b"])) + raw
            if rng.random() < 0.3:
                raw = gzip.compress(raw)
        else:
            n = rng.randint(1, 4)
            made = rng.choice(["images", "labels"])
            if made == "images":
                base = valid_images(rng, n, rng.randint(1, 5), rng.randint(1, 5))
            else:
                base = valid_labels(rng, n)
            kind = made if rng.random() < 0.9 else {"images": "labels", "labels": "images"}[made]
            raw = wrap(rng, mutate(rng, base))
        path.write_bytes(raw)
        try:
            tensor = data.read_idx(path, kind)  # type: ignore[arg-type]
        except DataError as exc:
            assert str(path) in str(exc)
            outcomes["error"] += 1
        else:
            check_success(tensor, raw, kind)
            outcomes["ok"] += 1
    # Both outcomes must be well represented, or the fuzzing tests little.
    assert outcomes["ok"] > 40 and outcomes["error"] > 300, outcomes


def test_fuzz_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Damage one of the four files of a small dataset: load gives a DataError or a dataset."""
    monkeypatch.setattr(data_files, "default_search_dirs", lambda name: [])
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)
    rng = random.Random(1)
    np_rng = np.random.default_rng(1)
    outcomes = {"ok": 0, "error": 0}
    for i in range(60):
        folder = tmp_path / str(i)
        folder.mkdir()
        n_train, n_test = rng.randint(2, 5), rng.randint(1, 3)
        files = {
            "train_images": valid_images(rng, n_train, 28, 28),
            "train_labels": valid_labels(rng, n_train),
            "test_images": valid_images(rng, n_test, 28, 28),
            "test_labels": valid_labels(rng, n_test),
        }
        victim = rng.choice(sorted(files))
        files[victim] = mutate(rng, files[victim])
        for role, raw in files.items():
            gz = bool(np_rng.integers(2))
            name = FILES[role] + (".gz" if gz else "")
            (folder / name).write_bytes(gzip.compress(raw, compresslevel=1) if gz else raw)
        try:
            ds = data.load("mnist", data_dir=folder, validation_size=1, binarize="static")
        except DataError as exc:
            assert FILES[victim] in str(exc)
            outcomes["error"] += 1
        else:
            assert ds.train.images.shape[1] == 784
            assert (len(ds.train) + len(ds.validation), len(ds.test)) == (n_train, n_test)
            outcomes["ok"] += 1
    assert outcomes["ok"] > 5 and outcomes["error"] > 20, outcomes
