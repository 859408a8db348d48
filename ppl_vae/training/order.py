"""The data order of a run: each epoch a permutation of the training images drawn from the
seed and the epoch alone, cut into minibatches of ``batch_size`` (the last one smaller),
with the dynamic binarisation x ~ Bernoulli(grey) drawn from the same generator.

Because the permutation depends on (seed, epoch) only, a position in it (finished steps of
the epoch) and the generator's state there say exactly where a resumed run continues.

With labels (semi-supervised training, -1 marking an unlabelled image) and both kinds present,
an epoch is one pass over the N_u unlabelled images, ``batch_size`` a step, and every step
also takes ``labelled_batch`` = m_l labelled images from a run of fresh permutations of the
N_l labelled ones, each weighted by w = N_l / (steps * m_l): summed over an epoch, the
labelled terms count every labelled image once in expectation, as the full-data objective
does, however often a small labelled set is shown. A given ``labelled_weight`` replaces w:
1 weighs each labelled image in a batch as much as an unlabelled one, so a small labelled
set, shown many times an epoch, weighs N_u m_l / (batch_size N_l) times more than the
full-data objective says (what most M2 implementations do, batch by batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ppl_vae.data import binarize
from ppl_vae.rng import sub_seed

__all__ = ["Batch", "BatchOrder"]

_STREAM_BATCH_ORDER = 11  # the seed's stream of batch orders (as in ppl_vae.data.datasets)


@dataclass
class Batch:
    """One step's images, the keyword arguments they bring (labels and their weight), and
    how many training images the step stands for (its labelled ones counted with weight w)."""

    x: Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)
    images: float = 0.0


class BatchOrder:
    """The minibatches of ``images`` (already on ``device``), epoch by epoch; with ``labels``
    (int64, -1 where unknown) each batch also brings ``y`` (and ``labelled_weight``)."""

    def __init__(
        self,
        images: Tensor,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        dynamic_binarize: bool,
        labels: Tensor | None = None,
        labelled_batch: int = 0,
        labelled_weight: float | None = None,
    ) -> None:
        self.images = images
        self.n = int(images.shape[0])
        self.batch_size = batch_size
        self.seed = seed
        self.dynamic_binarize = dynamic_binarize
        self.generator = torch.Generator(device=device)  # batch order and binarisation
        self.labels = None if labels is None else labels.to(images.device)
        self.mixed = False
        if self.labels is not None:
            known = self.labels >= 0
            self.labelled = known.nonzero().reshape(-1)
            self.unlabelled = (~known).nonzero().reshape(-1)
            n_l, n_u = len(self.labelled), len(self.unlabelled)
            self.mixed = n_l > 0 and n_u > 0 and labelled_batch > 0
        if self.mixed:
            self.labelled_batch = labelled_batch
            self.steps_per_epoch = math.ceil(n_u / batch_size)
            self.weight = (
                n_l / (self.steps_per_epoch * labelled_batch)
                if labelled_weight is None
                else float(labelled_weight)
            )
            self._labelled_perms = math.ceil(self.steps_per_epoch * labelled_batch / n_l)
        else:
            self.steps_per_epoch = math.ceil(self.n / batch_size)

    @property
    def device_type(self) -> str:
        """Where the generator draws (its state resumes on that kind of device only)."""
        return self.generator.device.type

    def permutation(self, epoch: int) -> Tensor | tuple[Tensor, Tensor]:
        """The epoch's permutation: a stream per epoch, so the order depends on (seed,
        epoch) only and the position in it says where a resumed run continues. With mixed
        labels: the unlabelled images' order and the labelled images' run of orders."""
        self.generator.manual_seed(sub_seed(self.seed, _STREAM_BATCH_ORDER, epoch))
        if not self.mixed:
            return self._randperm(self.n)
        order = self.unlabelled[self._randperm(len(self.unlabelled))]
        runs = [self._randperm(len(self.labelled)) for _ in range(self._labelled_perms)]
        return order, self.labelled[torch.cat(runs)]

    def _randperm(self, n: int) -> Tensor:
        perm = torch.randperm(n, generator=self.generator, device=self.generator.device)
        return perm.to(self.images.device)

    def batch(self, perm: Tensor | tuple[Tensor, Tensor], index: int) -> Batch:
        """Minibatch ``index`` (0-based) of the epoch whose permutation is ``perm``."""
        start = index * self.batch_size
        kwargs: dict[str, Any] = {}
        if self.mixed:
            order, labelled_order = perm
            m_l = self.labelled_batch
            rows = torch.cat(
                (
                    order[start : start + self.batch_size],
                    labelled_order[index * m_l : (index + 1) * m_l],
                )
            )
            images = rows.shape[0] - m_l + m_l * self.weight
            kwargs["labelled_weight"] = self.weight
        else:
            rows = perm[start : min(start + self.batch_size, self.n)]
            images = float(rows.shape[0])
        x = self.images.index_select(0, rows)
        if self.labels is not None:
            kwargs["y"] = self.labels.index_select(0, rows)
        if self.dynamic_binarize:
            x = binarize(x, self.generator)
        return Batch(x, kwargs, images)

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)
