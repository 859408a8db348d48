"""The files a run writes in its folder: ``config.json`` (the run's configuration,
:mod:`~ppl_vae.training.run_config`), ``checkpoints/last.ckpt`` and ``best.ckpt`` (the
loop's state at a step boundary, :mod:`~ppl_vae.training.state`, with the configuration's
digest) and the history, each replaced atomically, so after a kill every file under its
final name is whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ppl_vae.atomic import write_json
from ppl_vae.checkpoint import Checkpoint, remove_stale_temporaries, save_checkpoint
from ppl_vae.errors import WriteError
from ppl_vae.training.engine import Engine
from ppl_vae.training.history import remove_history_temporaries, write_history
from ppl_vae.training.run_config import CONFIG_FILE, config_digest

__all__ = ["RunFiles"]


class RunFiles:
    """Where a run writes (nothing when ``out`` is ``None``), and its last good checkpoint.

    :param configuration: the run's configuration (plain JSON): ``config.json``, and by its
        digest in every checkpoint.
    :param modules: the networks whose weights the checkpoints hold, by ``pyro.module`` name.
    :raises WriteError: when the checkpoint folder cannot be created.
    """

    def __init__(
        self,
        out: Path | None,
        *,
        configuration: dict[str, Any],
        modules: Mapping[str, nn.Module],
    ) -> None:
        self.out = out
        self.configuration = configuration
        self.digest = config_digest(configuration)
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
                config_digest=self.digest,
                state=state,
            )
        self.last_good = self.ckpt_dir / "last.ckpt"

    def write_config(self) -> None:
        """Write ``config.json`` (again, on resume: the runtime settings may have changed)."""
        if self.out is not None:
            write_json(self.out / CONFIG_FILE, self.configuration, what="configuration")

    def config_files(self, checkpoint: Checkpoint) -> list[Path]:
        """Where the ``config.json`` of the run that wrote ``checkpoint`` may be: this run's
        folder, then the folder beside the checkpoint's (``RUN/checkpoints/last.ckpt``)."""
        folders = [self.out] if self.out is not None else []
        return [folder / CONFIG_FILE for folder in (*folders, checkpoint.path.parent.parent)]

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
            for leftover in self.out.glob(f".{CONFIG_FILE}.*.tmp"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if rows:
                write_history(self.out, rows)
