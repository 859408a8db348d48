"""Every figure function runs on tiny data and writes a non-empty PNG."""

import math

import pytest
import torch

from ppl_vae.elbo import LinearWarmup
from ppl_vae.runs import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

HISTORY = [
    {
        "epoch": e,
        "step": 10 * e,
        "beta": min(1.0, 0.4 * e),
        "train_objective": -40.0 + 3 * e,
        "val_elbo": -38.0 + 3 * e,
        "val_reconstruction": -36.0 + 3 * e,
        "val_kl": 0.02 * e,  # collapsed: the KL stays near zero
    }
    for e in range(1, 5)
]


def _figures():
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(40, 4, generator=generator)
    log_var = torch.randn(40, 4, generator=generator)
    labels = torch.arange(40) % 3
    qs = [0.1, 0.5, 0.8, 0.9]
    return {
        "training_curves": lambda: plots.training_curves_figure(HISTORY),
        "training_curves_schedule": lambda: plots.training_curves_figure(
            HISTORY, schedule=LinearWarmup(25)
        ),
        "latent_space_kl": lambda: plots.latent_space_figure(mu, labels, log_var=log_var),
        "latent_space_pca": lambda: plots.latent_space_figure(mu, labels, projection="pca"),
        "latent_space_2d": lambda: plots.latent_space_figure(mu[:, :2]),
        "latent_space_1d": lambda: plots.latent_space_figure(mu[:, :1], labels),
        "gaussian_kl": lambda: plots.gaussian_kl_figure(n=30),
        "samples": lambda: plots.image_grid(torch.rand(12, 16), (1, 4, 4), ncol=6),
        "reconstructions": lambda: plots.reconstructions_figure(
            torch.rand(10, 16), torch.rand(10, 16), (1, 4, 4)
        ),
        "interpolations": lambda: plots.interpolations_figure(torch.rand(2, 5, 16), (1, 4, 4)),
        "rate_distortion": lambda: plots.rate_distortion_figure(
            [8.0, 4.0, 1.0], [20.0, 23.0, 30.0], [0.5, 1.0, 4.0]
        ),
        "rate_distortion_one_point": lambda: plots.rate_distortion_figure([0.0], [30.0]),
        "iwae": lambda: plots.iwae_figure(
            [1, 10, 100], [-30.0, -29.6, -29.5], -30.0, iwae_se=[0.05, 0.05, 0.05]
        ),
        "toy_gap": lambda: plots.toy_gap_figure(
            qs, [q * math.log(0.8) + (1 - q) * math.log(0.2) for q in qs], math.log(0.5)
        ),
        "particles": lambda: plots.particles_figure(
            [10, 100], [-0.7, -0.72], [0.02, 0.01], -0.72, -0.69
        ),
    }


@pytest.mark.parametrize("name", sorted(_figures()))
def test_figure_writes_a_png(name, tmp_path):
    path = plots.save(_figures()[name](), tmp_path / "sub" / f"{name}.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_figures_refuse_inputs_they_cannot_draw():
    with pytest.raises(ValueError, match="no rows"):
        plots.training_curves_figure([])
    with pytest.raises(ValueError, match="projection"):
        plots.latent_space_figure(torch.zeros(5, 3), projection="tsne")
    with pytest.raises(ValueError, match="log_var or kl_per_dim"):
        plots.latent_space_figure(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="same length"):
        plots.rate_distortion_figure([1.0, 2.0], [3.0])
    with pytest.raises(ValueError, match="steps >= 2"):
        plots.interpolations_figure(torch.rand(2, 1, 16), (1, 4, 4))


def test_warmup_spans_follow_the_schedule():
    assert plots._warmup_spans(LinearWarmup(25), HISTORY, 40) == [(0, 25)]
    assert plots._warmup_spans(None, HISTORY, 40) == [(0, 30)]  # beta < 1 up to epoch 2's end
    constant = [{**row, "beta": 1.0} for row in HISTORY]
    assert plots._warmup_spans(None, constant, 40) == []
