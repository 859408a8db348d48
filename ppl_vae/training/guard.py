"""The divergence guard: find the first step whose loss is NaN or infinite, and say why.

On CPU each step's loss is read as it comes (a fraction of a microsecond) and a bad step's
update is held back. On CUDA reading it would wait for the device at every step, so the
guard is *lazy*: each step's finiteness flag isfinite(loss) is copied to pinned memory
without blocking and read once it has landed, at most :data:`PENDING_FLAGS` steps later or
when the guard is drained (before every checkpoint and at the end of every epoch), and the
epoch's summed loss stays on the device. Meanwhile a flag on the device,
skip = max over steps so far of [loss not finite], tells the fused optimizer to apply no
update from the first bad step on, so, as on CPU, the parameters stay those before it.

The diagnosis then names the culprit: a parameter that the previous update made non-finite
(its gradient was, the loss was not), or the sample site whose ELBO term log p or KL is
non-finite on the bad step's batch, evaluated again off the training stream.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch
from torch import Tensor

from ppl_vae.elbo import sampled_site_terms
from ppl_vae.errors import TrainingDivergedError
from ppl_vae.rng import forked_rng
from ppl_vae.training.config import TrainConfig

__all__ = [
    "PENDING_FLAGS",
    "BadStep",
    "Checked",
    "Diagnosis",
    "LossGuard",
    "nonfinite_parameters",
]

PENDING_FLAGS = 8
"""Lazy guard: finiteness flags in flight before the oldest is waited for."""

_DIAGNOSIS_PARTICLES = 8  # draws per image when a bad step's sites are evaluated again


@dataclass
class BadStep:
    """A step whose loss was not finite, with what is needed to name the culprit."""

    step: int
    x: Tensor
    beta: float


class Checked(NamedTuple):
    """What :meth:`LossGuard.check` found out about a step."""

    bad: BadStep | None  # the first bad step known now
    amount: Tensor | float  # what to add to the epoch's summed loss
    skip: Tensor | None  # lazy: on the device, 1.0 from the first bad loss on, else 0.0


class _LandsLate:
    """A stand-in for ``torch.cuda.Event`` off CUDA: a flag that has never landed until
    waited for, as on the slowest device, so every flag is read as late as the guard lets
    it be."""

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass


class LossGuard:
    """Finds the first step whose loss is not finite, and keeps the epoch's summed loss.

    :param lazy: ``None`` (the default): lazy on CUDA, where reading a loss waits for the
        device, and reading each loss elsewhere. ``True`` on another device runs the lazy
        path there, each flag read as late as it allows (when its slot is needed again, or
        at :meth:`drain`): how the CUDA path is tested without a GPU.
    """

    def __init__(self, device: torch.device, *, lazy: bool | None = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.lazy = self.cuda if lazy is None else bool(lazy)
        self.pending: deque[tuple[BadStep, Tensor, Any]] = deque()
        self.slots: list[Tensor] = []
        self.next_slot = 0
        self.skip: Tensor | None = None
        if self.lazy:
            self.slots = [
                torch.empty((), dtype=torch.bool, pin_memory=self.cuda)
                for _ in range(PENDING_FLAGS)
            ]
            # float32 0/1: what fused optimizers read as ``found_inf`` (torch.amp's flag)
            self.skip = torch.zeros((), dtype=torch.float32, device=self.device)

    def zero(self) -> Tensor | float:
        """An empty sum of losses: a float64 device tensor when lazy, else a Python float
        (float64 too)."""
        return torch.zeros((), device=self.device, dtype=torch.float64) if self.lazy else 0.0

    def check(self, loss: Tensor, step: int, x: Tensor, beta: float) -> Checked:
        """Take in step ``step``'s loss (``x`` its batch, ``beta`` its KL weight)."""
        if not self.lazy:
            value = loss.item()
            return Checked(None if math.isfinite(value) else BadStep(step, x, beta), value, None)
        finite = torch.isfinite(loss)
        self.skip = torch.maximum(self.skip, finite.logical_not().to(torch.float32))
        return Checked(self._flag(finite, BadStep(step, x, beta)), loss, self.skip)

    def _flag(self, finite: Tensor, record: BadStep) -> BadStep | None:
        """Send ``finite`` to the host without waiting; the first bad step landed so far."""
        if len(self.pending) == len(self.slots):  # the oldest flag's slot is needed again
            self.pending[0][2].synchronize()
            bad = self._pop()
            if bad is not None:
                return bad
        slot = self.slots[self.next_slot]
        self.next_slot = (self.next_slot + 1) % len(self.slots)
        slot.copy_(finite, non_blocking=True)
        event = torch.cuda.Event() if self.cuda else _LandsLate()
        event.record()
        self.pending.append((record, slot, event))
        while self.pending and self.pending[0][2].query():
            bad = self._pop()
            if bad is not None:
                return bad
        return None

    def drain(self) -> BadStep | None:
        """Wait for every flag in flight; the first bad step, if any."""
        while self.pending:
            self.pending[0][2].synchronize()
            bad = self._pop()
            if bad is not None:
                return bad
        return None

    def _pop(self) -> BadStep | None:
        record, slot, _ = self.pending.popleft()
        if bool(slot):
            return None
        self.pending.clear()
        return record


def nonfinite_parameters() -> list[str]:
    """Names of the param-store entries holding NaN or inf (one device read when none)."""
    named = list(pyro.get_param_store().named_parameters())
    if not named:
        return []
    with torch.no_grad():
        flags = torch.stack([torch.isfinite(p).all() for _, p in named])
        if bool(flags.all()):
            return []
        return [name for (name, _), ok in zip(named, flags.tolist(), strict=True) if not ok]


def _what_is_nonfinite(t: Tensor) -> str:
    return "NaN" if bool(torch.isnan(t).any()) else "infinite"


def _list_names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class Diagnosis:
    """The :class:`~ppl_vae.errors.TrainingDivergedError` of a run, naming the step, its
    epoch, the culprit (site or parameter) and the last good checkpoint."""

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        kwargs: dict[str, Any],
        config: TrainConfig,
        *,
        device: torch.device,
        steps_per_epoch: int,
    ) -> None:
        self.model, self.guide, self.kwargs, self.config = model, guide, kwargs, config
        self.device = device
        self.steps_per_epoch = steps_per_epoch

    def error(
        self, what: str, *, step: int, site: str | None, checkpoint: Path | None
    ) -> TrainingDivergedError:
        """The error for ``what`` happened at ``step``."""
        epoch = max(1, (step - 1) // self.steps_per_epoch + 1)
        saved = (
            f"the last good checkpoint is {checkpoint}"
            if checkpoint is not None
            else "no checkpoint was written before it"
        )
        return TrainingDivergedError(
            f"training diverged at step {step} (epoch {epoch}): {what}; {saved}. Try a "
            f"smaller learning rate (lr={self.config.lr:g}), more particles, or check the data "
            "and networks for values that overflow.",
            step=step,
            epoch=epoch,
            checkpoint=checkpoint,
            site=site,
        )

    def parameters(
        self, names: list[str], step: int, *, known: bool, checkpoint: Path | None
    ) -> TrainingDivergedError:
        """Parameters ``names`` are non-finite; ``known``: their gradient at ``step`` made
        them so (the loss was finite)."""
        noun = "parameter" if len(names) == 1 else "parameters"
        if known and step >= 1:
            what = (
                f"the gradient of {noun} {_list_names(names)} was NaN or infinite at this step "
                "(the loss was finite), so the update made the "
                f"{noun} non-finite and the next step's loss is not finite"
            )
        else:
            what = f"{noun} {_list_names(names)} became NaN or infinite"
        return self.error(what, step=max(step, 1), site=names[0], checkpoint=checkpoint)

    def loss(self, bad: BadStep, *, checkpoint: Path | None) -> TrainingDivergedError:
        """Name what went wrong at ``bad.step``: a parameter made non-finite by the previous
        update (its gradient), or the sample site whose ELBO term is non-finite on the
        step's batch, evaluated again (off the training stream) with at least
        :data:`_DIAGNOSIS_PARTICLES` particles."""
        broken = nonfinite_parameters()
        if broken:
            # No update from the bad step on was applied (held back on CPU, skipped on the
            # device when lazy), so the damage came from the step before: a finite loss
            # with a non-finite gradient.
            return self.parameters(broken, bad.step - 1, known=True, checkpoint=checkpoint)
        sites, note = self._nonfinite_sites(bad)
        if sites:
            name, kind, value = sites[0]
            term = "reconstruction term (log p)" if kind == "reconstruction" else "KL term"
            what = (
                f"the loss is not finite: the {term} of sample site {name!r} is {value} on "
                "this step's batch"
            )
            if len(sites) > 1:
                what += f" (so are those of {_list_names([s[0] for s in sites[1:]])})"
            return self.error(what, step=bad.step, site=name, checkpoint=checkpoint)
        return self.error(
            "the loss became NaN or infinite, though no site's term is when the batch is "
            f"evaluated again{note}",
            step=bad.step,
            site=None,
            checkpoint=checkpoint,
        )

    def _nonfinite_sites(self, bad: BadStep) -> tuple[list[tuple[str, str, str]], str]:
        """The sites whose term is non-finite on the bad batch as (name, kind, "NaN" or
        "infinite"), and a note when they could not be evaluated."""
        sites: list[tuple[str, str, str]] = []
        try:
            kwargs = {**self.kwargs, "beta": bad.beta}
            with (
                torch.no_grad(),
                forked_rng(self.device),
                pyro.validation_enabled(False),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")
                terms = sampled_site_terms(
                    self.model,
                    self.guide,
                    bad.x,
                    num_particles=max(self.config.num_particles, _DIAGNOSIS_PARTICLES),
                    analytic_kl=self.config.elbo.endswith("meanfield"),
                    **kwargs,
                )
            for name, (kind, _, value) in terms.items():
                if not bool(torch.isfinite(value).all()):
                    sites.append((name, kind, _what_is_nonfinite(value)))
        except Exception as exc:  # the diagnosis must not hide the divergence
            return sites, f" (the sites could not be evaluated: {type(exc).__name__}: {exc})"
        return sites, ""
