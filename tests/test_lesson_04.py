"""Lesson 04, beta and the latent space: every view of the notebook, driven at several values
and checked against computations written here from the trained networks themselves: the
closed-form Gaussian KL from the encoder's (mu, log_var), the Bernoulli log-likelihood summed
by hand over our own draws of z, the variance of the mean codes, the linear warm-up, and the
Gaussian log-density written out.

Monte Carlo numbers are compared with |difference| <= Z_BOUND * s.e., the s.e. of the difference
derived from the per-image variances of our own draws: a two-sided normal tail of 7e-6 per
check. Seeds are fixed, so every run draws the same numbers.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from lessons import Driver, run_notebook

NOTEBOOK = "04_beta_and_the_latent_space.ipynb"
Z_BOUND = 4.5
OUR_DRAWS = 400  # z per test image for the distortion recomputed here
WARMUP_STEPS = 100  # the notebook's "warmup:100"


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    return run_notebook(NOTEBOOK, tmp_path_factory.mktemp("lesson_04"))


@pytest.fixture(scope="module")
def drive(namespace):
    return Driver(namespace)


def moments(encoder, images):
    """The encoder's (mu, log_var) of ``images``, float64."""
    with torch.no_grad():
        mu, log_var = encoder(images)
    return mu.double(), log_var.double()


def gaussian_kl(mu, log_var):
    """KL(N(mu, diag exp(log_var)) || N(0, I)) per row, by hand."""
    return 0.5 * (mu.square() + log_var.exp() - log_var - 1).sum(-1)


def distortion_draws(encoder, decoder, images, draws, seed):
    """-log p(x | z) for ``draws`` z ~ q(z | x) per image: (draws, N). Bernoulli with logits l:
    log p(x | z) = sum_d x_d l_d - softplus(l_d)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mu, log_var = encoder(images)  # (N, z)
        eps = torch.randn((draws, *mu.shape), generator=generator)
        z = mu + (0.5 * log_var).exp() * eps  # (draws, N, z)
        logits = decoder(z).double()  # (draws, N, D)
    x = images.double()
    return -(x * logits - F.softplus(logits)).sum(-1)


@pytest.fixture(scope="module")
def recomputed(namespace):
    """R, D (mean and per-image variance of our draws) and the activities, per beta."""
    test = namespace["test"]
    out = {}
    for i, (beta, run) in enumerate(namespace["runs"].items()):
        mu, log_var = moments(run.vae.encoder, test.images)
        draws = distortion_draws(run.vae.encoder, run.vae.decoder, test.images, OUR_DRAWS, 100 + i)
        out[beta] = {
            "rate": float(gaussian_kl(mu, log_var).mean()),
            "distortion": float(draws.mean()),
            "per_image_var": draws.var(dim=0),  # (N,): Var_z[-log p(x_n | z)]
            "activity": mu.var(dim=0),  # unbiased, as Cov_x
        }
    return out


def distortion_se(namespace, beta, recomputed):
    """s.e. of (notebook's D - our D) for the same images: each is a mean over N images of
    means over independent draws of z (P per image in the notebook, ours OUR_DRAWS), so
    Var = sum_n Var_n (1/P + 1/OUR_DRAWS) / N^2 with Var_n estimated from our draws."""
    particles = namespace["runs"][beta].evaluation.elbo_particles
    var = recomputed[beta]["per_image_var"]
    n = var.numel()
    return math.sqrt(float(var.sum()) * (1 / particles + 1 / OUR_DRAWS)) / n


BETAS_DRIVEN = [0.1, 0.5, 1.0, 2.0, 4.0, 8.0]


@pytest.mark.parametrize("beta", BETAS_DRIVEN)
def test_beta_view_rate_is_the_mean_closed_form_kl(drive, recomputed, beta):
    out = drive("beta_view", beta=beta)
    assert out["beta"] == beta
    # Both closed form on the same images: only float32 rounding differs.
    assert out["rate"] == pytest.approx(recomputed[beta]["rate"], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("beta", BETAS_DRIVEN)
def test_beta_view_distortion_and_elbo_by_monte_carlo(namespace, drive, recomputed, beta):
    out = drive("beta_view", beta=beta)
    assert out["beta"] == beta
    mine = recomputed[beta]
    se = distortion_se(namespace, beta, recomputed)
    assert abs(out["distortion"] - mine["distortion"]) <= Z_BOUND * se
    # ELBO = -(D + R): our R is exact, so the same s.e. bounds the ELBO's difference.
    assert abs(out["elbo"] - -(mine["distortion"] + mine["rate"])) <= Z_BOUND * se + 1e-5


@pytest.mark.parametrize("beta", BETAS_DRIVEN)
def test_beta_view_active_units_recounted(drive, recomputed, beta):
    out = drive("beta_view", beta=beta)
    activity = recomputed[beta]["activity"]
    assert out["active_units"] == int((activity > 0.01).sum())
    assert out["activity"] == pytest.approx(activity.tolist(), rel=1e-4, abs=1e-7)


def test_large_beta_collapses_the_posterior(drive, recomputed):
    small, large = min(BETAS_DRIVEN), max(BETAS_DRIVEN)
    out_small = drive("beta_view", beta=small)
    out_large = drive("beta_view", beta=large)
    assert out_large["active_units"] < out_small["active_units"]
    assert out_large["active_units"] == 0
    # Rate near zero (below 0.1 nats per image) by our own closed form, far below beta's smallest.
    assert recomputed[large]["rate"] < 0.1 < recomputed[small]["rate"]


@pytest.mark.parametrize("epoch", [1, 2, 5, 10, 20])
def test_warmup_view_reads_the_history(namespace, drive, epoch):
    out = drive("warmup_view", epoch=epoch)
    row = namespace["warm"].history[epoch - 1]
    other = namespace["runs"][1.0].history[epoch - 1]
    assert out["epoch"] == epoch == row["epoch"]
    assert out["step"] == row["step"]
    assert out["reconstruction"] == pytest.approx(row["val_reconstruction"], rel=1e-12)
    assert out["kl"] == pytest.approx(row["val_kl"], rel=1e-12)
    assert out["elbo"] == pytest.approx(row["val_reconstruction"] - row["val_kl"], rel=1e-12)
    assert out["kl_constant_beta"] == pytest.approx(other["val_kl"], rel=1e-12)
    # Linear warm-up: beta at the epoch's last step (0-based step - 1) is min(1, step / 100).
    assert out["beta"] == pytest.approx(min(1.0, (out["step"] - 1) / WARMUP_STEPS), abs=1e-12)


def test_warmup_last_epoch_kl_is_the_closed_form_on_validation_images(namespace, drive):
    warm = namespace["warm"]
    out = drive("warmup_view", epoch=len(warm.history))
    assert out["epoch"] == len(warm.history)
    mu, log_var = moments(warm.vae.encoder, namespace["data"].validation.images)
    assert out["kl"] == pytest.approx(float(gaussian_kl(mu, log_var).mean()), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("sigma", [0.05, 0.2, 1.0])
def test_gaussian_view_nll_is_squared_error_plus_constant(namespace, drive, sigma):
    out = drive("gaussian_view", sigma=sigma)
    assert out["sigma"] == pytest.approx(sigma, rel=1e-12)
    sigma = out["sigma"]
    x, mean = namespace["grey"].double(), namespace["means"].double()
    n_pixels = x.shape[1]
    squared = ((x - mean) ** 2).sum(-1)
    # -log N(x; mu, sigma^2 I) = sum_d [(x_d - mu_d)^2 / (2 sigma^2) + log(sigma sqrt(2 pi))]
    expected = squared / (2 * sigma**2) + n_pixels * math.log(sigma * math.sqrt(2 * math.pi))
    scale = float(expected.abs().max())
    assert out["nll"] == pytest.approx(expected.tolist(), abs=1e-6 * scale + 1e-4)
    assert out["from_mse"] == pytest.approx(expected.tolist(), abs=1e-6 * scale + 1e-4)
    assert out["squared_error"] == pytest.approx(squared.tolist(), rel=1e-5)
    assert out["constant"] == pytest.approx(n_pixels * math.log(sigma * math.sqrt(2 * math.pi)))
    assert out["max_abs_difference"] <= 1e-6 * scale + 1e-4
    assert out["equivalent_beta"] == pytest.approx(2 * sigma**2, rel=1e-12)


def test_every_view_is_driven(drive):
    assert drive.undriven() == []
