"""The settings of a training run (:class:`TrainConfig`), the values they may take, and the
per-epoch record it leaves (:class:`History`).

A run maximises the beta-ELBO  L_beta(x) = E_q[log p(x | z)] - beta * KL(q(z | x) || p(z))
and reports, per epoch, ELBO = reconstruction - KL on validation images (beta = 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ppl_vae.elbo import ELBOS, canonical_beta, parse_objective

__all__ = [
    "ENGINES",
    "HISTORY_COLUMNS",
    "LR_SCHEDULES",
    "PRECISIONS",
    "RUNTIME_SETTINGS",
    "History",
    "TrainConfig",
]

LR_SCHEDULES = (None, "cosine", "exponential")
"""Values of ``TrainConfig.lr_schedule``."""

PRECISIONS = ("float32", "bfloat16")
"""Values of ``TrainConfig.precision``: the dtype of the networks' matrix products in training
steps (``torch.autocast``); parameters, optimizer state, the ELBO's sums and validation stay
float32."""

ENGINES = ("eager", "compiled")
"""Values of ``TrainConfig.engine``: each step through Pyro's handlers, or the step captured
once per batch shape and replayed as a compiled graph (:mod:`ppl_vae.training.compiled`)."""

HISTORY_COLUMNS = (
    "epoch",
    "step",
    "seconds",
    "train_seconds",
    "lr",
    "beta",
    "train_objective",
    "val_elbo",
    "val_elbo_se",
    "val_reconstruction",
    "val_kl",
    "val_objective",
    "best",
)
"""Columns of a history row (and of ``history.csv``), in order; see :class:`History`."""

RUNTIME_SETTINGS = (
    "device",
    "progress",
    "threads",
    "checkpoint_every",
    "engine",
    "flush_subnormals",
)
"""TrainConfig fields that may differ when a run is resumed: where and how it runs, not
what it computes. (Other thread counts, devices or engines can change the last bits.)"""

# Values renamed since configurations were saved: the default engine was once called "fast".
_RENAMED = {"engine": {"fast": "eager"}}


def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")


def _finite_at_least(name: str, value: Any, low: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= low):
        raise ValueError(f"TrainConfig.{name} must be a number >= {low:g}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run; plain data (``dataclasses.asdict`` gives JSON).

    :param epochs: passes over the training set.
    :param batch_size: images per step.
    :param lr: Adam's learning rate (other settings are torch's defaults).
    :param lr_schedule: ``None``, ``"cosine"`` or ``"exponential"``, stepped once per epoch.
    :param lr_gamma: factor per epoch of the exponential schedule.
    :param lr_min: the rate the cosine schedule approaches at the end.
    :param elbo: one of :data:`~ppl_vae.elbo.ELBOS`.
    :param num_particles: samples of z per image and step (vectorised when > 1).
    :param beta: the KL weight: a number >= 0, or a schedule's text, ``"warmup:STEPS[:END]"``
        or ``"cyclical:PERIOD[:RATIO[:END]]"`` (:func:`~ppl_vae.elbo.parse_schedule`; not
        with a Jit ELBO). Held in one form (:func:`~ppl_vae.elbo.canonical_beta`): ``"1"``
        becomes 1.0 and ``"warmup:10:1"`` ``"warmup:10"``, so equal weights compare equal.
    :param seed: seeds Pyro (torch, numpy, random), the batch order and the validation draws.
    :param device: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``) or ``"auto"`` (CUDA when present).
    :param progress: show a tqdm progress bar.
    :param max_plate_nesting: passed to the ELBO.
    :param threads: torch's CPU threads during the run; ``None`` leaves torch's default.
    :param eval_batch_size: images per validation batch; ``None`` uses 1,000 (or
        ``batch_size`` when larger): big batches cost a third less than training-sized ones.
    :param checkpoint_every: with an ``out_dir``, also write ``last.ckpt`` every this many
        steps (within epochs), so a killed run loses at most that many steps; ``None``:
        at the end of every epoch only.
    :param precision: ``"bfloat16"`` runs the training steps' forward pass under
        ``torch.autocast`` (mixed precision: matrix products in bfloat16, with float32
        accumulation on CPUs with AVX-512 BF16 and on GPUs); networks must return float32
        (those of :mod:`ppl_vae.vae.networks` do). Non-Jit ELBOs only.
    :param free_bits: lambda in nats per image, > 0 to train on reconstruction - sum over
        latent sites of max(lambda, KL) (:class:`ppl_vae.elbo.beta.FreeBits`) instead of the
        beta-ELBO's KL term; validation still reports the ELBO. 0: off. Not with Jit ELBOs.
    :param objective: ``"elbo"`` (the ELBO class ``elbo`` names), or ``"iwae:K"`` /
        ``"dreg:K"``: the K-sample importance-weighted bound log (1/K) sum_k p(x, z_k) /
        q(z_k | x) (Burda et al. 2015) with its reparameterised or doubly reparameterised
        (Tucker et al. 2018) gradient (:mod:`ppl_vae.elbo.importance_weighted`); beta = 1,
        one particle, no free bits, ``elbo`` left at its default. Validation reports the ELBO.
    :param patience: stop early once this many epochs have passed without a better
        validation ELBO (``best.ckpt`` holds the best epoch); ``None``: run every epoch.
    :param engine: ``"eager"`` (each step through Pyro's handlers) or ``"compiled"``: the
        loss and its gradients captured once per batch shape and replayed as an inductor
        graph (CUDA graphs on a GPU), the same noise and numbers to float rounding; a pair
        that cannot be captured trains eagerly after a one-line warning. Not with Jit ELBOs.
    :param flush_subnormals: train with float results below 2^-126 (subnormals) read as 0
        on the CPU (:mod:`~ppl_vae.training.subnormals`): Adam's moments of rarely-active
        weights otherwise decay through that range, where arithmetic is ~100x slower.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str | None = None
    lr_gamma: float = 0.95
    lr_min: float = 0.0
    elbo: str = "meanfield"
    num_particles: int = 1
    beta: float | str = 1.0
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    max_plate_nesting: int = 1
    threads: int | None = None
    eval_batch_size: int | None = None
    checkpoint_every: int | None = None
    precision: str = "float32"
    free_bits: float = 0.0
    objective: str = "elbo"
    patience: int | None = None
    engine: str = "eager"
    flush_subnormals: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "num_particles", "max_plate_nesting"):
            _positive_int(name, getattr(self, name))
        for name in ("threads", "eval_batch_size", "checkpoint_every", "patience"):
            _positive_int(name, getattr(self, name), allow_none=True)
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        try:  # frozen: the one form is set through object.__setattr__, once
            object.__setattr__(self, "beta", canonical_beta(self.beta))
        except ValueError as error:
            raise ValueError(f"TrainConfig.beta: {error}") from None
        _finite_at_least("free_bits", self.free_bits, 0)
        if not isinstance(self.flush_subnormals, bool):
            raise ValueError(
                f"TrainConfig.flush_subnormals must be True or False, got {self.flush_subnormals!r}"
            )
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"TrainConfig.lr_gamma must lie in (0, 1], got {self.lr_gamma!r}")
        if not 0 <= self.lr_min < self.lr:
            raise ValueError(f"TrainConfig.lr_min must lie in [0, lr), got {self.lr_min!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}"
            )
        if self.elbo not in ELBOS:
            raise ValueError(f"unknown elbo {self.elbo!r}; choose one of {ELBOS}")
        jit = self.elbo.startswith("jit")
        if isinstance(self.beta, str) and jit:
            raise ValueError(
                f"elbo={self.elbo!r} compiles once per distinct keyword value, so the beta "
                f"schedule {self.beta!r} would recompile at every step: use elbo='meanfield' "
                "or 'trace' with a schedule"
            )
        if self.free_bits > 0 and jit:
            raise ValueError(
                "free_bits decides per step whether KL is below lambda (a Python branch), which "
                f"a Jit ELBO would trace once: use elbo='meanfield' or 'trace', not {self.elbo!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if self.precision != "float32" and jit:
            raise ValueError(
                f"precision={self.precision!r} needs a non-Jit elbo, got elbo={self.elbo!r}"
            )
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {ENGINES}")
        if self.engine == "compiled" and jit:
            raise ValueError(
                f"engine='compiled' captures the step itself; elbo={self.elbo!r} would trace it "
                "a second time with torch.jit: use elbo='meanfield' or 'trace'"
            )
        self._check_objective()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be an integer >= 0, got {self.seed!r}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; choose cpu, cuda[:N] or auto")

    def _check_objective(self) -> None:
        """The importance-weighted objectives are estimators of their own, of beta = 1."""
        try:
            kind, k = parse_objective(self.objective)
        except ValueError as error:
            raise ValueError(f"TrainConfig.objective: {error}") from None
        if kind == "elbo":
            return
        clash = []
        if self.elbo != "meanfield":
            clash.append(f"elbo={self.elbo!r} (the objective is its own estimator)")
        if self.num_particles != 1:
            clash.append(f"num_particles={self.num_particles} (K of {kind}:K is the samples)")
        if self.beta != 1.0:
            clash.append(f"beta={self.beta!r} (the bound has no KL term to weight)")
        if self.free_bits > 0:
            clash.append(f"free_bits={self.free_bits:g}")
        if clash:
            raise ValueError(
                f"objective={self.objective!r} trains the {k}-sample importance-weighted bound "
                f"and cannot be combined with {'; '.join(clash)}: leave those at their defaults"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``. ``engine="fast"``,
        which older configurations hold, reads as ``"eager"`` (its name now)."""
        values = dict(values)
        for name, renamed in _RENAMED.items():
            if values.get(name) in renamed:
                values[name] = renamed[values[name]]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class History:
    """One dict per finished epoch, with the keys of :data:`HISTORY_COLUMNS`.

    ``train_objective`` is the mean per training image of -loss over the epoch, i.e. the
    beta-ELBO estimate the optimiser saw (the ELBO when beta = 1; the K-sample bound with
    ``objective="iwae:K"`` or ``"dreg:K"``). The ``val_*`` numbers are
    means per validation image at the end of the epoch, with beta = 1 except
    ``val_objective`` = reconstruction - beta * KL; ``val_elbo_se`` is the standard error of
    the mean ELBO over images (one z each). ``best`` marks the epochs that improved on all
    before (validation ELBO, or the training objective without validation). ``None`` stands
    for a number that does not exist (no validation set). ``seconds`` is the epoch's wall
    time (training and validation), ``train_seconds`` that of its steps alone; ``lr`` the
    rate used during the epoch and ``beta`` that of its last step. ``stopped_early`` is the
    last epoch trained when ``TrainConfig.patience`` ended the run before ``epochs``.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: int | None = None  # the last epoch, when the patience ran out before
    out_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    def column(self, name: str) -> list[Any]:
        """The values of one column, epoch by epoch."""
        return [row[name] for row in self.rows]
