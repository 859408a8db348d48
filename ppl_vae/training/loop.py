"""Training by stochastic variational inference: the loop, its records and its checkpoints.

:func:`fit` maximises the beta-ELBO of a model/guide pair over a training set,

    L_beta(x) = E_q[log p(x | z)] - beta * KL(q(z | x) || p(z)),

one minibatch per step, with Adam on the gradient of a Monte Carlo estimate of -L_beta
(Pyro's ELBO objects; ``"meanfield"`` uses the closed-form KL where it exists). After every
epoch it evaluates the true ELBO (beta = 1) on a validation set, image by image, and records

    ELBO = reconstruction - KL,  reconstruction = E_q[log p(x | z)],  KL = KL(q || p),

as means per image (nats), with the standard error of the ELBO's mean. The history goes to
``history.csv`` and ``history.json`` and the weights to ``checkpoints/last.ckpt`` and
``checkpoints/best.ckpt`` (best validation ELBO) after every epoch, each file replaced
atomically; with ``TrainConfig.checkpoint_every`` set, ``last.ckpt`` is also written every
that many steps.

Reliability:

- Exact resume: a checkpoint holds the parameters, the optimizer's and scheduler's state,
  the counters, the position in the epoch's data order (which depends on the seed and the
  epoch only) with the state of the generator that draws it (and the dynamic binarisation),
  the running sums of the epoch in progress, the history, and every random state.
  ``fit(..., resume=checkpoint)`` continues from it, bitwise equal to an uninterrupted run
  on the same machine and settings (the fast engine; the "svi" engine cannot resume).
- NaN guard: a non-finite loss stops the run at that step (on CPU before its update is
  applied; on CUDA within a few steps, without a sync per step), naming the sample site
  whose ELBO term is non-finite, or the parameter whose gradient was; nothing non-finite is
  ever written to a checkpoint.
- Signals: with ``out_dir``, SIGINT (Ctrl-C) and SIGTERM write ``last.ckpt`` at the next
  step boundary and raise :class:`~ppl_vae.errors.TrainingInterrupted`.
- Resuming with another configuration raises :class:`~ppl_vae.errors.ConfigMismatchError`.

Two engines give the same parameters from the same seed:

- ``"fast"`` (default): ``elbo.differentiable_loss`` and ONE ``torch.optim.Adam`` (fused)
  over every parameter of Pyro's param store; on CUDA the loss is summed on the device and
  read once per epoch (plus, with a progress bar, about twice a second for its running
  value), on CPU each step's loss is read as it comes (a fraction of a microsecond);
- ``"svi"``: ``pyro.infer.SVI`` with ``pyro.optim.Adam`` (one torch Adam per parameter, the
  same defaults), for reference. It saves no optimizer state in its checkpoints.

Learning-rate schedules step once per epoch: ``"exponential"`` multiplies the rate by
``lr_gamma``; ``"cosine"`` anneals it from ``lr`` towards ``lr_min`` over the run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import ELBO, SVI
from torch import Tensor, nn
from tqdm.auto import tqdm

from ppl_vae.atomic import json_ready, write_atomically, write_json
from ppl_vae.checkpoint import (
    Checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    restore,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
)
from ppl_vae.data import batches, binarize
from ppl_vae.elbo import (
    ELBOS,
    FreeBits,
    PairStructure,
    elbo_by_name,
    inspect_pair,
    sampled_site_terms,
)
from ppl_vae.errors import (
    CheckpointError,
    ConfigMismatchError,
    DataError,
    TrainingDivergedError,
    TrainingInterrupted,
    WriteError,
)
from ppl_vae.rng import forked_rng, sub_seed

__all__ = [
    "ELBOS",
    "ENGINES",
    "HISTORY_COLUMNS",
    "LR_SCHEDULES",
    "PRECISIONS",
    "RUNTIME_SETTINGS",
    "History",
    "TrainConfig",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "config_differences",
    "fit",
    "make_elbo",
    "resolve_device",
]

ENGINES = ("fast", "svi")
"""Values of ``TrainConfig.engine``."""

LR_SCHEDULES = (None, "cosine", "exponential")
"""Values of ``TrainConfig.lr_schedule``."""

PRECISIONS = ("float32", "bfloat16")
"""Values of ``TrainConfig.precision``: the dtype of the networks' matrix products in training
steps (``torch.autocast``); parameters, optimizer state, the ELBO's sums and validation stay
float32."""

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

_VAL_COLUMNS = HISTORY_COLUMNS[7:12]  # val_elbo ... val_objective
# Independent random streams derived from the seed (as in ppl_vae.data.datasets).
_STREAM_BATCH_ORDER = 11
_STREAM_VALIDATION = 12
_EVAL_BATCH = 1000  # validation images per batch by default
_PROGRESS_REFRESH_S = 0.5  # a running value on the bar costs one device read this often
_NAN_WARNING = r"Encountered (NaN|\+inf|-inf)"
_PENDING_FLAGS = 8  # CUDA: finiteness flags in flight before the oldest is waited for
_DIAGNOSIS_PARTICLES = 8  # draws per image when a bad step's sites are evaluated again

RUNTIME_SETTINGS = ("device", "progress", "threads", "checkpoint_every")
"""TrainConfig fields that may differ when a run is resumed: where and how it runs, not
what it computes. (Other thread counts or devices can change the last bits of the result.)"""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run; plain data (``dataclasses.asdict`` gives JSON).

    :param epochs: passes over the training set.
    :param batch_size: images per step.
    :param lr: Adam's learning rate (other settings are torch's defaults).
    :param lr_schedule: ``None``, ``"cosine"`` or ``"exponential"``, stepped once per epoch.
    :param lr_gamma: factor per epoch of the exponential schedule.
    :param lr_min: the rate the cosine schedule approaches at the end.
    :param elbo: one of :data:`ELBOS`.
    :param num_particles: samples of z per image and step (vectorised when > 1).
    :param beta: the KL weight, constant (``fit(beta_schedule=...)`` overrides it).
    :param seed: seeds Pyro (torch, numpy, random), the batch order and the validation draws.
    :param device: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``) or ``"auto"`` (CUDA when present).
    :param progress: show a tqdm progress bar.
    :param max_plate_nesting: passed to the ELBO.
    :param engine: ``"fast"`` or ``"svi"`` (see the module docstring).
    :param threads: torch's CPU threads during the run; ``None`` leaves torch's default.
    :param eval_batch_size: images per validation batch; ``None`` uses 1,000 (or
        ``batch_size`` when larger): big batches cost a third less than training-sized ones.
    :param checkpoint_every: with an ``out_dir``, also write ``last.ckpt`` every this many
        steps (within epochs), so a killed run loses at most that many steps; ``None``:
        at the end of every epoch only.
    :param precision: ``"bfloat16"`` runs the training steps' forward pass under
        ``torch.autocast`` (mixed precision: matrix products in bfloat16, with float32
        accumulation on CPUs with AVX-512 BF16 and on GPUs); networks must return float32
        (those of :mod:`ppl_vae.vae.networks` do). Fast engine, non-Jit ELBOs only.
    :param free_bits: lambda in nats per image, > 0 to train on reconstruction - sum over
        latent sites of max(lambda, KL) (:class:`ppl_vae.elbo.beta.FreeBits`) instead of the
        beta-ELBO's KL term; validation still reports the ELBO. 0: off. Not with Jit ELBOs.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str | None = None
    lr_gamma: float = 0.95
    lr_min: float = 0.0
    elbo: str = "meanfield"
    num_particles: int = 1
    beta: float = 1.0
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    max_plate_nesting: int = 1
    engine: str = "fast"
    threads: int | None = None
    eval_batch_size: int | None = None
    checkpoint_every: int | None = None
    precision: str = "float32"
    free_bits: float = 0.0

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")

        for name in ("epochs", "batch_size", "num_particles", "max_plate_nesting"):
            positive_int(name, getattr(self, name))
        positive_int("threads", self.threads, allow_none=True)
        positive_int("eval_batch_size", self.eval_batch_size, allow_none=True)
        positive_int("checkpoint_every", self.checkpoint_every, allow_none=True)
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"TrainConfig.beta must be a number >= 0, got {self.beta!r}")
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
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {ENGINES}")
        if not (
            isinstance(self.free_bits, int | float)
            and math.isfinite(self.free_bits)
            and self.free_bits >= 0
        ):
            raise ValueError(f"TrainConfig.free_bits must be a number >= 0, got {self.free_bits!r}")
        if self.free_bits > 0 and self.elbo.startswith("jit"):
            raise ValueError(
                "free_bits decides per step whether KL is below lambda (a Python branch), which "
                f"a Jit ELBO would trace once: use elbo='meanfield' or 'trace', not {self.elbo!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if self.precision != "float32" and (self.engine != "fast" or self.elbo.startswith("jit")):
            raise ValueError(
                f"precision={self.precision!r} needs engine='fast' and a non-Jit elbo, got "
                f"engine={self.engine!r}, elbo={self.elbo!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be an integer >= 0, got {self.seed!r}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; choose cpu, cuda[:N] or auto")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class History:
    """One dict per finished epoch, with the keys of :data:`HISTORY_COLUMNS`.

    ``train_objective`` is the mean per training image of -loss over the epoch, i.e. the
    beta-ELBO estimate the optimiser saw (the ELBO when beta = 1). The ``val_*`` numbers are
    means per validation image at the end of the epoch, with beta = 1 except
    ``val_objective`` = reconstruction - beta * KL; ``val_elbo_se`` is the standard error of
    the mean ELBO over images (one z each). ``best`` marks the epochs that improved on all
    before (validation ELBO, or the training objective without validation). ``None`` stands
    for a number that does not exist (no validation set). ``seconds`` is the epoch's wall
    time (training and validation), ``train_seconds`` that of its steps alone; ``lr`` the
    rate used during the epoch and ``beta`` that of its last step.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
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


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; others as given (CUDA must exist)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here")
    return device


def make_elbo(config: TrainConfig) -> ELBO:
    """A fresh Pyro ELBO object named by ``config.elbo``
    (:func:`ppl_vae.elbo.pyro_elbos.elbo_by_name`)."""
    return elbo_by_name(
        config.elbo,
        num_particles=config.num_particles,
        max_plate_nesting=config.max_plate_nesting,
    )


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_history(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    clean = [json_ready({k: row[k] for k in HISTORY_COLUMNS}) for row in rows]
    write_json(out_dir / "history.json", clean, indent=1)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in clean:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    write_atomically(out_dir / "history.csv", buffer.getvalue())


def _check_images(images: Tensor, name: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 2 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DataError(f"{name} must be a 2-D float tensor (N, D) of flattened images, got {got}")
    if images.shape[0] == 0:
        raise DataError(f"{name} holds no images")


def _register_params(model: Callable, guide: Callable, x: Tensor, kwargs: dict) -> None:
    """Run the guide, and the model against it, once, so every ``pyro.param`` and
    ``pyro.module`` has entered the param store (the fast engine's optimizer needs them all
    up front)."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(x, **kwargs)
        poutine.replay(model, trace=guide_trace)(x, **kwargs)


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------


class _FastEngine:
    """``elbo.differentiable_loss`` and one fused Adam over the whole param store.

    A Jit ELBO gets one ELBO object per batch shape: each compiles once, for its shape, so the
    last, smaller batch of an epoch is trained on like the others instead of being replayed
    through a trace made for another size."""

    can_resume = True

    def __init__(self, model, guide, config: TrainConfig, x0: Tensor, kwargs, device, binary: bool):
        self.model, self.guide, self.config = model, guide, config
        self.jit = config.elbo.startswith("jit")
        self.autocast = config.precision != "float32"
        self.device = torch.device(device)
        self.device_type = self.device.type
        self.elbo = make_elbo(config)
        self.elbos: dict[torch.Size, ELBO] = {}
        # Registering the params draws from the guide: do it off the main stream, so both
        # engines draw the same numbers from the same seed.
        with forked_rng(device):
            _register_params(model, guide, binarize(x0) if binary else x0, kwargs)
        store = pyro.get_param_store()
        self.names = list(store.keys())
        self.params = [p for _, p in store.named_parameters()]
        # Pyro's Adam wraps torch's per parameter with torch's defaults: the same update,
        # here as one fused kernel over every parameter (~0.5 ms a step less than foreach at
        # 0.65 M parameters on one CPU core; benchmarks/README.md).
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, fused=True)
        self.scheduler = None
        if config.lr_schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=config.epochs, eta_min=config.lr_min
            )
        elif config.lr_schedule == "exponential":
            self.scheduler = torch.optim.lr_scheduler.ExponentialLR(
                self.optimizer, gamma=config.lr_gamma
            )

    def backward(self, x: Tensor, kwargs: dict) -> Tensor:
        """The step's loss, its gradients in ``.grad``; :meth:`update` applies them."""
        elbo = self.elbo
        if self.jit:
            elbo = self.elbos.get(x.shape)
            if elbo is None:
                elbo = self.elbos[x.shape] = make_elbo(self.config)
                # Compiling runs model and guide twice more (Pyro's parameter capture, then
                # torch.jit.trace): do it off the main random stream, so that a Jit run draws
                # what the plain ELBO draws, and a resumed run what the uninterrupted one did.
                with forked_rng(self.device):
                    elbo.differentiable_loss(self.model, self.guide, x, **kwargs)
        if self.autocast:  # the forward pass only; backward runs each op in its forward dtype
            with torch.autocast(self.device_type, dtype=torch.bfloat16):
                loss = elbo.differentiable_loss(self.model, self.guide, x, **kwargs)
        else:
            loss = elbo.differentiable_loss(self.model, self.guide, x, **kwargs)
        loss.backward()
        return loss.detach()

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def end_epoch(self) -> None:
        known = set(self.names)
        new = [name for name in pyro.get_param_store().keys() if name not in known]
        if new:
            raise RuntimeError(
                f"parameters {new[:5]} entered the param store after the first step; the fast "
                "engine optimises only those present at the start: create every parameter on "
                "the first call, or use engine='svi'"
            )
        if self.scheduler is not None:
            self.scheduler.step()

    def parameters(self) -> list[Tensor]:
        return self.params


class _SviEngine:
    """``pyro.infer.SVI`` with ``pyro.optim`` (one torch Adam per parameter)."""

    can_resume = False  # pyro.optim's per-parameter states are not saved

    def __init__(self, model, guide, elbo, config: TrainConfig):
        adam = {"optimizer": torch.optim.Adam, "optim_args": {"lr": config.lr}}
        if config.lr_schedule == "cosine":
            optim = pyro.optim.CosineAnnealingLR(
                {**adam, "T_max": config.epochs, "eta_min": config.lr_min}
            )
        elif config.lr_schedule == "exponential":
            optim = pyro.optim.ExponentialLR({**adam, "gamma": config.lr_gamma})
        else:
            optim = pyro.optim.Adam({"lr": config.lr})
        self.optim = optim
        self.svi = SVI(model, guide, optim, elbo)
        self.optimizer = None  # no single torch optimizer to checkpoint
        self.scheduler = None
        self._lr = config.lr

    def backward(self, x: Tensor, kwargs: dict) -> Tensor:
        # SVI steps as a whole: the update is applied here, whatever the loss.
        return torch.as_tensor(self.svi.step(x, **kwargs))

    def update(self) -> None:
        pass

    def discard(self) -> None:
        pass

    def lr(self) -> float:
        for obj in self.optim.optim_objs.values():
            if isinstance(self.optim, pyro.optim.PyroLRScheduler):
                return float(obj.get_last_lr()[0])
            return float(obj.param_groups[0]["lr"])
        return self._lr

    def end_epoch(self) -> None:
        if isinstance(self.optim, pyro.optim.PyroLRScheduler):
            self.optim.step()

    def parameters(self) -> list[Tensor]:
        return [p for _, p in pyro.get_param_store().named_parameters()]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@dataclass
class _Validator:
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

    def __call__(self) -> tuple[Tensor, Tensor]:
        """Per-image reconstruction and KL, each of shape (N,), on the device."""
        kwargs = {**self.kwargs, "beta": 1.0}
        modes = {name: m.training for name, m in self.modules.items()}
        recon, kl = [], []
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
                for x in batches(self.images, self.batch_size, shuffle=False):
                    terms = sampled_site_terms(
                        self.model,
                        self.guide,
                        x,
                        num_particles=1,
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
                    recon.append(r)
                    kl.append(k)
        finally:
            for name, m in self.modules.items():
                m.train(modes[name])
        return torch.cat(recon), torch.cat(kl)


def _summarise(recon: Tensor, kl: Tensor, beta: float) -> dict[str, float]:
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
    ).tolist()  # one read from the device
    keys = ("val_elbo", "val_elbo_se", "val_reconstruction", "val_kl", "val_objective")
    return dict(zip(keys, stats, strict=True))


# --------------------------------------------------------------------------------------------
# Configuration guard
# --------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def config_differences(
    saved: Mapping[str, Any],
    wanted: Mapping[str, Any],
    *,
    partial: bool = False,
    ignore: tuple[str, ...] = (),
) -> list[str]:
    """The differences between two nested plain-JSON configurations, one line per key, as
    ``"train.lr: saved 0.01, asked 0.001"`` (numbers compare by value, tuples as lists).

    :param partial: compare only the keys ``wanted`` has (settings given on a command line).
    :param ignore: dotted keys not compared (``"train.device"``).
    """
    saved = json.loads(json.dumps(dict(saved)))
    wanted = json.loads(json.dumps(dict(wanted)))
    out: list[str] = []

    def walk(a: dict, b: dict, prefix: str) -> None:
        keys = set(b) if partial else set(a) | set(b)
        for key in sorted(keys):
            dotted = f"{prefix}{key}"
            if dotted in ignore:
                continue
            if key not in a:
                out.append(f"{dotted}: not saved, asked {_show(b[key])}")
            elif key not in b:
                out.append(f"{dotted}: saved {_show(a[key])}, not given now")
            elif isinstance(a[key], dict) and isinstance(b[key], dict):
                walk(a[key], b[key], f"{dotted}.")
            elif a[key] != b[key] or isinstance(a[key], bool) != isinstance(b[key], bool):
                out.append(f"{dotted}: saved {_show(a[key])}, asked {_show(b[key])}")

    walk(saved, wanted, "")
    return out


# --------------------------------------------------------------------------------------------
# Signals and the NaN guard
# --------------------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGINT/SIGTERM; read by the loop at each step boundary (a Python attribute)."""

    def __init__(self) -> None:
        self.signum: int | None = None


@contextlib.contextmanager
def _catch_signals(enabled: bool) -> Iterator[_StopFlag]:
    """While training, SIGINT and SIGTERM only set a flag: the loop then writes a checkpoint
    at the next step boundary and stops. A second Ctrl-C stops at once (the checkpoints on
    disk stay whole: they are replaced atomically)."""
    flag = _StopFlag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


@dataclass
class _BadStep:
    """A step whose loss was not finite, with what is needed to name the culprit."""

    step: int
    x: Tensor
    beta: float


class _LossGuard:
    """Finds the first step whose loss is not finite, on CUDA, without waiting for the device.

    (On CPU the loop reads each step's loss as it comes, before the update is applied.) On
    CUDA each step's flag is copied to pinned memory without blocking and read once it has
    landed, so no step waits for the device: a bad loss is seen a few steps later, still
    with its own step and batch.
    """

    def __init__(self, device: torch.device) -> None:
        self.lazy = device.type == "cuda"
        self.pending: deque[tuple[_BadStep, Tensor, Any]] = deque()
        self.slots: list[Tensor] = []
        self.next_slot = 0
        if self.lazy:
            self.slots = [
                torch.empty((), dtype=torch.bool).pin_memory() for _ in range(_PENDING_FLAGS)
            ]

    def check(self, loss: Tensor, step: int, x: Tensor, beta: float) -> _BadStep | None:
        """The first bad step known now, or ``None`` (CUDA; on CPU the loop reads the loss)."""
        record = _BadStep(step, x, beta)
        if len(self.pending) == len(self.slots):  # the oldest flag's slot is needed again
            self.pending[0][2].synchronize()
            bad = self._pop()
            if bad is not None:
                return bad
        slot = self.slots[self.next_slot]
        self.next_slot = (self.next_slot + 1) % len(self.slots)
        slot.copy_(torch.isfinite(loss), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((record, slot, event))
        while self.pending and self.pending[0][2].query():
            bad = self._pop()
            if bad is not None:
                return bad
        return None

    def drain(self) -> _BadStep | None:
        """Wait for every flag in flight; the first bad step, if any."""
        while self.pending:
            self.pending[0][2].synchronize()
            bad = self._pop()
            if bad is not None:
                return bad
        return None

    def _pop(self) -> _BadStep | None:
        record, slot, _ = self.pending.popleft()
        if bool(slot):
            return None
        self.pending.clear()
        return record


def _nonfinite_parameters() -> list[str]:
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


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def fit(
    model: Callable,
    guide: Callable,
    train_images: Tensor,
    *,
    config: TrainConfig,
    validation: Tensor | None = None,
    modules: Mapping[str, nn.Module] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    dynamic_binarize: bool = False,
    step_kwargs: Mapping[str, Any] | None = None,
    beta_schedule: Callable[[int], float] | None = None,
    checkpoint_config: Mapping[str, Any] | None = None,
    resume: str | os.PathLike[str] | Checkpoint | None = None,
    handle_signals: bool = True,
) -> History:
    """Train ``(model, guide)`` on ``train_images`` by SVI and return the per-epoch history.

    Each step calls ``model(x, beta=beta, **step_kwargs)`` and the guide alike, ``x`` a batch
    of rows of ``train_images`` in a random order drawn anew each epoch from ``config.seed``
    and the epoch (the last batch is smaller; a Jit ELBO compiles once for each of the two
    shapes, and with ``engine="svi"``, which keeps one, drops that remainder). Validate the
    data once beforehand and pass ``check_data=False`` in ``step_kwargs`` to skip the per-step
    checks of :mod:`ppl_vae.models.vae`. Pyro's argument checks (when enabled) run on the
    first step only: later a NaN argument shows as a NaN loss, which stops the run with
    :class:`TrainingDivergedError`.

    The param store is not cleared: clear it (and seed) for a fresh run. Networks passed in
    ``modules`` (by their ``pyro.module`` names) are moved to the device, put in eval mode
    for validation and saved with the checkpoints; parameters outside them must already be
    on the device.

    :param validation: images to evaluate the ELBO on after every epoch.
    :param out_dir: where ``history.csv``, ``history.json`` and ``checkpoints/{last,best}.ckpt``
        go (created if missing); ``None`` writes nothing.
    :param dynamic_binarize: draw a fresh binary image from each grey training image, per
        batch (validation images are used as given).
    :param beta_schedule: ``beta(step)`` for the 0-based step; overrides ``config.beta``. Not
        with a Jit ELBO, which compiles once per distinct keyword value.
    :param checkpoint_config: more plain JSON stored with the checkpoints' config, next to
        ``"train"`` (the TrainConfig), e.g. the networks' settings.
    :param resume: a checkpoint written by ``fit`` (path or loaded): continue that run from
        where it stopped, with the same model, guide, data and configuration (only
        :data:`RUNTIME_SETTINGS` may differ). The history returned includes the epochs
        before it. Not with ``engine="svi"``.
    :param handle_signals: with ``out_dir``, catch SIGINT and SIGTERM while training (in the
        main thread): write ``last.ckpt`` at the next step boundary, then raise
        :class:`TrainingInterrupted`.
    :raises TrainingDivergedError: when the loss or a gradient becomes NaN or infinite,
        naming the step and the site (or parameter); the last good checkpoint stays.
    :raises TrainingInterrupted: after SIGINT/SIGTERM, once ``last.ckpt`` is written.
    :raises ConfigMismatchError: when ``resume`` was written with another configuration.
    :raises CheckpointError: when ``resume`` cannot be read or resumed;
        :class:`~ppl_vae.errors.CheckpointWriteError` when a checkpoint cannot be written
        (training stops: it never carries on as if it had saved).
    """
    _check_images(train_images, "train_images")
    if validation is not None:
        _check_images(validation, "validation")
        if validation.shape[1] != train_images.shape[1]:
            raise DataError(
                f"validation images have {validation.shape[1]} values each, training images "
                f"{train_images.shape[1]}: they must come from the same dataset"
            )
    kwargs = dict(step_kwargs or {})
    if "beta" in kwargs:
        raise ValueError("pass beta through TrainConfig.beta or beta_schedule, not step_kwargs")
    jit = config.elbo.startswith("jit")
    if jit and beta_schedule is not None:
        raise ValueError(
            f"elbo={config.elbo!r} compiles once per distinct keyword value, so a beta schedule "
            "would recompile at every step: use elbo='meanfield' or 'trace' with a schedule"
        )
    modules = dict(modules or {})
    ckpt_config = {"train": config.to_dict(), **dict(checkpoint_config or {})}
    checkpoint = None
    if resume is not None:
        checkpoint = resume if isinstance(resume, Checkpoint) else load_checkpoint(resume)

    device = resolve_device(config.device)
    out = Path(out_dir) if out_dir is not None else None
    ckpt_dir = out / "checkpoints" if out is not None else None
    if ckpt_dir is not None:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteError(
                f"cannot create the checkpoint folder {ckpt_dir}: {exc.strerror or exc}"
            ) from exc

    with (
        _threads(config.threads),
        warnings.catch_warnings(),
        _catch_signals(handle_signals and out is not None) as stop,
    ):
        # Pyro warns at every NaN loss; the guard below reports it once, with the step.
        warnings.filterwarnings("ignore", message=_NAN_WARNING, category=UserWarning)
        loop = _Loop(
            model,
            guide,
            train_images,
            validation,
            config=config,
            modules=modules,
            out=out,
            ckpt_dir=ckpt_dir,
            device=device,
            dynamic_binarize=dynamic_binarize,
            kwargs=kwargs,
            beta_schedule=beta_schedule,
            ckpt_config=ckpt_config,
            jit=jit,
            stop=stop,
        )
        return loop.run(checkpoint)


class _Loop:
    """One training run: its engine, counters, data order and checkpoints."""

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        train_images: Tensor,
        validation: Tensor | None,
        *,
        config: TrainConfig,
        modules: dict[str, nn.Module],
        out: Path | None,
        ckpt_dir: Path | None,
        device: torch.device,
        dynamic_binarize: bool,
        kwargs: dict[str, Any],
        beta_schedule: Callable[[int], float] | None,
        ckpt_config: dict[str, Any],
        jit: bool,
        stop: _StopFlag,
    ) -> None:
        self.model, self.guide = model, guide
        self.config = config
        self.modules = modules
        self.out, self.ckpt_dir = out, ckpt_dir
        self.device = device
        self.dynamic_binarize = dynamic_binarize
        self.kwargs = kwargs
        self.beta_schedule = beta_schedule
        self.ckpt_config = ckpt_config
        self.stop = stop

        pyro.set_rng_seed(config.seed)
        self.x_train = train_images.to(device)  # moved once; batches are slices of it
        self.x_val = validation.to(device) if validation is not None else None
        for m in modules.values():
            m.to(device)
        self.n = int(self.x_train.shape[0])
        self.bs = config.batch_size
        # Pyro's SVI keeps one Jit ELBO object, traced for one batch shape.
        drop_last = jit and config.engine == "svi" and self.n >= self.bs
        self.steps_per_epoch = self.n // self.bs if drop_last else math.ceil(self.n / self.bs)
        self.images_per_epoch = self.steps_per_epoch * self.bs if drop_last else self.n

        # Free bits change the training objective only: the engines get the wrapped pair,
        # validation and the divergence diagnosis the plain one (the ELBO).
        train_model, train_guide = model, guide
        if config.free_bits > 0:
            free_bits = FreeBits(config.free_bits)
            train_model, train_guide = free_bits.model(model), free_bits.guide(guide)
        if config.engine == "fast":
            self.engine: _FastEngine | _SviEngine = _FastEngine(
                train_model,
                train_guide,
                config,
                self.x_train[: self.bs],
                {**kwargs, "beta": float(config.beta)},  # any beta: no gradient is taken
                device,
                dynamic_binarize,
            )
        else:
            self.engine = _SviEngine(train_model, train_guide, make_elbo(config), config)
        self.validator = None
        if self.x_val is not None:
            self.validator = _Validator(
                model,
                guide,
                self.x_val,
                kwargs,
                config.eval_batch_size or max(self.bs, _EVAL_BATCH),
                sub_seed(config.seed, _STREAM_VALIDATION),
                device,
                modules,
            )
        self.guard = _LossGuard(device)
        self.order = torch.Generator(device=device)  # batch order and dynamic binarisation
        # The epoch's summed loss: on CUDA a device tensor, read once per epoch; on CPU a
        # Python float (float64, as the tensor would be), each step's loss read as it comes.
        self.lazy = self.guard.lazy and config.engine == "fast"

        # Counters: everything a checkpoint needs to carry on from a step boundary.
        self.history = History(out_dir=out)
        self.epoch = 0  # finished epochs
        self.step = 0  # finished steps, over the run
        self.position = 0  # finished steps of the epoch in progress (epoch + 1)
        self.best_value = -math.inf
        self.total: Tensor | float = self._zero()
        self.seen = 0
        self.beta = math.nan
        self.epoch_seconds = 0.0  # train time of the epoch in progress, before this process
        self.seconds = 0.0  # wall time of the run, before this process
        self.order_state: Tensor | None = None  # the generator's state at ``position``
        self.last_good: Path | None = None
        self.started = self.epoch_started = time.perf_counter()

    # ---- resuming ------------------------------------------------------------------------

    def _resume(self, checkpoint: Checkpoint) -> None:
        where = f"checkpoint {checkpoint.path}"
        if not self.engine.can_resume:
            raise CheckpointError(
                f"cannot resume from {where}: engine='svi' keeps one optimizer per parameter "
                "inside Pyro and saves none of their states, so it cannot continue exactly. "
                "Train with engine='fast' (the default) to be able to resume."
            )
        runtime = tuple(f"train.{key}" for key in RUNTIME_SETTINGS)
        saved = dict(checkpoint.config)
        try:  # settings added since the checkpoint was written take their defaults
            saved["train"] = TrainConfig.from_dict(saved.get("train", {})).to_dict()
        except (TypeError, ValueError):
            pass  # compared as saved: the differences name what is wrong
        differences = config_differences(saved, self.ckpt_config, ignore=runtime)
        if differences:
            raise ConfigMismatchError(
                f"cannot resume from {where} with another configuration: "
                f"{'; '.join(differences)}. Resume with the run's own settings, or start a "
                "new run in another folder.",
                differences=differences,
            )
        counters, state = checkpoint.counters, checkpoint.state
        if "history" not in state or checkpoint.rng is None or checkpoint.optimizer is None:
            raise CheckpointError(
                f"{where} does not hold the trainer's state (history, random states, "
                "optimizer): it was not written by fit, or by an older ppl-vae, so the run "
                "cannot continue exactly from it"
            )
        images = [self.n, int(self.x_train.shape[1])]
        if counters.get("images") != images:
            difference = f"training images: saved {counters.get('images')}, asked {images}"
            raise ConfigMismatchError(
                f"cannot resume from {where}: it was trained on other data ({difference}, "
                "as [count, values per image]); use the same data set and subset",
                differences=[difference],
            )
        saved_device = counters.get("order_device", self.order.device.type)
        if counters.get("position") and saved_device != self.order.device.type:
            raise CheckpointError(
                f"{where} was written within an epoch on {saved_device}, whose data-order "
                f"generator cannot continue on {self.order.device.type}: resume it on "
                f"{saved_device} (a checkpoint written at the end of an epoch resumes on any "
                "device)"
            )
        try:
            self.epoch = int(counters["epoch"])
            self.step = int(counters["step"])
            self.position = int(counters["position"])
            self.best_value = float(counters["best_value"])
            self.history.best_epoch = counters["best_epoch"]
            self.seconds = float(counters.get("seconds", 0.0))
            self.history.rows = [{k: row[k] for k in HISTORY_COLUMNS} for row in state["history"]]
            if self.position:
                total = state["epoch_total"]
                self.total = (
                    total.to(self.device, torch.float64) if self.lazy else float(total.item())
                )
                self.order_state = state["order_rng"]
                self.seen = int(counters["seen"])
                self.beta = float(counters["beta"])
                self.epoch_seconds = float(counters["train_seconds"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"{where} holds malformed counters ({type(exc).__name__}: {exc})"
            ) from None
        if not (
            0 <= self.epoch <= self.config.epochs
            and 0 <= self.position < self.steps_per_epoch
            and len(self.history.rows) == self.epoch
            and self.step == self.epoch * self.steps_per_epoch + self.position
        ):
            raise CheckpointError(
                f"{where} holds counters that do not fit this run (epoch {self.epoch} of "
                f"{self.config.epochs}, step {self.step}, position {self.position} of "
                f"{self.steps_per_epoch} steps per epoch)"
            )
        if self.ckpt_dir is not None:
            remove_stale_temporaries(self.ckpt_dir)
            self.last_good = checkpoint.path
        if self.out is not None:
            for leftover in self.out.glob(".history.*.tmp"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if self.history.rows:
                _write_history(self.out, self.history.rows)  # the rows the checkpoint has
        # Parameters, optimizer, scheduler, then every random state: nothing draws after this
        # before the next step.
        restore(checkpoint, modules=self.modules, rng=False, device=self.device)
        restore_optimizer(
            checkpoint, self.engine.optimizer, scheduler=self.engine.scheduler, modules=self.modules
        )
        restore_rng(checkpoint)

    # ---- checkpoints and failures --------------------------------------------------------

    def _save(self, names: tuple[str, ...]) -> None:
        """Write the named checkpoints at the current step boundary, once every loss so far
        is known to be finite and so is every parameter."""
        if self.ckpt_dir is None:
            return
        bad = self.guard.drain()
        if bad is not None:
            raise self._diverged(bad)
        broken = _nonfinite_parameters()
        if broken:
            raise self._diverged_parameters(broken, self.step, known=False)
        counters: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "position": self.position,  # finished steps of epoch ``epoch + 1``
            "best_epoch": self.history.best_epoch,
            "best_value": self.best_value,
            "seconds": self.seconds + time.perf_counter() - self.started,
            "images": [self.n, int(self.x_train.shape[1])],
        }
        state: dict[str, Any] = {"history": self.history.rows}
        if self.position:
            counters.update(
                seen=self.seen,
                beta=self.beta,
                train_seconds=self._epoch_train_seconds(),
                order_device=self.order.device.type,
            )
            total = torch.as_tensor(self.total, dtype=torch.float64)
            state.update(epoch_total=total, order_rng=self.order.get_state())
        # best before last: a kill between the two leaves last.ckpt at the previous boundary,
        # and resuming from it writes the same best.ckpt again.
        for name in names:
            save_checkpoint(
                self.ckpt_dir / f"{name}.ckpt",
                modules=self.modules,
                optimizer=self.engine.optimizer,
                scheduler=self.engine.scheduler,
                counters=counters,
                config=self.ckpt_config,
                state=state,
            )
        self.last_good = self.ckpt_dir / "last.ckpt"

    def _epoch_train_seconds(self) -> float:
        return self.epoch_seconds + time.perf_counter() - self.epoch_started

    def _epoch_of(self, step: int) -> int:
        return max(1, (step - 1) // self.steps_per_epoch + 1)

    def _saved(self) -> str:
        if self.last_good is None:
            return "no checkpoint was written before it"
        return f"the last good checkpoint is {self.last_good}"

    def _error(self, what: str, *, step: int, site: str | None) -> TrainingDivergedError:
        epoch = self._epoch_of(step)
        return TrainingDivergedError(
            f"training diverged at step {step} (epoch {epoch}): {what}; {self._saved()}. Try a "
            f"smaller learning rate (lr={self.config.lr:g}), more particles, or check the data "
            "and networks for values that overflow.",
            step=step,
            epoch=epoch,
            checkpoint=self.last_good,
            site=site,
        )

    def _diverged_parameters(
        self, names: list[str], step: int, *, known: bool
    ) -> TrainingDivergedError:
        noun = "parameter" if len(names) == 1 else "parameters"
        if known and step >= 1:
            what = (
                f"the gradient of {noun} {_list_names(names)} was NaN or infinite at this step "
                "(the loss was finite), so the update made the "
                f"{noun} non-finite and the next step's loss is not finite"
            )
        else:
            what = f"{noun} {_list_names(names)} became NaN or infinite"
        return self._error(what, step=max(step, 1), site=names[0])

    def _diverged(self, bad: _BadStep) -> TrainingDivergedError:
        """Name what went wrong at ``bad.step``: a parameter made non-finite by the previous
        update (its gradient), or the sample site whose ELBO term is non-finite on the
        step's batch, evaluated again (off the training stream) with at least
        :data:`_DIAGNOSIS_PARTICLES` particles."""
        broken = _nonfinite_parameters()
        if broken:
            # On CPU the bad step's update is held back, so the damage came from the step
            # before; on CUDA it may be the bad step's own update.
            return self._diverged_parameters(
                broken, bad.step - 1 if not self.lazy else bad.step, known=not self.lazy
            )
        sites: list[tuple[str, str, str]] = []
        note = ""
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
            note = f" (the sites could not be evaluated: {type(exc).__name__}: {exc})"
        if sites:
            name, kind, value = sites[0]
            term = "reconstruction term (log p)" if kind == "reconstruction" else "KL term"
            what = (
                f"the loss is not finite: the {term} of sample site {name!r} is {value} on "
                "this step's batch"
            )
            if len(sites) > 1:
                what += f" (so are those of {_list_names([s[0] for s in sites[1:]])})"
            return self._error(what, step=bad.step, site=name)
        return self._error(
            "the loss became NaN or infinite, though no site's term is when the batch is "
            f"evaluated again{note}",
            step=bad.step,
            site=None,
        )

    def _interrupt(self) -> TrainingInterrupted:
        signum = int(self.stop.signum or signal.SIGINT)
        name = signal.Signals(signum).name
        where = (
            f"checkpoint written to {self.last_good}; resume with "
            f"'ppl-vae train --resume {self.out}' (or fit(..., resume=...))"
            if self.last_good is not None
            else "no checkpoint"
        )
        return TrainingInterrupted(
            f"interrupted by {name} after step {self.step} (epoch {self.epoch + 1} of "
            f"{self.config.epochs}); {where}",
            signum=signum,
            step=self.step,
            epoch=self.epoch,
            checkpoint=self.last_good,
        )

    # ---- the data order ------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> Tensor:
        """The epoch's permutation: a stream per epoch, so the order depends on (seed, epoch)
        only and the position in it says where a resumed run continues."""
        self.order.manual_seed(sub_seed(self.config.seed, _STREAM_BATCH_ORDER, epoch))
        perm = torch.randperm(self.n, generator=self.order, device=self.order.device)
        return perm.to(self.x_train.device)

    def _batch(self, perm: Tensor, index: int) -> Tensor:
        start = index * self.bs
        x = self.x_train.index_select(0, perm[start : min(start + self.bs, self.n)])
        if self.dynamic_binarize:
            x = binarize(x, self.order)
        return x

    # ---- the run -------------------------------------------------------------------------

    def run(self, checkpoint: Checkpoint | None) -> History:
        config, engine = self.config, self.engine
        if checkpoint is not None:
            self._resume(checkpoint)
        checkpoint_every = config.checkpoint_every if self.ckpt_dir is not None else None
        # The bar's running value is the ELBO when beta = 1, the beta-ELBO otherwise.
        plain = self.beta_schedule is None and config.beta == 1 and config.free_bits == 0
        label = "elbo" if plain else "objective"
        shown_val = _postfix(self.history.rows[-1]) if self.history.rows else {}
        bar = tqdm(
            total=config.epochs * self.steps_per_epoch,
            initial=self.step,
            disable=not config.progress,
            unit="step",
            dynamic_ncols=True,
        )
        try:
            for epoch in range(self.epoch + 1, config.epochs + 1):
                self.epoch_started = t0 = time.perf_counter()
                bar.set_description(f"epoch {epoch}/{config.epochs}")
                perm = self._epoch_order(epoch)
                if self.position and self.order_state is not None:
                    self.order.set_state(self.order_state)  # as it was at the position
                else:
                    self.total = self._zero()
                    self.seen, self.beta, self.epoch_seconds = 0, math.nan, 0.0
                self.order_state = None
                shown = time.perf_counter()
                lr = engine.lr()
                for index in range(self.position, self.steps_per_epoch):
                    if self.stop.signum is not None:
                        self._save(("last",))
                        raise self._interrupt()
                    self._step(self._batch(perm, index))
                    self.position = index + 1
                    bar.update(1)
                    if (
                        checkpoint_every is not None
                        and self.step % checkpoint_every == 0
                        and self.position < self.steps_per_epoch
                    ):
                        self._save(("last",))
                    if config.progress and time.perf_counter() - shown > _PROGRESS_REFRESH_S:
                        shown = time.perf_counter()
                        value = -float(self.total) / self.seen
                        bar.set_postfix({label: f"{value:.2f}/img", **shown_val})
                bad = self.guard.drain()
                if bad is not None:
                    raise self._diverged(bad)
                train_loss = float(self.total)  # the epoch's one read of the training loss
                if not math.isfinite(train_loss):  # the guard saw every step: cannot happen
                    raise self._error(
                        "the epoch's summed loss is not finite", step=self.step, site=None
                    )
                train_seconds = self._epoch_train_seconds()
                row = self._end_epoch(epoch, lr, train_loss, train_seconds, t0)
                shown_val = _postfix(row)
                bar.set_postfix(shown_val)
                if self.stop.signum is not None and epoch < config.epochs:
                    raise self._interrupt()  # the epoch's checkpoint is written
        finally:
            bar.close()
        return self.history

    def _step(self, x: Tensor) -> None:
        engine = self.engine
        beta = (
            float(self.beta_schedule(self.step))
            if self.beta_schedule is not None
            else float(self.config.beta)
        )
        # Argument checks run on the first step, where a model bug shows; later they would
        # cost a device sync per distribution and step, and NaN arguments then show as a NaN
        # loss, which the guard reports.
        checks = contextlib.nullcontext() if self.step == 0 else pyro.validation_enabled(False)
        try:
            with checks:
                loss = engine.backward(x, {**self.kwargs, "beta": beta})
        except (ValueError, RuntimeError) as exc:
            # NaN parameters make the next step's distributions reject their arguments;
            # report that as divergence.
            engine.discard()
            bad = self.guard.drain()
            if bad is not None:
                raise self._diverged(bad) from exc
            broken = _nonfinite_parameters()
            if broken:
                raise self._diverged_parameters(broken, self.step, known=False) from exc
            raise
        if self.lazy:
            bad = self.guard.check(loss, self.step + 1, x, beta)
        else:
            # On CPU the loss is computed by now: reading it costs a fraction of a
            # microsecond, and the update is held back when it is not finite.
            value = loss.item()
            bad = None if math.isfinite(value) else _BadStep(self.step + 1, x, beta)
        if bad is not None:
            engine.discard()  # the bad step's update is not applied (CPU)
            raise self._diverged(bad)
        engine.update()
        self.step += 1
        self.seen += int(x.shape[0])
        if self.lazy:
            self.total += loss
        else:
            self.total += value
        self.beta = beta

    def _zero(self) -> Tensor | float:
        return torch.zeros((), device=self.device, dtype=torch.float64) if self.lazy else 0.0

    def _end_epoch(
        self, epoch: int, lr: float, train_loss: float, train_seconds: float, t0: float
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": self.step,
            "lr": lr,
            "beta": self.beta,
            "train_objective": -train_loss / self.images_per_epoch,
        }
        if self.validator is not None:
            row.update(_summarise(*self.validator(), self.beta))
        else:
            row.update(dict.fromkeys(_VAL_COLUMNS))
        self.engine.end_epoch()  # scheduler step: the next epoch's rate
        score = row["val_elbo"] if self.validator is not None else row["train_objective"]
        row["best"] = bool(score > self.best_value)
        if row["best"]:
            self.best_value = score
            self.history.best_epoch = epoch
        row["train_seconds"] = train_seconds
        row["seconds"] = self.epoch_seconds + time.perf_counter() - t0  # with validation
        self.history.rows.append({k: row[k] for k in HISTORY_COLUMNS})
        self.epoch, self.position = epoch, 0
        if self.out is not None:
            self._save(("best", "last") if row["best"] else ("last",))
            _write_history(self.out, self.history.rows)
        return row


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    if row["val_elbo"] is None:
        return {}
    return {
        "val_elbo": f"{row['val_elbo']:.2f}±{row['val_elbo_se']:.2f}",
        "recon": f"{row['val_reconstruction']:.2f}",
        "kl": f"{row['val_kl']:.2f}",
    }
