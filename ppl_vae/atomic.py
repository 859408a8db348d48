"""One atomic writer for every file a run writes: checkpoints, histories, configurations,
sweep tables and report pages; and JSON with the numbers that do not exist (NaN, inf) as null.

The bytes go to a temporary file in the target's folder, which is flushed and fsynced, then
renamed over the target with ``os.replace``, and the folder is fsynced so the rename is
durable: a reader, or a process killed at any instant, sees the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ppl_vae.errors import WriteError

__all__ = ["json_ready", "write_atomically", "write_json"]


def write_atomically(
    path: str | os.PathLike[str],
    payload: bytes | str,
    *,
    what: str = "",
    error: type[WriteError] = WriteError,
) -> None:
    """Replace ``path`` by ``payload`` (text is written as UTF-8) atomically and durably.

    :param what: the kind of file for the message, e.g. ``"checkpoint"``.
    :param error: the :class:`WriteError` subclass raised when it cannot be written; the
        previous file under that name is then unchanged and no temporary file is left.
    """
    path = Path(path)
    folder = path.parent
    data = payload.encode() if isinstance(payload, str) else payload
    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=folder, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as handle:
            tmp_name = handle.name
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        kind = f"{what} " if what else ""
        raise error(
            f"cannot write {kind}{path}: {exc.strerror or exc} ({type(exc).__name__}); check "
            f"that {folder} exists, is a writable folder and has free space. Any previous "
            f"{what or 'file'} under that name is unchanged."
        ) from exc
    finally:  # also on KeyboardInterrupt: no temporary file stays behind
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; some systems cannot open or fsync a folder, which is then
    not an error: the file itself is complete on disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by ``None``, through dicts,
    lists and tuples (tuples become lists): strict JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def write_json(
    path: str | os.PathLike[str], value: Any, *, indent: int = 2, what: str = ""
) -> None:
    """Write ``value`` as strict JSON (non-finite numbers as null) with :func:`write_atomically`."""
    text = json.dumps(json_ready(value), indent=indent, allow_nan=False) + "\n"
    write_atomically(path, text, what=what)
