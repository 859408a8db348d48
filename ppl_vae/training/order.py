"""The data order of a run: each epoch a permutation of the training images drawn from the
seed and the epoch alone, cut into minibatches of ``batch_size`` (the last one smaller),
with the dynamic binarisation x ~ Bernoulli(grey) drawn from the same generator.

Because the permutation depends on (seed, epoch) only, a position in it (finished steps of
the epoch) and the generator's state there say exactly where a resumed run continues.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ppl_vae.data import binarize
from ppl_vae.rng import sub_seed

__all__ = ["BatchOrder"]

_STREAM_BATCH_ORDER = 11  # the seed's stream of batch orders (as in ppl_vae.data.datasets)


class BatchOrder:
    """The minibatches of ``images`` (already on ``device``), epoch by epoch."""

    def __init__(
        self,
        images: Tensor,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        dynamic_binarize: bool,
    ) -> None:
        self.images = images
        self.n = int(images.shape[0])
        self.batch_size = batch_size
        self.seed = seed
        self.dynamic_binarize = dynamic_binarize
        self.generator = torch.Generator(device=device)  # batch order and binarisation
        self.steps_per_epoch = math.ceil(self.n / batch_size)

    @property
    def device_type(self) -> str:
        """Where the generator draws (its state resumes on that kind of device only)."""
        return self.generator.device.type

    def permutation(self, epoch: int) -> Tensor:
        """The epoch's permutation: a stream per epoch, so the order depends on (seed,
        epoch) only and the position in it says where a resumed run continues."""
        self.generator.manual_seed(sub_seed(self.seed, _STREAM_BATCH_ORDER, epoch))
        perm = torch.randperm(self.n, generator=self.generator, device=self.generator.device)
        return perm.to(self.images.device)

    def batch(self, perm: Tensor, index: int) -> Tensor:
        """Minibatch ``index`` (0-based) of the epoch whose permutation is ``perm``."""
        start = index * self.batch_size
        x = self.images.index_select(0, perm[start : min(start + self.batch_size, self.n)])
        if self.dynamic_binarize:
            x = binarize(x, self.generator)
        return x

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)
