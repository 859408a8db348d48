"""Stopping a run cleanly: while it trains, SIGINT (Ctrl-C) and SIGTERM only set a flag,
which the loop reads at each step boundary to write ``last.ckpt`` and raise
:class:`~ppl_vae.errors.TrainingInterrupted` (exit code 128 + the signal's number).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ppl_vae.errors import TrainingInterrupted

__all__ = ["StopFlag", "catch_signals", "interrupted"]


class StopFlag:
    """Set by SIGINT/SIGTERM; read by the loop at each step boundary (a Python attribute)."""

    def __init__(self) -> None:
        self.signum: int | None = None


@contextlib.contextmanager
def catch_signals(enabled: bool) -> Iterator[StopFlag]:
    """While training, SIGINT and SIGTERM only set a flag: the loop then writes a checkpoint
    at the next step boundary and stops. A second Ctrl-C stops at once (the checkpoints on
    disk stay whole: they are replaced atomically). Outside the main thread, or with
    ``enabled`` false, the flag is never set."""
    flag = StopFlag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def interrupted(
    flag: StopFlag,
    *,
    step: int,
    epoch: int,
    epochs: int,
    checkpoint: Path | None,
    out: Path | None,
    written_elsewhere: str | None = None,
) -> TrainingInterrupted:
    """The error that ends a run stopped by ``flag`` after ``step`` (``epoch`` finished
    epochs of ``epochs``), saying where it was saved and how to resume it (``written_elsewhere``:
    who saved it, when another process did)."""
    signum = int(flag.signum or signal.SIGINT)
    name = signal.Signals(signum).name
    where = (
        f"checkpoint written to {checkpoint}; resume with "
        f"'ppl-vae train --resume {out}' (or fit(..., resume=...))"
        if checkpoint is not None
        else written_elsewhere or "no checkpoint"
    )
    return TrainingInterrupted(
        f"interrupted by {name} after step {step} (epoch {epoch + 1} of {epochs}); {where}",
        signum=signum,
        step=step,
        epoch=epoch,
        checkpoint=checkpoint,
    )
