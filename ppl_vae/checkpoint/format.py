"""The checkpoint file: one safetensors file, written atomically, read without unpickling
anything (what it holds is :mod:`ppl_vae.checkpoint.contents`).

Tensors go into the safetensors payload; everything else into one JSON string in its
metadata, next to the digest

    sha256 = SHA-256(UTF-8(JSON body) || tensor bytes)

(the tensor bytes being everything after the header), so a flipped bit anywhere but in the
header's own layout is caught. Loading parses the header before trusting any byte, checks the
digest, and refuses anything that is not a ppl-vae safetensors file (a pickle or a
``torch.save`` archive is reported as such and never opened). The header is parsed here
because safetensors reads metadata only through ``safe_open`` on a path, which would read
the file a second time and report defects in its own words.

Writing goes through :func:`ppl_vae.atomic.write_atomically`: a crash leaves either the old
checkpoint or the new one under the final name, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from ppl_vae.atomic import write_atomically
from ppl_vae.checkpoint.contents import Checkpoint, checkpoint_from_contents, collect_contents
from ppl_vae.errors import CheckpointError, CheckpointWriteError

__all__ = ["FORMAT", "load_checkpoint", "remove_stale_temporaries", "save_checkpoint"]

FORMAT = "ppl-vae-checkpoint"
"""Value of the ``format`` metadata entry that marks a ppl-vae checkpoint."""

_META_FORMAT = "format"
_META_BODY = "ppl_vae"  # the JSON string with everything that is not a tensor
_META_SHA256 = "sha256"  # of the JSON string's UTF-8 bytes followed by the tensor bytes
_MAX_HEADER = 100 << 20  # far above any real header; guards against absurd lengths
_PICKLE_PROTO = 0x80
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format (pickles inside)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    modules: Mapping[str, nn.Module] | None = None,
    param_store: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    counters: Mapping[str, Any] | None = None,
    config_digest: str | None = None,
    rng: bool = True,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint to ``path`` atomically and return the path.

    :param modules: networks by the name they are registered under (``pyro.module(name,
        net)``); their weights are stored once, through the param store when it holds them.
    :param param_store: store Pyro's param store (unconstrained values and constraints).
    :param optimizer: a ``torch.optim.Optimizer``; its parameters are recorded by param-store
        name, so :func:`restore` can check it is given an optimizer over the same parameters.
    :param scheduler: a ``torch.optim.lr_scheduler`` object (anything with ``state_dict``).
    :param counters: plain JSON (step, epoch, position in the data order, ...).
    :param config_digest: the digest of the run's configuration (text), which a trainer
        compares before it continues from the checkpoint; the configuration itself is the
        run's to keep (``fit`` writes it to ``config.json``).
    :param rng: store the torch (CPU, and CUDA when in use), numpy and ``random`` states.
    :param state: a trainer's own state: string keys, values tensors (e.g. a
        ``torch.Generator``'s ``get_state()``), numbers, strings, lists, tuples and dicts of
        them; read back as :attr:`Checkpoint.state`.
    :raises CheckpointError: when a value cannot be stored.
    :raises CheckpointWriteError: (a :class:`CheckpointError`) when the file cannot be written
        (missing or read-only folder, full disk); the previous file under ``path``, if any,
        is then left as it was, and no temporary file remains.
    """
    path = Path(path)
    body, tensors = collect_contents(
        modules=modules or {},
        param_store=param_store,
        optimizer=optimizer,
        scheduler=scheduler,
        counters=counters or {},
        config_digest=config_digest,
        rng=rng,
        state=state,
    )
    try:
        text = json.dumps(body)
        meta = {_META_FORMAT: FORMAT, _META_BODY: text}
        draft = safetensors.torch.save(tensors, meta)
        # The tensor bytes do not depend on the metadata: digest them, then write the header
        # again with the digest in it.
        meta[_META_SHA256] = _digest(text, draft[_data_start(draft) :])
        payload = safetensors.torch.save(tensors, meta)
    except (TypeError, ValueError, safetensors.SafetensorError) as exc:
        raise CheckpointError(f"cannot encode checkpoint {path}: {exc}") from exc
    write_atomically(path, payload, what="checkpoint", error=CheckpointWriteError)
    return path


def _data_start(payload: bytes) -> int:
    """Offset of the tensor bytes: after the 8-byte header length and the header."""
    return 8 + struct.unpack("<Q", payload[:8])[0]


def _digest(text: str, data: bytes) -> str:
    digest = hashlib.sha256(text.encode("utf-8"))
    digest.update(data)
    return digest.hexdigest()


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that :func:`save_checkpoint` leaves when its process is
    killed mid-write (``.NAME.*.tmp`` in ``folder``), and return their paths. Call it only
    when no other process is writing checkpoints to ``folder``. Files under final names are
    never touched: they are complete by construction."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for candidate in folder.iterdir():
        name = candidate.name
        if name.startswith(".") and name.endswith(".tmp") and ".ckpt." in name:
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return sorted(removed)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; nothing is unpickled or
    evaluated.

    :raises CheckpointError: naming the path and the defect, for a missing or unreadable
        file, a truncated or corrupt one, a pickle or ``torch.save`` archive, a safetensors
        file that is not a ppl-vae checkpoint, or unknown constraint names.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a folder, not a file") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    body, tensors = _unseal(path, data)
    try:
        return checkpoint_from_contents(path, body, tensors)
    except CheckpointError:
        raise
    except (  # what a body of valid JSON but the wrong shape raises while it is read
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        OverflowError,
        RecursionError,
    ) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: malformed metadata ({type(exc).__name__}: {exc})"
        ) from None


def _unseal(path: Path, data: bytes) -> tuple[Any, dict[str, Tensor]]:
    """The JSON body and the tensors of a checkpoint file's bytes, once its header, format
    entry and digest have been checked."""
    header = _read_header(path, data)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get(_META_FORMAT) != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a ppl-vae checkpoint (no "
            f"'{_META_FORMAT}: {FORMAT}' entry in its metadata)"
        )
    text = meta.get(_META_BODY, "")
    if not isinstance(text, str) or meta.get(_META_SHA256) != _digest(
        text, data[_data_start(data) :]
    ):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the SHA-256 digest "
            "stored in it (a damaged copy, or a file edited after it was written)"
        )
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is not JSON") from None
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {exc}") from None
    return body, tensors


def _read_header(path: Path, data: bytes) -> dict[str, Any]:
    """The safetensors JSON header of ``data``, checked before any tensor is read."""

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} {problem}")

    if not data:
        raise fail("is empty")
    # A safetensors file starts with its header's length (8 bytes, little-endian) and the
    # header's "{"; the length's first byte may be anything, 0x80 included, so a pickle or a
    # zip archive is named only when the file does not look like safetensors.
    safetensors_like = len(data) > 8 and data[8:9] == b"{"
    if not safetensors_like and data[0] == _PICKLE_PROTO:
        raise fail(
            "is a Python pickle, not a safetensors checkpoint; pickles can run code "
            "when loaded, so it was not opened. Re-create the checkpoint with ppl-vae."
        )
    if not safetensors_like and data.startswith(_ZIP_MAGIC):
        raise fail(
            "is a zip archive (torch.save format, which holds pickles), not a "
            "safetensors checkpoint; it was not opened. Re-create it with ppl-vae."
        )
    if len(data) < 8:
        raise fail(f"is truncated: {len(data)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER:
        raise fail(f"is not a safetensors file (header length {n} bytes is absurd)")
    if 8 + n > len(data):
        raise fail(
            f"is truncated or not a safetensors file: the header needs {n} bytes but "
            f"only {len(data) - 8} follow"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise fail("is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise fail("is not a safetensors file (its header is not a JSON object)")
    return header
