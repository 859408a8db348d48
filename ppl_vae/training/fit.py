"""Training by stochastic variational inference: :func:`fit` and the loop that runs it.

:func:`fit` maximises the beta-ELBO of a model/guide pair over a training set,

    L_beta(x) = E_q[log p(x | z)] - beta * KL(q(z | x) || p(z)),

one minibatch per step, with Adam on the gradient of a Monte Carlo estimate of -L_beta
(Pyro's ELBO objects; ``"meanfield"`` uses the closed-form KL where it exists). After every
epoch it evaluates the true ELBO (beta = 1) on a validation set, image by image, and records

    ELBO = reconstruction - KL,  reconstruction = E_q[log p(x | z)],  KL = KL(q || p),

as means per image (nats), with the standard error of the ELBO's mean. With an ``out_dir``,
the run's configuration goes to ``config.json``, the history to ``history.csv`` and
``history.json`` and the weights to ``checkpoints/last.ckpt`` and
``checkpoints/best.ckpt`` (best validation ELBO) after every epoch, each file replaced
atomically; with ``TrainConfig.checkpoint_every`` set, ``last.ckpt`` is also written every
that many steps.

Each step is ``elbo.differentiable_loss`` and ONE fused ``torch.optim.Adam`` over Pyro's
param store (:mod:`~ppl_vae.training.engine`): the parameters of a plain ``pyro.infer.SVI``
loop with ``pyro.optim.Adam`` on the same batches, to float rounding. On CPU each step's
loss is read as it comes; on CUDA it is summed on the device and read once per epoch.

Reliability: resuming from a checkpoint (:mod:`~ppl_vae.training.state`) is bitwise equal
to an uninterrupted run on the same machine and settings, and refused with another
configuration (:class:`~ppl_vae.errors.ConfigMismatchError`); a non-finite loss stops the run
at that step, its update not applied, naming the sample site or the parameter at fault
(:mod:`~ppl_vae.training.guard`), and nothing non-finite is ever written to a checkpoint;
with ``out_dir``, SIGINT and SIGTERM write ``last.ckpt`` at the next step boundary and raise
:class:`~ppl_vae.errors.TrainingInterrupted` (:mod:`~ppl_vae.training.signals`).

With ``distributed``, every process started by ``torchrun`` trains on its slice of each
global batch, with the numbers of one process (:mod:`~ppl_vae.training.distributed`).

Learning-rate schedules step once per epoch: ``"exponential"`` multiplies the rate by
``lr_gamma``; ``"cosine"`` anneals it from ``lr`` towards ``lr_min`` over the run.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ppl_vae.checkpoint import Checkpoint, load_checkpoint
from ppl_vae.errors import ArgumentError
from ppl_vae.training.arguments import check_arguments
from ppl_vae.training.config import History, TrainConfig
from ppl_vae.training.device import resolve_device, torch_threads
from ppl_vae.training.distributed import Distributed
from ppl_vae.training.distributed_loop import DistributedLoop
from ppl_vae.training.files import RunFiles
from ppl_vae.training.loop import TrainingLoop
from ppl_vae.training.run_config import run_configuration
from ppl_vae.training.signals import catch_signals
from ppl_vae.training.subnormals import flushing_subnormals

__all__ = ["fit"]

_NAN_WARNING = r"Encountered (NaN|\+inf|-inf)"


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
    run_config: Mapping[str, Any] | None = None,
    resume: str | os.PathLike[str] | Checkpoint | None = None,
    handle_signals: bool = True,
    train_labels: Tensor | None = None,
    labelled_batch: int = 32,
    labelled_weight: float | None = None,
    distributed: bool | Distributed = False,
) -> History:
    """Train ``(model, guide)`` on ``train_images`` by SVI and return the per-epoch history.

    Each step calls ``model(x, beta=beta, **step_kwargs)`` and the guide alike, ``x`` a batch
    of rows of ``train_images`` in an order drawn anew each epoch from ``config.seed`` and the
    epoch (the last batch is smaller; a Jit ELBO compiles once for each shape). Pass
    ``check_data=False`` in ``step_kwargs`` to skip the per-step checks of
    :mod:`ppl_vae.models.vae` for data validated once beforehand. Pyro's argument checks (when
    enabled) run on the first step only: later a NaN argument shows as a NaN loss.

    The param store is not cleared: clear it (and seed) for a fresh run. Networks in
    ``modules`` (by their ``pyro.module`` names) are moved to the device, put in eval mode for
    validation and saved with the checkpoints; other parameters must be on the device.

    :param validation: images to evaluate the ELBO on after every epoch.
    :param out_dir: where ``config.json``, ``history.csv``, ``history.json`` and
        ``checkpoints/{last,best}.ckpt`` go (created if missing); ``None`` writes nothing.
    :param dynamic_binarize: draw a fresh binary image from each grey training image, per
        batch (validation images are used as given).
    :param beta_schedule: a Python function ``beta(step)`` (0-based step) overriding
        ``config.beta``, which holds text schedules. Not recorded (``"beta": null``): such a
        run resumes only through ``fit`` with the same function. Not with a Jit ELBO.
    :param run_config: the configuration's sections besides ``"train"`` (plain JSON), e.g.
        ``{"vae": ..., "data": ...}``. With ``out_dir``, ``{"train": config.to_dict(),
        **run_config}`` goes to ``config.json`` (again on resume) and its digest into
        every checkpoint (:mod:`~ppl_vae.training.run_config`).
    :param resume: a checkpoint written by ``fit`` (path or loaded): continue that run with
        the same model, guide, data and configuration (only
        :data:`~ppl_vae.training.config.RUNTIME_SETTINGS` may differ; else the run's
        ``config.json`` names the differences). The history returned includes its epochs.
    :param handle_signals: with ``out_dir``, catch SIGINT and SIGTERM while training (in the
        main thread): write ``last.ckpt`` at the next step boundary, then raise
        :class:`~ppl_vae.errors.TrainingInterrupted`.
    :param train_labels: semi-supervised training: ``(N,)`` int64 labels, -1 where unknown.
        Each step then also passes ``y=`` (the batch's labels) and, when both kinds are
        present, ``labelled_weight=``: a batch is ``batch_size`` unlabelled images plus
        ``labelled_batch`` labelled ones, weighted to count once per epoch, or each by
        ``labelled_weight`` when given (:mod:`~ppl_vae.training.order`); use an ELBO that sums
        the label out (``"enum"``).
    :param distributed: train on every process of a ``torchrun`` job (``True``: the backend
        torch's default for the device, NCCL on CUDA and gloo on the CPU; or a
        :class:`~ppl_vae.training.distributed.Distributed` naming one). Every process
        calls ``fit`` with the same arguments; the files and the progress bar come from rank 0.
    :raises TrainingDivergedError: when the loss or a gradient becomes NaN or infinite,
        naming the step and the site (or parameter); the last good checkpoint stays.
    :raises TrainingInterrupted: after SIGINT/SIGTERM, once ``last.ckpt`` is written.
    :raises ConfigMismatchError: when ``resume`` was written with another configuration.
    :raises CheckpointError: when ``resume`` cannot be read or resumed;
        :class:`~ppl_vae.errors.CheckpointWriteError` when a checkpoint cannot be written
        (training stops: it never carries on as if it had saved).
    """
    check_arguments(train_images, validation, config, step_kwargs, beta_schedule, train_labels)
    configuration = run_configuration(config, run_config, beta_schedule)
    checkpoint = None
    if resume is not None:
        checkpoint = resume if isinstance(resume, Checkpoint) else load_checkpoint(resume)
    device = resolve_device(config.device)
    modules = dict(modules or {})
    out = Path(out_dir) if out_dir is not None else None
    group = None
    if distributed:
        if train_labels is not None:
            raise ArgumentError(
                "distributed training of a semi-supervised run is not supported: train it on "
                "one process"
            )
        if config.elbo.startswith("jit"):
            raise ArgumentError(
                f"distributed training does not run the Jit ELBOs ({config.elbo}: its traced "
                "graph cannot take a rank's rows): use --engine compiled for a compiled step"
            )
        group = distributed if isinstance(distributed, Distributed) else Distributed()
        if device.type == "cuda":  # one GPU a process
            device = torch.device("cuda", group.local_rank)
            torch.cuda.set_device(device)
        config = dataclasses.replace(config, progress=config.progress and group.is_main)
    main = group is None or group.is_main
    files = RunFiles(out if main else None, configuration=configuration, modules=modules)
    with (
        torch_threads(config.threads),
        flushing_subnormals(config.flush_subnormals),  # after the thread count: all threads
        warnings.catch_warnings(),
        catch_signals(handle_signals and out is not None) as stop,
    ):
        # Pyro warns at every NaN loss; the guard reports it once, with the step.
        warnings.filterwarnings("ignore", message=_NAN_WARNING, category=UserWarning)
        kind = TrainingLoop if group is None else DistributedLoop
        extra = {} if group is None else {"group": group, "saves": out is not None}
        loop = kind(
            model,
            guide,
            train_images,
            validation,
            config=config,
            modules=modules,
            files=files,
            device=device,
            dynamic_binarize=dynamic_binarize,
            kwargs=dict(step_kwargs or {}),
            beta_schedule=beta_schedule,
            stop=stop,
            labels=(train_labels, labelled_batch, labelled_weight),
            **extra,
        )
        try:
            return loop.run(checkpoint)
        finally:
            if group is not None and distributed is True:  # the group fit started
                group.close()
