"""The end-of-epoch evaluation: the true ELBO (beta = 1) of every validation image with
fixed draws, and its summary as a history row's ``val_*`` numbers.

Per image i, with one z ~ q(z | x_i) and the closed-form KL where it exists (and the guide's
discrete sites summed out exactly, :func:`~ppl_vae.elbo.site_terms`),

    ELBO_i = reconstruction_i - KL_i,  reconstruction_i = log p(x_i | z),

reported as means over the images, with the standard error s / sqrt(N) of the ELBO's mean
and ``val_objective`` = mean of reconstruction - beta * KL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ppl_vae.data import batches
from ppl_vae.elbo import PairStructure, inspect_pair, site_terms
from ppl_vae.rng import forked_rng, sub_seed
from ppl_vae.training.config import HISTORY_COLUMNS, TrainConfig

__all__ = ["VALIDATION_COLUMNS", "Validator", "summarise"]

VALIDATION_COLUMNS = HISTORY_COLUMNS[7:12]
"""The history columns validation fills (``None`` without a validation set)."""

_EVAL_BATCH = 1000  # validation images per batch by default
_STREAM_VALIDATION = 12  # the seed's stream of validation draws (as in ppl_vae.data.datasets)


@dataclass
class Validator:
    """The true ELBO (beta = 1) per validation image, with fixed draws: every epoch sees the
    same random numbers (common random numbers make epochs comparable), and the training
    stream is left untouched."""

    model: Callable
    guide: Callable
    images: Tensor
    kwargs: dict
    batch_size: int
    seed: int
    device: torch.device
    modules: Mapping[str, nn.Module]
    structure: PairStructure | None = None

    @classmethod
    def for_run(
        cls,
        model: Callable,
        guide: Callable,
        images: Tensor,
        kwargs: dict,
        config: TrainConfig,
        device: torch.device,
        modules: Mapping[str, nn.Module],
    ) -> Validator:
        """A run's validator: batches of ``config.eval_batch_size`` (by default 1,000, or
        the training batch size when larger), draws from the seed's validation stream."""
        batch_size = config.eval_batch_size or max(config.batch_size, _EVAL_BATCH)
        seed = sub_seed(config.seed, _STREAM_VALIDATION)
        return cls(model, guide, images, kwargs, batch_size, seed, device, modules)

    def __call__(self) -> tuple[Tensor, Tensor]:
        """Per-image reconstruction and KL, each of shape (N,), on the device."""
        kwargs = {**self.kwargs, "beta": 1.0}
        modes = {name: m.training for name, m in self.modules.items()}
        try:
            for m in self.modules.values():
                m.eval()
            if self.structure is None:
                # Inspecting the pair runs it once: off the validation stream, so the first
                # validation of a process draws the same numbers as every other one (an
                # epoch validated after a resume included).
                first = self.images[: self.batch_size]
                with torch.no_grad(), forked_rng(self.device):
                    self.structure = inspect_pair(self.model, self.guide, (first,), kwargs)
            with torch.no_grad(), forked_rng(self.device, self.seed):
                return self._terms(kwargs)
        finally:
            for name, m in self.modules.items():
                m.train(modes[name])

    def _terms(self, kwargs: dict) -> tuple[Tensor, Tensor]:
        recon, kl = [], []
        for x in batches(self.images, self.batch_size, shuffle=False):
            r, k = self._batch_terms(x, kwargs)
            recon.append(r)
            kl.append(k)
        return torch.cat(recon), torch.cat(kl)

    def _batch_terms(self, x: Tensor, kwargs: dict) -> tuple[Tensor, Tensor]:
        """One batch's per-image reconstruction and KL, each ``(batch,)``."""
        return self.pair_terms(self.model, self.guide, x, kwargs)

    def pair_terms(
        self, model: Callable, guide: Callable, x: Tensor, kwargs: dict
    ) -> tuple[Tensor, Tensor]:
        """Per-image reconstruction and KL of ``(model, guide)`` on ``x``."""
        terms = site_terms(
            model,
            guide,
            x,
            analytic_kl=True,
            keep_plates=("data",),
            structure=self.structure,
            **kwargs,
        )
        r = x.new_zeros(x.shape[0])
        k = x.new_zeros(x.shape[0])
        for kind, _, value in terms.values():  # value: (1, batch)
            if kind == "reconstruction":
                r = r + value[0]
            else:
                k = k + value[0]
        return r, k


def summarise(recon: Tensor, kl: Tensor, beta: float) -> dict[str, float]:
    """The ``val_*`` numbers of a history row from per-image terms, in one device read."""
    elbo = recon - kl  # (N,)
    n = elbo.shape[0]
    stats = torch.stack(
        [
            elbo.mean(),
            elbo.std() / math.sqrt(n) if n > 1 else elbo.new_tensor(math.nan),
            recon.mean(),
            kl.mean(),
            (recon - beta * kl).mean(),
        ]
    ).tolist()
    return dict(zip(VALIDATION_COLUMNS, stats, strict=True))
