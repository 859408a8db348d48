"""The files a run writes in its folder: ``checkpoints/last.ckpt`` and ``best.ckpt`` (the
loop's state at a step boundary, :mod:`~ppl_vae.training.state`) and the history, each
replaced atomically, so after a kill every file under its final name is whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ppl_vae.checkpoint import Checkpoint, remove_stale_temporaries, save_checkpoint
from ppl_vae.errors import WriteError
from ppl_vae.training.engine import Engine
from ppl_vae.training.history import remove_history_temporaries, write_history

__all__ = ["RunFiles"]


class RunFiles:
    """Where a run writes (nothing when ``out`` is ``None``), and its last good checkpoint.

    :param config: the plain JSON every checkpoint holds as its configuration.
    :param modules: the networks whose weights the checkpoints hold, by ``pyro.module`` name.
    :raises WriteError: when the checkpoint folder cannot be created.
    """

    def __init__(
        self, out: Path | None, *, config: dict[str, Any], modules: Mapping[str, nn.Module]
    ) -> None:
        self.out = out
        self.config = config
        self.modules = modules
        self.last_good: Path | None = None
        self.ckpt_dir = out / "checkpoints" if out is not None else None
        if self.ckpt_dir is not None:
            try:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise WriteError(
                    f"cannot create the checkpoint folder {self.ckpt_dir}: {exc.strerror or exc}"
                ) from exc

    def save(
        self,
        names: tuple[str, ...],
        engine: Engine,
        counters: dict[str, Any],
        state: dict[str, Any],
    ) -> None:
        """Write the named checkpoints (``"best"``, ``"last"``), in that order: a kill
        between the two leaves last.ckpt at the previous boundary, and resuming from it
        writes the same best.ckpt again."""
        if self.ckpt_dir is None:
            return
        for name in names:
            save_checkpoint(
                self.ckpt_dir / f"{name}.ckpt",
                modules=self.modules,
                optimizer=engine.optimizer,
                scheduler=engine.scheduler,
                counters=counters,
                config=self.config,
                state=state,
            )
        self.last_good = self.ckpt_dir / "last.ckpt"

    def write_history(self, rows: list[dict[str, Any]]) -> None:
        if self.out is not None:
            write_history(self.out, rows)

    def resume(self, checkpoint: Checkpoint, rows: list[dict[str, Any]]) -> None:
        """Continue from ``checkpoint``: drop what writes killed midway left, and put back
        the history it holds (a later epoch may have been written after it)."""
        if self.ckpt_dir is not None:
            remove_stale_temporaries(self.ckpt_dir)
            self.last_good = checkpoint.path
        if self.out is not None:
            remove_history_temporaries(self.out)
            if rows:
                write_history(self.out, rows)
