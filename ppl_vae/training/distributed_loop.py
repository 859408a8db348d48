"""The training loop on one rank of a ``torchrun`` job: each step's global batch is drawn as
on one process, this rank trains on its rows (:mod:`~ppl_vae.training.distributed`), the
gradients and the loss are summed over ranks, and every rank takes the same decisions
(a signal on any rank stops all at the same step boundary; rank 0 writes the files).
Validation is sharded alike: each rank evaluates its rows of every validation batch with the
noise one process draws for them, and the per-image terms are all-reduced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ppl_vae.errors import TrainingInterrupted
from ppl_vae.training.distributed import Distributed, ShardMessenger
from ppl_vae.training.loop import TrainingLoop
from ppl_vae.training.signals import StopFlag, interrupted
from ppl_vae.training.validation import Validator

__all__ = ["DistributedLoop"]


class DistributedLoop(TrainingLoop):
    """:class:`~ppl_vae.training.loop.TrainingLoop` on rank ``group.rank`` of
    ``group.world``; ``saves``: the run writes checkpoints (rank 0 writes them, the others
    wait for it at a barrier)."""

    def __init__(self, *args: Any, group: Distributed, saves: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        self.saves = saves
        group.check_batches(self.order.n, self.config.batch_size)
        # The loop reads ``self.stop`` at step boundaries: here the signal all ranks agreed
        # on at the last step, never one that reached this rank alone since.
        self.signals, self.stop = self.stop, StopFlag()
        if self.validator is not None:
            self.validator = ShardedValidator(**vars(self.validator), group=group)

    def _backward(self, x: Tensor, kwargs: dict[str, Any]) -> Tensor:
        shard = self.group.shard(int(x.shape[0]))
        loss = self.engine.backward(x[shard.lo : shard.hi], kwargs, shard=shard)
        self.group.sum_gradients(self.engine.params)
        return loss

    def _agree(self, loss: Tensor) -> Tensor:
        total, signum = self.group.step_summary(loss, self.signals.signum)
        if signum is not None:
            self.stop.signum = signum
        return total

    def _interrupted(self) -> TrainingInterrupted:
        if self.group.is_main or not self.saves:
            return super()._interrupted()
        return interrupted(
            self.stop,
            step=self.state.step,
            epoch=self.state.epoch,
            epochs=self.config.epochs,
            checkpoint=None,
            out=None,
            written_elsewhere="the checkpoint is written by rank 0",
        )

    def _save(self, names: tuple[str, ...]) -> None:
        if self.group.is_main:
            super()._save(names)
        else:  # the same checks rank 0 makes, so every rank stops alike
            error = self._divergence_so_far()
            if error is not None:
                raise error
        self.group.barrier()  # the checkpoint is whole on disk before any rank goes on


@dataclass
class ShardedValidator(Validator):
    """:class:`~ppl_vae.training.validation.Validator` whose every batch is split across
    the ranks; each rank returns the per-image terms of all images."""

    group: Distributed | None = None

    def _batch_terms(self, x: Tensor, kwargs: dict) -> tuple[Tensor, Tensor]:
        if self.group is None:  # no group: one process's validation
            return super()._batch_terms(x, kwargs)
        shard = self.group.shard(int(x.shape[0]))
        if shard.hi > shard.lo:
            draws = ShardMessenger(shard, draw_global=True, split_shared=False)
            guide: Callable = draws(self.guide)
            r, k = self.pair_terms(self.model, guide, x[shard.lo : shard.hi], kwargs)
        else:  # a last batch smaller than the world leaves this rank no rows
            r = k = x.new_zeros(0)
        return self.group.gather_rows(r, shard), self.group.gather_rows(k, shard)
