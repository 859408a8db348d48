"""The history files of a run folder: ``history.json`` and ``history.csv``, one row per
finished epoch (:data:`~ppl_vae.training.config.HISTORY_COLUMNS`), each replaced atomically
(:func:`ppl_vae.atomic.write_atomically`), non-finite numbers as ``null``.
"""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path
from typing import Any

from ppl_vae.atomic import json_ready, write_atomically, write_json
from ppl_vae.training.config import HISTORY_COLUMNS

__all__ = ["remove_history_temporaries", "write_history"]


def write_history(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` to ``out_dir/history.json`` and ``out_dir/history.csv`` (``None``
    as an empty CSV field)."""
    clean = [json_ready({k: row[k] for k in HISTORY_COLUMNS}) for row in rows]
    write_json(out_dir / "history.json", clean, indent=1)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in clean:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    write_atomically(out_dir / "history.csv", buffer.getvalue())


def remove_history_temporaries(out_dir: Path) -> None:
    """Remove the temporary files a write killed midway left in ``out_dir``."""
    for leftover in out_dir.glob(".history.*.tmp"):
        with contextlib.suppress(OSError):
            leftover.unlink()
