"""A run folder: train a VAE into it, and evaluate or sample from it later.

    runs/NAME/config.json           data, networks and training settings (plain JSON)
    runs/NAME/history.{csv,json}    one row per epoch (train objective, validation ELBO, ...)
    runs/NAME/checkpoints/          best.ckpt (best validation ELBO) and last.ckpt
    runs/NAME/samples.png           decoded samples from the prior
    runs/NAME/reconstructions.png   test images and their reconstructions
    runs/NAME/evaluation.json       written by ``evaluate_run``

A run is rebuilt from ``config.json`` and a checkpoint alone: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

from ppl_vae.checkpoint import load_checkpoint, restore
from ppl_vae.data import Dataset, load
from ppl_vae.errors import CheckpointError
from ppl_vae.evaluate import Evaluation, evaluate
from ppl_vae.experiment import VAE, VAEConfig, build_vae, resolve_binarize
from ppl_vae.models import vae as vae_model
from ppl_vae.plots import image_grid, reconstructions_figure, save
from ppl_vae.train import History, TrainConfig, fit, resolve_device

__all__ = ["TrainedRun", "evaluate_run", "load_run", "sample_run", "train_run"]

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class TrainedRun:
    """A run folder with its networks (weights restored) and its data."""

    path: Path
    vae: VAE
    train_config: TrainConfig
    dataset: Dataset
    history: History | None = None


def _write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then ``os.replace``)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(value, tmp, indent=2)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def train_run(
    out: str | os.PathLike[str],
    vae_config: VAEConfig,
    train_config: TrainConfig,
    *,
    data_dir: str | None = None,
    beta_schedule: Callable[[int], float] | None = None,
    beta_spec: str | None = None,
    train_subset: int | None = None,
) -> TrainedRun:
    """Load the data, build fresh networks from the seed, train, and write the run folder.

    :param beta_spec: the schedule's text form, recorded in ``config.json``.
    :param train_subset: train on the first N training images only (quick runs).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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
    train_images = data.train.images[:train_subset] if train_subset else data.train.images
    # Check the data once here, so the per-step checks can be skipped (check_data=False).
    # Dynamically binarised training images are grey until each batch is drawn.
    likelihood = None if binarize == "dynamic" else config.likelihood
    vae_model.check_data(train_images, likelihood=likelihood, name="training images")
    for split in ("validation", "test"):
        vae_model.check_data(
            getattr(data, split).images, likelihood=config.likelihood, name=f"{split} images"
        )
    run_config = {
        "vae": config.to_dict(),
        "train": train_config.to_dict(),
        "beta": beta_spec or str(train_config.beta),
        "data": {"source": data.source, "train_subset": train_subset, "data_dir": data_dir},
    }
    _write_json(out / CONFIG_FILE, run_config)
    pyro.clear_param_store()
    pyro.set_rng_seed(train_config.seed)
    vae = build_vae(config)
    history = fit(
        vae.model,
        vae.guide,
        train_images,
        config=train_config,
        validation=data.validation.images,
        modules=vae.modules,
        out_dir=out,
        dynamic_binarize=binarize == "dynamic",
        step_kwargs={"check_data": False},
        beta_schedule=beta_schedule,
        checkpoint_config={"vae": config.to_dict()},
    )
    run = TrainedRun(out, vae, train_config, data, history)
    write_figures(run)
    return run


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
    try:
        run_config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is not a run folder: it has no {CONFIG_FILE} (train one with "
            "'ppl-vae train --out FOLDER')"
        ) from None
    except ValueError:
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON") from None
    config = VAEConfig.from_dict(run_config["vae"])
    train_config = TrainConfig.from_dict({**run_config["train"], "device": str(device)})
    saved = load_checkpoint(path / "checkpoints" / f"{checkpoint}.ckpt")
    pyro.clear_param_store()
    vae = build_vae(config)
    restore(saved, modules=vae.modules, rng=False, device=device)
    data = load(
        config.dataset,
        data_dir=data_dir or run_config["data"].get("data_dir"),
        binarize=config.binarize,
        seed=train_config.seed,
        device=resolve_device(device),
    )
    vae.encoder.to(device).eval()
    vae.decoder.to(device).eval()
    return TrainedRun(path, vae, train_config, data)


def write_figures(run: TrainedRun, *, num: int = 100, seed: int = 0) -> list[Path]:
    """Prior samples and test reconstructions of a run, as PNG grids in its folder."""
    vae, data = run.vae, run.dataset
    vae.encoder.eval()
    vae.decoder.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = vae_model.generate(vae.decoder, num, likelihood=vae.config.likelihood)
    inputs = data.test.images[:50]
    recons = vae_model.reconstruct(vae.encoder, vae.decoder, inputs, vae.config.likelihood)
    title = f"{vae.config.dataset}: decoded samples z ~ N(0, I), E[x | z]"
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
) -> Evaluation:
    """Evaluate a run on its test set (beta = 1) and write ``evaluation.json``."""
    run = load_run(path, checkpoint=checkpoint, device=device)
    images = run.dataset.test.images[:limit] if limit else run.dataset.test.images
    with torch.no_grad():
        result = evaluate(
            run.vae.model,
            run.vae.guide,
            images,
            encoder=run.vae.encoder,
            iwae_samples=iwae_samples,
            progress=progress,
        )
    _write_json(run.path / "evaluation.json", {"checkpoint": checkpoint, **result.to_dict()})
    return result


def sample_run(
    path: str | os.PathLike[str], *, num: int = 100, seed: int = 0, device: str = "cpu"
) -> list[Path]:
    """Write a run's sample and reconstruction grids again (new seed, say)."""
    return write_figures(load_run(path, device=device), num=num, seed=seed)
