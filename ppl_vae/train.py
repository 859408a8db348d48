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
atomically.

Two engines give the same parameters from the same seed:

- ``"fast"`` (default): ``elbo.differentiable_loss`` and ONE ``torch.optim.Adam`` (foreach)
  over every parameter of Pyro's param store, the loss summed on the device and read once
  per epoch (plus, with a progress bar, about twice a second for its running value);
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
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    TraceMeanField_ELBO,
)
from torch import Tensor, nn
from tqdm.auto import tqdm

from ppl_vae.checkpoint import save_checkpoint
from ppl_vae.data import batches, binarize
from ppl_vae.errors import DataError, PplVaeError
from ppl_vae.ledger import sampled_site_terms
from ppl_vae.pair import PairStructure, inspect_pair

__all__ = [
    "ELBOS",
    "ENGINES",
    "HISTORY_COLUMNS",
    "LR_SCHEDULES",
    "History",
    "TrainConfig",
    "TrainingDivergedError",
    "fit",
    "make_elbo",
    "resolve_device",
]

ELBOS = ("meanfield", "trace", "jit-meanfield", "jit-trace")
"""Values of ``TrainConfig.elbo``: TraceMeanField_ELBO (analytic KL), Trace_ELBO, and their
Jit variants."""

ENGINES = ("fast", "svi")
"""Values of ``TrainConfig.engine``."""

LR_SCHEDULES = (None, "cosine", "exponential")
"""Values of ``TrainConfig.lr_schedule``."""

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
# Independent random streams derived from the seed (as in ppl_vae.data).
_STREAM_BATCH_ORDER = 11
_STREAM_VALIDATION = 12
_PROGRESS_REFRESH_S = 0.5  # a running value on the bar costs one device read this often
_NAN_WARNING = r"Encountered (NaN|\+inf|-inf)"


class TrainingDivergedError(PplVaeError, FloatingPointError):
    """The loss (or the parameters) became NaN or infinite; ``step`` is the first bad step
    (1-based, counted over the run), ``checkpoint`` the last good checkpoint or ``None``."""

    def __init__(self, message: str, *, step: int, epoch: int, checkpoint: Path | None):
        super().__init__(message)
        self.step = step
        self.epoch = epoch
        self.checkpoint = checkpoint


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
    :param eval_batch_size: images per validation batch; ``None`` uses ``batch_size``.
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


def make_elbo(config: TrainConfig):
    """The Pyro ELBO object named by ``config.elbo``."""
    kwargs: dict[str, Any] = {
        "num_particles": config.num_particles,
        "vectorize_particles": config.num_particles > 1,
        "max_plate_nesting": config.max_plate_nesting,
    }
    if config.elbo == "meanfield":
        return TraceMeanField_ELBO(**kwargs)
    if config.elbo == "trace":
        return Trace_ELBO(**kwargs)
    # Tracing warns about Python values baked into the graph (plate sizes, shapes), which is
    # what a fixed batch size makes safe.
    if config.elbo == "jit-meanfield":
        return JitTraceMeanField_ELBO(ignore_jit_warnings=True, **kwargs)
    return JitTrace_ELBO(ignore_jit_warnings=True, **kwargs)


def _sub_seed(seed: int, *stream: int) -> int:
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int | None = None) -> Iterator[None]:
    """Run a block without moving the global torch RNG (CPU and the CUDA device in use);
    with ``seed``, the block draws from a fresh stream seeded by it."""
    cuda = device.type == "cuda"
    devices = []
    if cuda:
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
        yield


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


def _write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically: a reader sees the old file or the new one."""
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as handle:
        tmp = handle.name
        try:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            handle.close()
            os.unlink(tmp)
            raise
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_history(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    clean = [{k: _json_number(row[k]) for k in HISTORY_COLUMNS} for row in rows]
    _write_text(out_dir / "history.json", json.dumps(clean, indent=1) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in clean:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    _write_text(out_dir / "history.csv", buffer.getvalue())


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
    """``elbo.differentiable_loss`` and one foreach Adam over the whole param store."""

    def __init__(
        self, model, guide, elbo, config: TrainConfig, x0: Tensor, kwargs, device, binary: bool
    ):
        self.model, self.guide, self.elbo = model, guide, elbo
        # Registering the params draws from the guide: do it off the main stream, so both
        # engines draw the same numbers from the same seed.
        with _forked_rng(device):
            _register_params(model, guide, binarize(x0) if binary else x0, kwargs)
        store = pyro.get_param_store()
        self.names = list(store.keys())
        self.params = [p for _, p in store.named_parameters()]
        # Pyro's Adam wraps torch's per parameter with torch's defaults: the same update.
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, foreach=True)
        self.scheduler = None
        if config.lr_schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=config.epochs, eta_min=config.lr_min
            )
        elif config.lr_schedule == "exponential":
            self.scheduler = torch.optim.lr_scheduler.ExponentialLR(
                self.optimizer, gamma=config.lr_gamma
            )

    def step(self, x: Tensor, kwargs: dict) -> Tensor:
        loss = self.elbo.differentiable_loss(self.model, self.guide, x, **kwargs)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

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

    def step(self, x: Tensor, kwargs: dict) -> Tensor:
        return torch.as_tensor(self.svi.step(x, **kwargs))

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
            with torch.no_grad(), _forked_rng(self.device, self.seed):
                for x in batches(self.images, self.batch_size, shuffle=False):
                    if self.structure is None:
                        self.structure = inspect_pair(self.model, self.guide, (x,), kwargs)
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
# The loop
# --------------------------------------------------------------------------------------------


def _diverged(
    *,
    step: int,
    epoch: int,
    params_bad: bool,
    loss_bad: bool,
    checkpoint: Path | None,
    config: TrainConfig,
) -> TrainingDivergedError:
    what = "the loss became NaN or infinite" if loss_bad else "the parameters became NaN or inf"
    where = f"at step {step} (epoch {epoch})" if loss_bad else f"by step {step} (epoch {epoch})"
    if params_bad and loss_bad:
        what += ", and so did the parameters"
    saved = (
        f"the last good checkpoint is {checkpoint}"
        if checkpoint is not None
        else "no checkpoint was written before it"
    )
    return TrainingDivergedError(
        f"training diverged: {what} {where}; {saved}. Try a smaller learning rate "
        f"(lr={config.lr:g}), more particles, or check the data and networks for values that "
        "overflow.",
        step=step,
        epoch=epoch,
        checkpoint=checkpoint,
    )


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
) -> History:
    """Train ``(model, guide)`` on ``train_images`` by SVI and return the per-epoch history.

    Each step calls ``model(x, beta=beta, **step_kwargs)`` and the guide alike, ``x`` a batch
    of rows of ``train_images`` in a random order drawn anew each epoch from ``config.seed``
    (the last batch is smaller, except with a Jit ELBO, which needs one batch shape and so
    drops the remainder). Validate the data once beforehand and pass ``check_data=False``
    in ``step_kwargs`` to skip the per-step checks of :mod:`ppl_vae.models.vae`. Pyro's
    argument checks (when enabled) run on the first step only: later a NaN argument shows
    as a NaN loss, which stops the run with :class:`TrainingDivergedError`.

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
    :raises TrainingDivergedError: when the loss or the parameters become NaN or infinite;
        the checkpoints of the last finished epoch stay in place.
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

    device = resolve_device(config.device)
    out = Path(out_dir) if out_dir is not None else None
    ckpt_dir = out / "checkpoints" if out is not None else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    with _threads(config.threads), warnings.catch_warnings():
        # Pyro warns at every NaN loss; the guard below reports it once, with the step.
        warnings.filterwarnings("ignore", message=_NAN_WARNING, category=UserWarning)
        return _run(
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
        )


def _run(
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
) -> History:
    pyro.set_rng_seed(config.seed)
    x_train = train_images.to(device)  # moved once; batches are slices of it
    x_val = validation.to(device) if validation is not None else None
    for m in modules.values():
        m.to(device)

    n = int(x_train.shape[0])
    bs = config.batch_size
    drop_last = jit and n >= bs
    steps_per_epoch = n // bs if drop_last else math.ceil(n / bs)
    images_per_epoch = steps_per_epoch * bs if drop_last else n

    def beta_at(step: int) -> float:
        return float(beta_schedule(step)) if beta_schedule is not None else float(config.beta)

    elbo = make_elbo(config)
    if config.engine == "fast":
        engine: _FastEngine | _SviEngine = _FastEngine(
            model,
            guide,
            elbo,
            config,
            x_train[:bs],
            {**kwargs, "beta": float(config.beta)},  # any beta: no gradient is taken
            device,
            dynamic_binarize,
        )
    else:
        engine = _SviEngine(model, guide, elbo, config)

    validator = None
    if x_val is not None:
        validator = _Validator(
            model,
            guide,
            x_val,
            kwargs,
            config.eval_batch_size or bs,
            _sub_seed(config.seed, _STREAM_VALIDATION),
            device,
            modules,
        )
    # The bar's running value is the ELBO when beta = 1, the beta-ELBO otherwise.
    label = "elbo" if beta_schedule is None and config.beta == 1 else "objective"
    shown_val: dict[str, str] = {}  # the last epoch's numbers, kept on the bar
    order = torch.Generator(device=device)
    history = History(out_dir=out)
    best_value = -math.inf
    last_good: Path | None = None
    step = 0
    started = time.perf_counter()
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        disable=not config.progress,
        unit="step",
        dynamic_ncols=True,
    )
    try:
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            bar.set_description(f"epoch {epoch}/{config.epochs}")
            # One stream per epoch: the order depends on (seed, epoch) only, so a run resumed
            # at an epoch boundary sees the same batches.
            order.manual_seed(_sub_seed(config.seed, _STREAM_BATCH_ORDER, epoch))
            acc_device = device if config.engine == "fast" else torch.device("cpu")
            total = torch.zeros((), device=acc_device, dtype=torch.float64)
            ok = torch.ones((), device=acc_device, dtype=torch.bool)
            n_ok = torch.zeros((), device=acc_device, dtype=torch.int64)
            seen = 0
            shown = time.perf_counter()
            epoch_start_step = step
            beta = math.nan  # set by every step: the schedule is called once per step
            lr = engine.lr()
            for x in batches(
                x_train,
                bs,
                shuffle=True,
                generator=order,
                dynamic_binarize=dynamic_binarize,
                drop_last=drop_last,
            ):
                beta = beta_at(step)
                # Argument checks run on the first step, where a model bug shows; later they
                # would cost a device sync per distribution and step, and NaN arguments then
                # show as a NaN loss, which the guard below reports.
                checks = contextlib.nullcontext() if step == 0 else pyro.validation_enabled(False)
                try:
                    with checks:
                        loss = engine.step(x, {**kwargs, "beta": beta})
                except (ValueError, RuntimeError) as exc:
                    # NaN parameters make the next step's distributions reject their
                    # arguments; report that as divergence, with the step it began.
                    params_bad = _any_nonfinite(engine.parameters())
                    losses_bad = not bool(ok)
                    if params_bad or losses_bad:
                        first = epoch_start_step + int(n_ok) + 1 if losses_bad else step + 1
                        raise _diverged(
                            step=first,
                            epoch=epoch,
                            params_bad=params_bad,
                            loss_bad=losses_bad,
                            checkpoint=last_good,
                            config=config,
                        ) from exc
                    raise
                step += 1
                seen += int(x.shape[0])
                total += loss
                ok &= torch.isfinite(loss)
                n_ok += ok
                bar.update(1)
                if config.progress and time.perf_counter() - shown > _PROGRESS_REFRESH_S:
                    shown = time.perf_counter()
                    bar.set_postfix({label: f"{-float(total) / seen:.2f}/img", **shown_val})
            train_loss = float(total)  # the epoch's one read of the training loss
            if not bool(ok) or not math.isfinite(train_loss):
                raise _diverged(
                    step=epoch_start_step + int(n_ok) + 1,
                    epoch=epoch,
                    params_bad=_any_nonfinite(engine.parameters()),
                    loss_bad=True,
                    checkpoint=last_good,
                    config=config,
                )
            train_seconds = time.perf_counter() - t0
            row: dict[str, Any] = {
                "epoch": epoch,
                "step": step,
                "lr": lr,
                "beta": beta,
                "train_objective": -train_loss / images_per_epoch,
            }
            if validator is not None:
                row.update(_summarise(*validator(), beta))
            else:
                row.update(dict.fromkeys(_VAL_COLUMNS))
            engine.end_epoch()  # scheduler step: the next epoch's rate
            score = row["val_elbo"] if validator is not None else row["train_objective"]
            row["best"] = bool(score > best_value)
            if row["best"]:
                best_value = score
                history.best_epoch = epoch
            row["train_seconds"] = train_seconds
            row["seconds"] = time.perf_counter() - t0
            history.rows.append({k: row[k] for k in HISTORY_COLUMNS})
            if out is not None and ckpt_dir is not None:
                counters = {
                    "epoch": epoch,
                    "step": step,
                    "position": 0,  # batches done in the next epoch: saved at its boundary
                    "best_epoch": history.best_epoch,
                    "best_value": best_value,
                    "seconds": time.perf_counter() - started,
                }
                for name in ("last", "best") if row["best"] else ("last",):
                    save_checkpoint(
                        ckpt_dir / f"{name}.ckpt",
                        modules=modules,
                        optimizer=engine.optimizer,
                        scheduler=engine.scheduler,
                        counters=counters,
                        config=ckpt_config,
                    )
                last_good = ckpt_dir / "last.ckpt"
                _write_history(out, history.rows)
            shown_val = _postfix(row)
            bar.set_postfix(shown_val)
    finally:
        bar.close()
    return history


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    if row["val_elbo"] is None:
        return {}
    return {
        "val_elbo": f"{row['val_elbo']:.2f}±{row['val_elbo_se']:.2f}",
        "recon": f"{row['val_reconstruction']:.2f}",
        "kl": f"{row['val_kl']:.2f}",
    }


def _any_nonfinite(params: list[Tensor]) -> bool:
    with torch.no_grad():
        return any(not bool(torch.isfinite(p).all()) for p in params)
