"""What a checkpoint holds of the loop, and the checks before a run continues from one.

A checkpoint written at a step boundary holds the counters (epoch, step, position in the
epoch's data order, best epoch and value, wall time), the history, and within an epoch its
running sums (summed loss, images seen, beta, train time) with the data-order generator's
state; parameters, optimizer, scheduler and random states go beside them
(:mod:`ppl_vae.checkpoint`). A run resumes only with the configuration it was written with
(:mod:`~ppl_vae.training.run_config`: the checkpoint holds its digest), up to
:data:`~ppl_vae.training.config.RUNTIME_SETTINGS`, and on the same training images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ppl_vae.checkpoint import Checkpoint
from ppl_vae.errors import CheckpointError, ConfigMismatchError
from ppl_vae.training.config import HISTORY_COLUMNS, History
from ppl_vae.training.run_config import check_configuration

__all__ = ["RunState", "check_resumable"]


def check_resumable(
    checkpoint: Checkpoint,
    configuration: Mapping[str, Any],
    images: list[int],
    *,
    config_files: Iterable[Path] = (),
) -> None:
    """Refuse a checkpoint written with another configuration than ``configuration`` (the
    run's, whose digest a checkpoint of this run would hold; ``config_files`` where its
    ``config.json`` may be, to name the differences), by an older ppl-vae, by another writer
    than ``fit``, or on other training ``images`` ([count, values per image]).

    :raises ConfigMismatchError: listing the differences.
    :raises CheckpointError: when it lacks the trainer's state or the configuration's digest.
    """
    where = f"checkpoint {checkpoint.path}"
    if checkpoint.version < 2:
        raise CheckpointError(
            f"{where} has format version {checkpoint.version}, written by an older ppl-vae "
            "that kept no digest of the run's configuration: it still loads (evaluate, "
            "report), but a run cannot continue from it; start a new run"
        )
    if checkpoint.config_digest is None:
        raise CheckpointError(
            f"{where} holds no digest of a run's configuration: it was not written by fit, "
            "so a run cannot continue from it"
        )
    check_configuration(checkpoint, configuration, config_files)
    if "history" not in checkpoint.state or checkpoint.rng is None or checkpoint.optimizer is None:
        raise CheckpointError(
            f"{where} does not hold the trainer's state (history, random states, "
            "optimizer): it was not written by fit, or by an older ppl-vae, so the run "
            "cannot continue exactly from it"
        )
    if checkpoint.counters.get("images") != images:
        difference = f"training images: saved {checkpoint.counters.get('images')}, asked {images}"
        raise ConfigMismatchError(
            f"cannot resume from {where}: it was trained on other data ({difference}, "
            "as [count, values per image]); use the same data set and subset",
            differences=[difference],
        )


@dataclass
class RunState:
    """Everything a checkpoint needs to carry on from a step boundary."""

    history: History
    epoch: int = 0  # finished epochs
    step: int = 0  # finished steps, over the run
    position: int = 0  # finished steps of the epoch in progress (epoch + 1)
    best_value: float = -math.inf
    seconds: float = 0.0  # wall time of the run, before this process
    # The epoch in progress: its summed loss (a device tensor or a float, as the guard
    # keeps it), images seen, beta of its last step, train time before this process, and
    # the data-order generator's state at ``position`` (resumed runs only).
    total: Tensor | float = 0.0
    seen: float = 0.0
    beta: float = math.nan
    epoch_seconds: float = 0.0
    order_state: Tensor | None = field(default=None, repr=False)

    def start_epoch(self, zero: Tensor | float) -> None:
        """Clear the running sums for a new epoch."""
        self.total, self.seen, self.beta, self.epoch_seconds = zero, 0.0, math.nan, 0.0

    def body(
        self,
        *,
        seconds: float,
        train_seconds: float,
        images: list[int],
        order_device: str,
        order_state: Tensor,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The checkpoint's counters and state, ``seconds`` the run's wall time and
        ``train_seconds`` the epoch's train time so far, the generator's state now."""
        counters: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "position": self.position,  # finished steps of epoch ``epoch + 1``
            "best_epoch": self.history.best_epoch,
            "best_value": self.best_value,
            "seconds": seconds,
            "images": images,
        }
        state: dict[str, Any] = {"history": self.history.rows}
        if self.position:
            counters.update(
                seen=self.seen,
                beta=self.beta,
                train_seconds=train_seconds,
                order_device=order_device,
            )
            total = torch.as_tensor(self.total, dtype=torch.float64)
            state.update(epoch_total=total, order_rng=order_state)
        return counters, state

    @classmethod
    def read(
        cls,
        checkpoint: Checkpoint,
        history: History,
        *,
        zero: Tensor | float,
        order_device: str,
        steps_per_epoch: int,
        epochs: int,
    ) -> RunState:
        """The state ``checkpoint`` holds, for a run of ``epochs`` epochs of
        ``steps_per_epoch`` steps whose guard sums losses like ``zero``.

        :raises CheckpointError: for malformed counters, counters that do not fit the run,
            or a mid-epoch checkpoint whose data-order generator was on another device.
        """
        where = f"checkpoint {checkpoint.path}"
        counters, state = checkpoint.counters, checkpoint.state
        saved_device = counters.get("order_device", order_device)
        if counters.get("position") and saved_device != order_device:
            raise CheckpointError(
                f"{where} was written within an epoch on {saved_device}, whose data-order "
                f"generator cannot continue on {order_device}: resume it on "
                f"{saved_device} (a checkpoint written at the end of an epoch resumes on any "
                "device)"
            )
        try:
            run = cls._from_counters(counters, state, history, zero)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"{where} holds malformed counters ({type(exc).__name__}: {exc})"
            ) from None
        if not (
            0 <= run.epoch <= epochs
            and 0 <= run.position < steps_per_epoch
            and len(history.rows) == run.epoch
            and run.step == run.epoch * steps_per_epoch + run.position
        ):
            raise CheckpointError(
                f"{where} holds counters that do not fit this run (epoch {run.epoch} of "
                f"{epochs}, step {run.step}, position {run.position} of "
                f"{steps_per_epoch} steps per epoch)"
            )
        return run

    @classmethod
    def _from_counters(
        cls, counters: dict, state: dict, history: History, zero: Tensor | float
    ) -> RunState:
        run = cls(
            history,
            epoch=int(counters["epoch"]),
            step=int(counters["step"]),
            position=int(counters["position"]),
            best_value=float(counters["best_value"]),
            seconds=float(counters.get("seconds", 0.0)),
            total=zero,
        )
        history.best_epoch = counters["best_epoch"]
        history.rows = [{k: row[k] for k in HISTORY_COLUMNS} for row in state["history"]]
        if run.position:
            total = state["epoch_total"]
            if isinstance(zero, Tensor):
                run.total = total.to(zero.device, torch.float64)
            else:
                run.total = float(total.item())
            run.order_state = state["order_rng"]
            run.seen = float(counters["seen"])
            run.beta = float(counters["beta"])
            run.epoch_seconds = float(counters["train_seconds"])
        return run
