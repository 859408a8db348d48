"""The main job (``ppl-vae demo``): the worked binary example, checked and drawn, then a small
VAE trained on Fashion-MNIST and evaluated with honest bounds."""

from __future__ import annotations

from pathlib import Path

import pyro
import torch

from ppl_vae.elbo import CheckReport, check_pair, particle_sweep
from ppl_vae.errors import DatasetNotFoundError
from ppl_vae.guides import binary_toy as toy_guide
from ppl_vae.models import binary_toy as toy_model
from ppl_vae.runs.evaluation import Evaluation
from ppl_vae.runs.image_plots import save
from ppl_vae.runs.training_plots import particles_figure

__all__ = ["binary_toy_demo", "vae_demo"]


def binary_toy_demo(
    out_dir: str | Path,
    *,
    q: float = 0.7,
    seed: int = 0,
    particles: tuple[int, ...] = (10, 100, 1000, 10000),
) -> tuple[CheckReport, Path]:
    """Check the binary toy at q(z=1 | x=1) = ``q`` on x = 1 and draw the sampled ELBO against
    the number of particles. Returns the report and the path of the PNG written."""
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    toy_guide.initialise(q_given_x1=q)
    x = torch.tensor(1.0)
    report = check_pair(toy_model.model, toy_guide.guide, x, num_particles=max(particles))
    sweep = particle_sweep(toy_model.model, toy_guide.guide, x, particles=particles)
    figure = particles_figure(
        [p.num_particles for p in sweep],
        [p.elbo for p in sweep],
        [p.stderr for p in sweep],
        report.exact_elbo,
        report.log_evidence,
        title=f"Binary toy, x = 1, q(z=1|x=1) = {q}",
    )
    return report, save(figure, Path(out_dir) / f"binary_toy_q{q:g}_elbo_vs_particles.png")


def vae_demo(
    out_dir: str | Path,
    *,
    epochs: int = 5,
    iwae_samples: int = 500,
    test_images: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Path, Evaluation]:
    """Train a 784-400-20 Bernoulli VAE on dynamically binarised Fashion-MNIST for ``epochs``
    (about 30 s on 2 CPU cores for the default), then evaluate it on ``test_images``
    test images. Falls back to the 8x8 digits, saying so, when Fashion-MNIST is missing."""
    from ppl_vae.runs.folder import evaluate_run, train_run
    from ppl_vae.training import TrainConfig
    from ppl_vae.vae import VAEConfig

    train_config = TrainConfig(epochs=epochs, seed=seed, progress=progress)
    run_dir = Path(out_dir) / "vae-fashion-mnist"
    try:
        run = train_run(run_dir, VAEConfig(dataset="fashion-mnist"), train_config)
    except DatasetNotFoundError as missing:
        print(f"{missing}\nFalling back to the 8x8 digits that ship with scikit-learn.\n")
        run_dir = Path(out_dir) / "vae-digits"
        run = train_run(run_dir, VAEConfig(dataset="digits", z_dim=8, hidden=(128,)), train_config)
    result = evaluate_run(run.path, iwae_samples=iwae_samples, limit=test_images, progress=progress)
    return run.path, result
