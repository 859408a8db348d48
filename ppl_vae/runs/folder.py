"""A run folder: train a VAE into it, and evaluate or sample from it later.

    runs/NAME/config.json           training, networks and data settings (plain JSON; the
                                    checkpoints hold its digest)
    runs/NAME/history.{csv,json}    one row per epoch (train objective, validation ELBO, ...)
    runs/NAME/checkpoints/          best.ckpt (best validation ELBO) and last.ckpt
    runs/NAME/samples.png           decoded samples from the prior
    runs/NAME/reconstructions.png   test images and their reconstructions
    runs/NAME/evaluation.json       written by ``evaluate_run``

A run is rebuilt from ``config.json`` and a checkpoint alone: nothing is unpickled. A run
that was stopped (killed, interrupted, or out of time) continues with :func:`resume_run`
from ``checkpoints/last.ckpt``, to the same final parameters as a run never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

from ppl_vae.atomic import write_json
from ppl_vae.checkpoint import load_checkpoint, restore
from ppl_vae.data import Dataset, load
from ppl_vae.errors import ArgumentError, CheckpointError, ConfigMismatchError, WriteError
from ppl_vae.models import vae as vae_model
from ppl_vae.rng import forked_rng
from ppl_vae.runs.evaluate import evaluate, vae_log_evidence
from ppl_vae.runs.evaluation import Evaluation
from ppl_vae.runs.image_plots import image_grid, reconstructions_figure, save
from ppl_vae.runs.semi_supervised import build_run_m2, evaluate_m2, m2_figures, training_labels
from ppl_vae.training import (
    CONFIG_FILE,
    Distributed,
    History,
    TrainConfig,
    config_differences,
    fit,
    resolve_device,
)
from ppl_vae.vae import M2, VAE, M2Config, VAEConfig, build_vae, prior_name, resolve_binarize

__all__ = [
    "TrainedRun",
    "evaluate_run",
    "load_run",
    "resume_run",
    "run_config",
    "sample_run",
    "train_run",
]


@dataclass(frozen=True)
class TrainedRun:
    """A run folder with its networks (weights restored) and its data. ``train_config`` is
    the run's, except that a run trained with a Python ``beta_schedule`` (``config.json``
    says ``"beta": null``) shows the default beta. ``vae`` is the pair: a :class:`VAE`, or
    an :class:`~ppl_vae.vae.M2` for a semi-supervised run."""

    path: Path
    vae: VAE | M2
    train_config: TrainConfig
    dataset: Dataset
    history: History | None = None

    @property
    def semi_supervised(self) -> bool:
        """Whether this is an M2 run (its configuration has an ``"m2"`` section)."""
        return isinstance(self.vae, M2)


def train_run(
    out: str | os.PathLike[str],
    vae_config: VAEConfig,
    train_config: TrainConfig,
    *,
    data_dir: str | None = None,
    beta_schedule: Callable[[int], float] | None = None,
    train_subset: int | None = None,
    m2: M2Config | None = None,
    distributed: Distributed | None = None,
) -> TrainedRun:
    """Load the data, build fresh networks from the seed, train, and write the run folder
    (``config.json``: ``{"train", "vae", "data"}``, written by :func:`~ppl_vae.training.fit`).

    With ``m2``, the semi-supervised VAE: ``m2.labels`` training images keep their label
    (balanced over the classes, drawn from the seed), the others are unlabelled; the
    configuration gains an ``"m2"`` section. Use ``train_config.elbo="enum"`` to sum the
    label out exactly.

    :param beta_schedule: a Python function ``beta(step)``, overriding ``train_config.beta``
        (a warm-up or cyclical schedule goes in ``train_config.beta`` as text). Not
        recorded: :func:`resume_run` cannot resume such a run.
    :param train_subset: train on the first N training images only (quick runs).
    :param distributed: this process's rank in a ``torchrun`` job: every rank calls with the
        same arguments; rank 0 writes the folder (:func:`~ppl_vae.training.fit`).
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create the run folder {out}: {exc.strerror or exc}") from exc
    binarize = resolve_binarize(vae_config.likelihood, vae_config.binarize)
    device = resolve_device(train_config.device)
    data = load(
        vae_config.dataset,
        data_dir=data_dir,
        binarize=binarize,
        seed=train_config.seed,
        device=device,
    )
    config = VAEConfig.from_dict(
        {**vae_config.to_dict(), "binarize": binarize, "image_shape": data.image_shape}
    )
    train_images = _training_images(data, config, train_subset)
    sections = {
        "vae": config.to_dict(),
        "data": {"source": data.source, "train_subset": train_subset, "data_dir": data_dir},
    }
    if m2 is not None:
        sections["m2"] = m2.to_dict()
    return _train(
        out,
        train_config,
        sections,
        data,
        train_images,
        beta_schedule,
        resume=False,
        distributed=distributed,
    )


def _training_images(data: Dataset, config: VAEConfig, train_subset: int | None) -> torch.Tensor:
    """The training images, after checking every split once, so the per-step checks can be
    skipped (``check_data=False``)."""
    train_images = data.train.images[:train_subset] if train_subset else data.train.images
    # Dynamically binarised training images are grey until each batch is drawn.
    likelihood = None if config.binarize == "dynamic" else config.likelihood
    vae_model.check_data(train_images, likelihood=likelihood, name="training images")
    for split in ("validation", "test"):
        vae_model.check_data(
            getattr(data, split).images, likelihood=config.likelihood, name=f"{split} images"
        )
    return train_images


def _train(
    out: Path,
    train_config: TrainConfig,
    sections: dict[str, Any],
    data: Dataset,
    train_images: torch.Tensor,
    beta_schedule: Callable[[int], float] | None,
    *,
    resume: bool,
    distributed: Distributed | None = None,
) -> TrainedRun:
    """Train from fresh networks (or resume from ``last.ckpt``); ``sections`` the run's
    configuration besides ``"train"``."""
    config = VAEConfig.from_dict(sections["vae"])
    last = out / "checkpoints" / "last.ckpt"
    pyro.clear_param_store()
    pyro.set_rng_seed(train_config.seed)
    vae = _build(sections, data, train_images.shape[0])
    labelled: dict[str, Any] = {}
    if isinstance(vae, M2):
        train_subset = (sections.get("data") or {}).get("train_subset")
        labels = training_labels(data, vae.m2, train_config.seed, train_subset)
        labelled = {
            "train_labels": labels,
            "labelled_batch": vae.m2.labelled_batch,
            "labelled_weight": vae.m2.labelled_weight,
        }
    history = fit(
        vae.model,
        vae.guide,
        train_images,
        config=train_config,
        validation=data.validation.images,
        modules=vae.modules,
        out_dir=out,
        dynamic_binarize=config.binarize == "dynamic",
        step_kwargs={"check_data": False},
        beta_schedule=beta_schedule,
        run_config=sections,
        resume=last if resume and last.exists() else None,
        distributed=distributed or False,
        **labelled,
    )
    run = TrainedRun(out, vae, train_config, data, history)
    if distributed is None or distributed.is_main:
        write_figures(run)
    return run


def _build(sections: dict[str, Any], data: Dataset, num_train: int) -> VAE | M2:
    """Fresh networks of a run's configuration: an M2 when it has an ``"m2"`` section."""
    if "m2" in sections:
        return build_run_m2(sections, data, num_train)
    return build_vae(VAEConfig.from_dict(sections["vae"]))


def _with_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """A run's configuration with the settings it predates at their defaults (what it ran
    with), so that asking for a default on resume is no difference."""
    filled = dict(settings)
    for section, config in (("vae", VAEConfig), ("train", TrainConfig), ("m2", M2Config)):
        if isinstance(settings.get(section), dict):
            filled[section] = {**dataclasses.asdict(config()), **settings[section]}
    return filled


def run_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The plain-JSON ``config.json`` of a run folder.

    :raises CheckpointError: when the folder is not a run folder or the file is not JSON.
    """
    path = Path(path)
    try:
        settings = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is not a run folder: it has no {CONFIG_FILE} (train one with "
            "'ppl-vae train --out FOLDER')"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE} cannot be read as JSON: {exc}") from None
    if not isinstance(settings, dict) or not {"vae", "train"} <= set(settings):
        raise CheckpointError(f"{path / CONFIG_FILE} is not the configuration of a run")
    return settings


def resume_run(
    path: str | os.PathLike[str],
    *,
    expect: dict[str, Any] | None = None,
    device: str | None = None,
    progress: bool | None = None,
    threads: int | None = None,
    checkpoint_every: int | None = None,
    data_dir: str | None = None,
    engine: str | None = None,
    flush_subnormals: bool | None = None,
    distributed: Distributed | None = None,
) -> TrainedRun:
    """Continue a stopped run from ``checkpoints/last.ckpt`` with its own configuration
    (``config.json``) and data, to the same final parameters as a run never stopped (same
    machine, threads and device), then write its figures. A run stopped before its first
    checkpoint starts again from the beginning; a finished run is left as it is.

    :param expect: settings the caller asks for, nested as in ``config.json`` (``{"vae":
        {"z_dim": 8}}``); any that differ from the run's own are refused.
    :param device: run on another device (``device``, ``progress``, ``threads``,
        ``checkpoint_every``, ``engine`` and ``flush_subnormals`` may change; ``None`` keeps
        the saved value; ``config.json`` then records the new values).
    :param data_dir: where the data set is now, when it moved (``config.json`` keeps the
        folder it was trained from).
    :param distributed: resume as this rank of a ``torchrun`` job. The run's numbers do not
        depend on the number of processes, so a run stopped at one world size resumes at
        any other (bitwise at the same one, to float rounding at another).
    :raises ConfigMismatchError: listing every setting in ``expect`` that differs, or when
        ``config.json`` no longer holds the configuration the checkpoint was written with.
    :raises CheckpointError: for a folder that is not a run, an unreadable checkpoint, or a
        run that cannot be resumed (a beta schedule given as a Python function, a
        checkpoint of an older ppl-vae).
    """
    path = Path(path)
    settings = run_config(path)
    if expect:
        differences = config_differences(_with_defaults(settings), expect, partial=True)
        if differences:
            raise ConfigMismatchError(
                f"cannot resume {path} with another configuration: {'; '.join(differences)}. "
                "Resume without those settings (the run's own are used), or start a new run "
                "in another folder.",
                differences=differences,
            )
    if settings["train"].get("beta", 1.0) is None:
        raise CheckpointError(
            f"{path} was trained with a beta schedule given as a Python function, which "
            f"{CONFIG_FILE} does not record: resume it with fit(..., resume=...) and the "
            "same schedule"
        )
    runtime = {
        "device": device,
        "progress": progress,
        "threads": threads,
        "checkpoint_every": checkpoint_every,
        "engine": engine,
        "flush_subnormals": flush_subnormals,
    }
    given = {key: value for key, value in runtime.items() if value is not None}
    train_config = _saved_train_config(settings, **given)
    # Every other section as saved, so the configuration's digest is the checkpoint's.
    sections = {key: value for key, value in settings.items() if key != "train"}
    config = VAEConfig.from_dict(sections["vae"])
    data_settings = sections.get("data") or {}
    data = load(
        config.dataset,
        data_dir=data_dir or data_settings.get("data_dir"),
        binarize=config.binarize or "none",
        seed=train_config.seed,
        device=resolve_device(train_config.device),
    )
    train_images = _training_images(data, config, data_settings.get("train_subset"))
    return _train(
        path,
        train_config,
        sections,
        data,
        train_images,
        None,
        resume=True,
        distributed=distributed,
    )


def _saved_train_config(settings: dict[str, Any], **runtime: Any) -> TrainConfig:
    """The TrainConfig of a run's ``config.json`` with ``runtime`` settings replaced; the
    default beta for a run trained with a Python schedule function (saved as null)."""
    values = {**settings["train"], **runtime}
    if values.get("beta", 1.0) is None:
        del values["beta"]
    return TrainConfig.from_dict(values)


def load_run(
    path: str | os.PathLike[str],
    *,
    checkpoint: str = "best",
    device: str = "cpu",
    data_dir: str | None = None,
) -> TrainedRun:
    """Rebuild a run's networks from ``config.json`` and restore ``checkpoints/<name>.ckpt``."""
    path = Path(path)
    device = resolve_device(device)
    settings = run_config(path)
    config = VAEConfig.from_dict(settings["vae"])
    train_config = _saved_train_config(settings, device=str(device))
    saved = load_checkpoint(path / "checkpoints" / f"{checkpoint}.ckpt")
    data_settings = settings.get("data") or {}
    data = load(
        config.dataset,
        data_dir=data_dir or data_settings.get("data_dir"),
        binarize=config.binarize,
        seed=train_config.seed,
        device=resolve_device(device),
    )
    pyro.clear_param_store()
    num_train = data_settings.get("train_subset") or data.train.images.shape[0]
    vae = _build(settings, data, num_train)
    restore(saved, modules=vae.modules, rng=False, device=device)
    for net in vae.modules.values():
        net.to(device).eval()
    return TrainedRun(path, vae, train_config, data)


def write_figures(run: TrainedRun, *, num: int = 100, seed: int = 0) -> list[Path]:
    """Prior samples and test reconstructions of a run, as PNG grids in its folder (an M2
    run: one row of samples per class, :func:`~ppl_vae.runs.semi_supervised.m2_figures`)."""
    vae, data = run.vae, run.dataset
    if isinstance(vae, M2):
        return m2_figures(vae, data, run.path, per_class=max(1, num // data.num_classes), seed=seed)
    vae.encoder.eval()
    vae.decoder.eval()
    with forked_rng(seed=seed):
        samples = vae_model.generate(
            vae.decoder,
            num,
            likelihood=vae.config.likelihood,
            prior=vae.prior,
            encoder=vae.encoder,
        )
    inputs = data.test.images[:50]
    recons = vae_model.reconstruct(vae.encoder, vae.decoder, inputs, vae.config.likelihood)
    title = f"{vae.config.dataset}: decoded samples z ~ {prior_name(vae.config.prior)}, E[x | z]"
    return [
        save(image_grid(samples, data.image_shape, title=title), run.path / "samples.png"),
        save(
            reconstructions_figure(inputs, recons, data.image_shape),
            run.path / "reconstructions.png",
        ),
    ]


def evaluate_run(
    path: str | os.PathLike[str],
    *,
    iwae_samples: int = 5000,
    limit: int | None = None,
    checkpoint: str = "best",
    device: str = "cpu",
    progress: bool = True,
    distributed: Distributed | None = None,
) -> Evaluation:
    """Evaluate a run on its test set (beta = 1) and write ``evaluation.json`` (an M2 run:
    with the test accuracy of q(y | x), the label summed out of the bounds). With
    ``distributed``, every rank of a ``torchrun`` job calls alike and evaluates its share of
    the images (:func:`~ppl_vae.runs.evaluate`); rank 0 writes the file."""
    run = load_run(path, checkpoint=checkpoint, device=device)
    images = run.dataset.test.images[:limit] if limit else run.dataset.test.images
    vae = run.vae
    if isinstance(vae, M2) and distributed is not None:
        raise ArgumentError("an M2 run is evaluated on one process: drop --nproc (or torchrun)")
    if isinstance(vae, M2):
        labels = run.dataset.test.labels[: images.shape[0]]
        with torch.no_grad():
            result = evaluate_m2(vae, images, labels, iwae_samples=iwae_samples, progress=progress)
        write_json(run.path / "evaluation.json", {"checkpoint": checkpoint, **result.to_dict()})
        return result
    fast = vae_log_evidence(
        vae.encoder,
        vae.decoder,
        likelihood=vae.config.likelihood,
        sigma=vae.config.sigma,
        prior=vae.prior,
    )
    with torch.no_grad():
        result = evaluate(
            vae.model,
            vae.guide,
            images,
            encoder=vae.encoder,
            iwae_samples=iwae_samples,
            progress=progress,
            log_evidence=fast,
            distributed=distributed,
        )
    if distributed is None or distributed.is_main:
        write_json(run.path / "evaluation.json", {"checkpoint": checkpoint, **result.to_dict()})
    return result


def sample_run(
    path: str | os.PathLike[str], *, num: int = 100, seed: int = 0, device: str = "cpu"
) -> list[Path]:
    """Write a run's sample and reconstruction grids again (new seed, say)."""
    return write_figures(load_run(path, device=device), num=num, seed=seed)
