"""The training loop on one rank of a ``torchrun`` job: each step's global batch is drawn as
on one process, this rank trains on its rows (:mod:`~ppl_vae.training.distributed`), the
gradients and the loss are summed over ranks, and every rank takes the same decisions
(a signal on any rank stops all at the same step boundary; rank 0 writes the files).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ppl_vae.training.distributed import Distributed
from ppl_vae.training.loop import TrainingLoop
from ppl_vae.training.signals import StopFlag

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

    def _save(self, names: tuple[str, ...]) -> None:
        if self.group.is_main:
            super()._save(names)
        else:  # the same checks rank 0 makes, so every rank stops alike
            error = self._divergence_so_far()
            if error is not None:
                raise error
        self.group.barrier()  # the checkpoint is whole on disk before any rank goes on
