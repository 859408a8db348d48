"""The main job: the worked binary example, checked and drawn (``ppl-vae demo``)."""

from __future__ import annotations

from pathlib import Path

import pyro
import torch

from ppl_vae.check import CheckReport, check_pair, particle_sweep
from ppl_vae.guides import binary_toy as toy_guide
from ppl_vae.models import binary_toy as toy_model
from ppl_vae.plots import particles_figure, save

__all__ = ["binary_toy_demo"]


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
