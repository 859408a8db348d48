"""Scaling the KL term: beta, KL warm-up and cyclical schedules, all through ``poutine``.

A beta applied to the latent sites of both model and guide multiplies exactly the KL term:
ELBO_beta = E_q[log p(x | z)] - beta KL(q(z | x) || p(z)). Pyro's ``poutine.scale`` needs a
positive scale, so beta = 0 (the start of a warm-up) masks the latent sites instead, which
removes their log-densities, i.e. the KL term, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from pyro import poutine
from pyro.poutine.messenger import Messenger

__all__ = ["Constant", "Cyclical", "LinearWarmup", "Schedule", "kl_scale", "parse_schedule"]


def kl_scale(beta: float) -> Messenger:
    """The handler that weights latent sites by ``beta`` (>= 0): wrap their ``pyro.sample``."""
    if beta > 0:
        return poutine.scale(scale=beta)
    if beta == 0:
        return poutine.mask(mask=False)
    raise ValueError(f"beta must be >= 0, got {beta}")


class Schedule(Protocol):
    """beta as a function of the optimisation step (0-based)."""

    def __call__(self, step: int) -> float: ...


@dataclass(frozen=True)
class Constant:
    """beta(step) = beta."""

    beta: float = 1.0

    def __call__(self, step: int) -> float:
        return self.beta


@dataclass(frozen=True)
class LinearWarmup:
    """KL warm-up: beta rises linearly from ``start`` to ``end`` over ``steps``, then stays."""

    steps: int
    start: float = 0.0
    end: float = 1.0

    def __call__(self, step: int) -> float:
        if self.steps <= 0:
            return self.end
        return self.start + (self.end - self.start) * min(1.0, step / self.steps)


@dataclass(frozen=True)
class Cyclical:
    """Cyclical annealing (Fu et al. 2019): in each cycle of ``period`` steps beta rises
    linearly from 0 to ``end`` over the first ``ratio`` of the cycle, then stays at ``end``."""

    period: int
    ratio: float = 0.5
    end: float = 1.0

    def __call__(self, step: int) -> float:
        phase = (step % self.period) / self.period
        return self.end * min(1.0, phase / self.ratio)


def parse_schedule(spec: str) -> Schedule:
    """``"0.5"`` (constant), ``"warmup:STEPS[:END]"`` or ``"cyclical:PERIOD[:RATIO[:END]]"``."""
    kind, *values = spec.split(":")
    try:
        if kind == "warmup":
            steps, *rest = values
            return LinearWarmup(int(steps), end=float(rest[0]) if rest else 1.0)
        if kind == "cyclical":
            period, *rest = values
            ratio = float(rest[0]) if rest else 0.5
            return Cyclical(int(period), ratio, float(rest[1]) if len(rest) > 1 else 1.0)
        beta = float(kind)
    except (ValueError, IndexError):
        raise ValueError(
            f"bad beta schedule {spec!r}: use a number, warmup:STEPS[:END] or "
            "cyclical:PERIOD[:RATIO[:END]]"
        ) from None
    if not math.isfinite(beta) or beta < 0 or values:
        raise ValueError(f"bad beta {spec!r}: a number >= 0")
    return Constant(beta)
