"""Scaling the KL term: beta, KL warm-up, cyclical schedules and free bits, all through ``poutine``.

A beta applied to the latent sites of both model and guide multiplies exactly the KL term:
ELBO_beta = E_q[log p(x | z)] - beta KL(q(z | x) || p(z)). Pyro's ``poutine.scale`` needs a
positive scale, so beta = 0 (the start of a warm-up) masks the latent sites instead, which
removes their log-densities, i.e. the KL term, exactly.

A KL weight is a number or a schedule beta(step) (:class:`LinearWarmup`, :class:`Cyclical`),
each with a text form (``spec``) that :func:`parse_schedule` reads back; :func:`canonical_beta`
gives the one form a configuration holds, so equal weights compare equal.

Free bits (Kingma et al. 2016) replace each latent site's KL term by max(lambda, KL): below
lambda nats per datapoint the site's log-densities are masked in model and guide (no gradient
pushes its KL further down) and a constant -lambda takes their place (:class:`FreeBits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

__all__ = [
    "Constant",
    "Cyclical",
    "FreeBits",
    "LinearWarmup",
    "Schedule",
    "as_schedule",
    "canonical_beta",
    "kl_scale",
    "parse_schedule",
]


def kl_scale(beta: float | torch.Tensor) -> Messenger:
    """The handler that weights latent sites by ``beta`` (>= 0): wrap their ``pyro.sample``.

    A 0-d tensor beta (the compiled engine's, when it changes from step to step) scales
    without a Python branch on its value: at 0 it multiplies the KL term by 0 instead of
    masking it, which gives the same loss and gradients while the KL is finite."""
    if isinstance(beta, torch.Tensor):
        with pyro.validation_enabled(False):  # Pyro's check reads the value (and refuses 0)
            return poutine.scale(scale=beta)
    if beta > 0:
        return poutine.scale(scale=beta)
    if beta == 0:
        return poutine.mask(mask=False)
    raise ValueError(f"beta must be >= 0, got {beta}")


class Schedule(Protocol):
    """beta as a function of the optimisation step (0-based)."""

    def __call__(self, step: int) -> float: ...


def _number(value: float) -> str:
    """A float as the shortest text that reads back as the same float, without a trailing
    ".0": 1.0 -> "1", 0.25 -> "0.25"."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class Constant:
    """beta(step) = beta."""

    beta: float = 1.0

    def __call__(self, step: int) -> float:
        return self.beta

    @property
    def spec(self) -> str:
        """The text :func:`parse_schedule` reads back as this object: ``"0.5"``."""
        return _number(self.beta)


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

    @property
    def spec(self) -> str:
        """The canonical text ``"warmup:STEPS[:END]"`` (END only when not 1).

        :raises ValueError: for ``start != 0``, which the text form cannot say.
        """
        if self.start != 0:
            raise ValueError(f"{self!r} starts above 0, which warmup:STEPS[:END] cannot say")
        return ":".join(["warmup", str(self.steps), *_trailing((self.end,), (1.0,))])


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

    @property
    def spec(self) -> str:
        """The canonical text ``"cyclical:PERIOD[:RATIO[:END]]"`` (trailing defaults left out)."""
        values = _trailing((self.ratio, self.end), (0.5, 1.0))
        return ":".join(["cyclical", str(self.period), *values])


def _trailing(values: tuple[float, ...], defaults: tuple[float, ...]) -> list[str]:
    """``values`` as text, without the trailing ones equal to their defaults."""
    kept = list(values)
    while kept and kept[-1] == defaults[len(kept) - 1]:
        kept.pop()
    return [_number(v) for v in kept]


_GRAMMAR = "use a number, warmup:STEPS[:END] or cyclical:PERIOD[:RATIO[:END]]"
_MOST_VALUES = {"warmup": 2, "cyclical": 3}  # after the kind


def _weight(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def parse_schedule(spec: str) -> Schedule:
    """``"0.5"`` (constant), ``"warmup:STEPS[:END]"`` or ``"cyclical:PERIOD[:RATIO[:END]]"``,
    with STEPS >= 0, PERIOD >= 1, 0 < RATIO <= 1 and END (or the constant) a number >= 0.
    ``parse_schedule(s.spec) == s`` for every schedule ``s`` it returns.

    :raises ValueError: ``"bad beta ..."``, for text outside that grammar or those ranges.
    """
    kind, *values = spec.split(":")
    try:
        schedule = _read(kind, values)
    except (ValueError, IndexError):
        raise ValueError(f"bad beta schedule {spec!r}: {_GRAMMAR}") from None
    if isinstance(schedule, Constant):
        if values or not _weight(schedule.beta):
            raise ValueError(f"bad beta {spec!r}: a number >= 0")
        return schedule
    problem = None
    if len(values) > _MOST_VALUES[kind]:
        problem = f"too many values; {_GRAMMAR}"
    elif not _weight(schedule.end):
        problem = "END must be a number >= 0"
    elif isinstance(schedule, LinearWarmup) and schedule.steps < 0:
        problem = "STEPS must be >= 0"
    elif isinstance(schedule, Cyclical) and not (schedule.period >= 1 and 0 < schedule.ratio <= 1):
        problem = "PERIOD must be >= 1 and 0 < RATIO <= 1"
    if problem is not None:
        raise ValueError(f"bad beta schedule {spec!r}: {problem}")
    return schedule


def _read(kind: str, values: list[str]) -> Schedule:
    """The schedule the text's parts name, unchecked; ``ValueError`` or ``IndexError`` when
    they are not numbers or too few."""
    if kind == "warmup":
        steps, *rest = values
        return LinearWarmup(int(steps), end=float(rest[0]) if rest else 1.0)
    if kind == "cyclical":
        period, *rest = values
        ratio = float(rest[0]) if rest else 0.5
        return Cyclical(int(period), ratio, float(rest[1]) if len(rest) > 1 else 1.0)
    return Constant(float(kind))


def canonical_beta(value: float | str | Schedule) -> float | str:
    """The one form of a KL weight that configurations hold and compare: a constant as a
    float (``1``, ``"1"`` and ``"1.0"`` all give 1.0), a schedule as its canonical text
    (``"warmup:10"`` and ``"warmup:10:1"`` both give ``"warmup:10"``). Takes a number >= 0,
    the text :func:`parse_schedule` reads, or a :class:`Constant`, :class:`LinearWarmup` or
    :class:`Cyclical`.

    :raises ValueError: for anything else (text: with :func:`parse_schedule`'s message).
    """
    if isinstance(value, Constant | LinearWarmup | Cyclical):
        value = value.spec
    if isinstance(value, str):
        schedule = parse_schedule(value)
        return schedule.beta if isinstance(schedule, Constant) else schedule.spec
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"bad beta {value!r}: a number >= 0 or a schedule's text; {_GRAMMAR}")
    if not _weight(value):
        raise ValueError(f"bad beta {value!r}: a number >= 0")
    return float(value)


def as_schedule(beta: float | str) -> Schedule:
    """The schedule a KL weight in either form of :func:`canonical_beta` stands for."""
    beta = canonical_beta(beta)
    return parse_schedule(beta) if isinstance(beta, str) else Constant(beta)


# --------------------------------------------------------------------------------------------
# Free bits
# --------------------------------------------------------------------------------------------


def _device(msg: dict[str, Any]) -> torch.device:
    """The device of a site's distribution (CPU when it does not say)."""
    mask = msg.get("mask")
    if isinstance(mask, torch.Tensor):
        return mask.device
    try:
        return msg["fn"].mean.device
    except (AttributeError, NotImplementedError, RuntimeError):
        return torch.device("cpu")


def _gate(msg: dict[str, Any]) -> torch.Tensor:
    """Set the site's mask to a fresh boolean tensor (its former mask, if any, and True) and
    return it: switching it off in place later masks the site in every trace that holds it."""
    mask = msg["mask"]
    gate = torch.ones((), dtype=torch.bool, device=_device(msg))
    if isinstance(mask, torch.Tensor):
        gate = gate & mask  # a new tensor, owned here
    elif mask is not None:
        gate = gate & bool(mask)
    msg["mask"] = gate
    return gate


class _FreeBitsMessenger(Messenger):
    """The handler of :class:`FreeBits` on one side (``"guide"`` or ``"model"``)."""

    def __init__(self, owner: FreeBits, role: str) -> None:
        super().__init__()
        self.owner = owner
        self.role = role
        self._pending: dict[str, torch.Tensor] = {}

    def __enter__(self):
        if self.role == "guide":
            self.owner._guide_sites = {}
        return super().__enter__()

    def _applies(self, msg: dict[str, Any]) -> bool:
        if msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg):
            return False
        if self.owner.sites is not None and msg["name"] not in self.owner.sites:
            return False
        return self.role == "guide" or msg["name"] in self.owner._guide_sites

    def _process_message(self, msg: dict[str, Any]) -> None:
        if self._applies(msg):
            # Set in the process phase: the traces copy each site before this handler's
            # post-process phase runs, and share the gate tensor with it.
            self._pending[msg["name"]] = _gate(msg)

    def _postprocess_message(self, msg: dict[str, Any]) -> None:
        gate = self._pending.pop(msg["name"], None) if msg["type"] == "sample" else None
        if gate is None:
            return
        if self.role == "guide":
            self.owner._guide_sites[msg["name"]] = (msg["fn"], gate)
            return
        self.owner._decide(msg, gate)


class FreeBits:
    """Free bits (Kingma et al. 2016) through ``poutine``: per latent site g ("group"),

        objective = E_q[log p(x | z)] - sum_g max(lambda, KL_g)   (per datapoint),

    KL_g the site's KL(q || p) per datapoint averaged over the minibatch (closed form where
    ``torch.distributions.kl_divergence`` has the pair, else log q(z) - log p(z) at the draw).

    Wrap both halves of the pair, ``FreeBits(lam).guide(guide)`` and ``.model(model)``, and
    hand them to any ``Trace*_ELBO`` (the guide runs first, as in every Pyro ELBO). The guide's
    handler gives each latent site a boolean mask tensor; the model's, seeing q, p and z,
    computes KL_g and, when KL_g < lambda, switches both masks off in place, removing the
    site's log-densities (so the KL term and its gradient) from model and guide, and adds
    ``pyro.factor(name + "/free_bits", -lambda)`` in the site's plates, scale and mask. The
    loss is then exactly -(reconstruction - lambda) for that site and its gradient the
    reconstruction's alone; above lambda nothing changes. A beta on the sites (``kl_scale``)
    scales max(lambda, KL_g) as a whole.

    ``kl`` and ``clamped`` hold, per site, KL_g and whether it was below lambda at the last
    call. :func:`ppl_vae.elbo_ledger` of the wrapped pair lists the constant as an observed
    site ``<site>/free_bits`` beside the (then zero) KL term. Not for Jit ELBOs (the decision
    is a Python branch on a value). Sites that the wrapped guide did not draw (the model run
    on its own) are left alone.

    :param lam: lambda, nats per datapoint, >= 0 (0: the plain ELBO).
    :param sites: the latent sites to treat (default: every latent site of the guide).
    """

    def __init__(self, lam: float, sites: Iterable[str] | None = None) -> None:
        lam = float(lam)
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"free bits lambda must be a number >= 0, got {lam}")
        self.lam = lam
        self.sites = None if sites is None else frozenset(sites)
        self.kl: dict[str, float] = {}
        self.clamped: dict[str, bool] = {}
        self._guide_sites: dict[str, tuple[Any, torch.Tensor]] = {}

    def __repr__(self) -> str:
        sites = None if self.sites is None else sorted(self.sites)
        return f"FreeBits(lam={self.lam!r}, sites={sites})"

    def guide(self, fn: Callable) -> Callable:
        """``fn`` with the guide-side handler: records q and gives each latent site its mask."""
        return _FreeBitsMessenger(self, "guide")(fn)

    def model(self, fn: Callable) -> Callable:
        """``fn`` with the model-side handler: max(lambda, KL) on each latent site."""
        return _FreeBitsMessenger(self, "model")(fn)

    def _decide(self, msg: dict[str, Any], gate: torch.Tensor) -> None:
        name = msg["name"]
        q, guide_gate = self._guide_sites[name]
        p, z = msg["fn"], msg["value"]
        with torch.no_grad():
            try:
                kl = kl_divergence(q, p)
            except NotImplementedError:
                if msg["infer"].get("_enumerate_dim") is not None:
                    raise ValueError(
                        f"free bits on the enumerated site {name!r} needs a closed-form "
                        f"KL({type(q).__name__} || {type(p).__name__})"
                    ) from None
                kl = q.log_prob(z) - p.log_prob(z)
            # Per datapoint: sum over the dims no plate covers, mean over the plates' elements.
            count = 1
            for frame in msg["cond_indep_stack"]:
                if frame.vectorized and -frame.dim <= kl.dim():
                    count *= kl.shape[frame.dim]
            kl_per_item = float(kl.sum()) / count
        self.kl[name] = kl_per_item
        self.clamped[name] = kl_per_item < self.lam
        if not self.clamped[name]:
            return
        guide_gate.fill_(False)
        gate.fill_(False)
        # The constant -lambda per datapoint, in the site's plates, scale and mask.
        log_factor = torch.full((), -self.lam, dtype=torch.get_default_dtype(), device=gate.device)
        pyro.factor(f"{name}/free_bits", log_factor)
