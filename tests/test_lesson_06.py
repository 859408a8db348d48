"""Lesson 06, a VAE on digits: every view of the notebook, driven at several values and checked
against computations written here from the trained networks themselves: the closed-form
Gaussian KL, the Bernoulli log-likelihood written out, importance weights p(x, z) / q(z | x)
summed by hand over our own draws, and the binary toy's free-bits objective by enumeration.

Monte Carlo numbers are compared with |difference| <= Z_BOUND * s.e., the s.e. of the difference
derived from the variances of our own draws: a two-sided normal tail of 7e-6 per check. Seeds
are fixed, so every run draws the same numbers.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from lessons import Driver, run_notebook

NOTEBOOK = "06_a_vae_on_digits.ipynb"
Z_BOUND = 4.5
OUR_DRAWS = 20_000  # z per image for the importance weights recomputed here
LOG_2PI = math.log(2 * math.pi)


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    return run_notebook(NOTEBOOK, tmp_path_factory.mktemp("lesson_06"))


@pytest.fixture(scope="module")
def drive(namespace):
    return Driver(namespace)


def bernoulli_log_lik(x, logits):
    """log p(x | z) = sum_d x_d l_d - softplus(l_d), summed over the last dimension."""
    return (x * logits - F.softplus(logits)).sum(-1)


def log_weights(encoder, decoder, images, draws, seed, chunk=1000):
    """log p(x | z) + log N(z; 0, I) - log N(z; mu, sigma^2) for ``draws`` z ~ q(z | x) per
    image, (draws, N) float64, and the log-likelihood part alone; ``chunk`` draws at a time."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mu, log_var = encoder(images)
    mu, log_var = mu.double(), log_var.double()
    d = mu.shape[-1]
    weights, likelihoods = [], []
    for start in range(0, draws, chunk):
        eps = torch.randn((min(chunk, draws - start), *mu.shape), generator=generator)
        eps = eps.double()
        z = mu + (0.5 * log_var).exp() * eps  # (chunk, N, z)
        with torch.no_grad():
            log_lik = bernoulli_log_lik(images.double(), decoder(z.float()).double())
        log_prior = -0.5 * z.square().sum(-1) - 0.5 * d * LOG_2PI
        log_q = -0.5 * (eps.square() + log_var).sum(-1) - 0.5 * d * LOG_2PI
        weights.append(log_lik + log_prior - log_q)
        likelihoods.append(log_lik)
    return torch.cat(weights), torch.cat(likelihoods)


def gaussian_kl(mu, log_var):
    return 0.5 * (mu.square() + log_var.exp() - log_var - 1).sum(-1)


# -- one test image -------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 7, 100, 358])
def test_image_view_kl_and_fit_at_the_mean(namespace, drive, index):
    out = drive("image_view", index=index)
    assert out["index"] == index
    test = namespace["test"]
    assert out["label"] == int(test.labels[index])
    x = test.images[index : index + 1]
    with torch.no_grad():
        mu, log_var = namespace["encoder"](x)
        logits = namespace["decoder"](mu)
    assert out["kl"] == pytest.approx(float(gaussian_kl(mu.double(), log_var.double())), rel=1e-5)
    expected = float(bernoulli_log_lik(x.double(), logits.double()))
    assert out["log_lik_at_mean"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("index", [0, 100])
def test_image_view_bounds_against_our_draws(namespace, drive, index):
    out = drive("image_view", index=index)
    assert out["index"] == index
    k = out["iwae_k"]
    x = namespace["test"].images[index : index + 1]
    log_w, log_lik = log_weights(namespace["encoder"], namespace["decoder"], x, OUR_DRAWS, index)
    log_w, log_lik = log_w[:, 0], log_lik[:, 0]
    # The notebook's IWAE_K of this image is one draw of the K-sample bound; ours are
    # OUR_DRAWS / K independent draws of it: |theirs - our mean| over sd sqrt(1 + 1/m).
    blocks = torch.logsumexp(log_w.reshape(-1, k), dim=1) - math.log(k)  # (m,)
    m = blocks.numel()
    sd = float(blocks.std()) * math.sqrt(1 + 1 / m)
    assert abs(out["iwae"] - float(blocks.mean())) <= Z_BOUND * sd
    # Its ELBO is one draw of log p(x | z) minus the closed-form KL.
    with torch.no_grad():
        mu, log_var = namespace["encoder"](x)
    kl = float(gaussian_kl(mu.double(), log_var.double()))
    sd = float(log_lik.std()) * math.sqrt(1 + 1 / OUR_DRAWS)
    assert abs(out["elbo_one_draw"] - (float(log_lik.mean()) - kl)) <= Z_BOUND * sd


# -- the IWAE bound against K ---------------------------------------------------------------


@pytest.fixture(scope="module")
def our_log_weights(namespace):
    images = namespace["curve_images"]
    return log_weights(namespace["encoder"], namespace["decoder"], images, OUR_DRAWS, 2024)[0]


@pytest.mark.parametrize("k", [1, 10, 100, 1000])
def test_iwae_view_against_our_importance_weights(drive, our_log_weights, k):
    out = drive("iwae_view", k=k)
    assert out["k"] == k
    n = our_log_weights.shape[1]
    assert out["n_images"] == n
    # IWAE_K per image: the mean over disjoint blocks of K of logsumexp - log K.
    usable = our_log_weights[: (OUR_DRAWS // k) * k]
    blocks = torch.logsumexp(usable.reshape(-1, k, n), dim=1) - math.log(k)  # (m, N)
    ours = float(blocks.mean())
    # The notebook averages out["blocks"] blocks per image, we average m: for the same images
    # Var(difference) = sum_n v_n (1/blocks + 1/m) / N^2, v_n the variance of one block.
    v = blocks.var(dim=0)
    se = math.sqrt(float(v.sum()) * (1 / out["blocks"] + 1 / blocks.shape[0])) / n
    assert abs(out["iwae"] - ours) <= Z_BOUND * se
    assert out["gap"] == pytest.approx(out["iwae"] - out["elbo"], abs=1e-9)


def test_iwae_view_is_non_decreasing_in_k(namespace, drive):
    ks = list(namespace["KS"])
    outs = [drive("iwae_view", k=k) for k in ks]
    assert [o["k"] for o in outs] == ks
    assert outs[0]["iwae"] == pytest.approx(outs[0]["elbo"], abs=1e-9)  # K = 1 is the ELBO
    for small, large in itertools.pairwise(outs):
        # IWAE_K' - IWAE_K = gap_K' - gap_K: its s.e. is at most gap_se_K + gap_se_K'.
        assert large["iwae"] - small["iwae"] >= -Z_BOUND * (small["gap_se"] + large["gap_se"])
    # ... and the rise over the whole range is real, not noise.
    assert outs[-1]["gap"] > Z_BOUND * outs[-1]["gap_se"]


# -- free bits on the binary toy ------------------------------------------------------------

TOY_X = (1, 0, 1)
TOY_Q = {0: 0.3, 1: 0.9}  # the notebook's guide q(z=1 | x)
TOY_PRIOR, TOY_DECODER = 0.5, (0.2, 0.8)  # p(z=1), p(x=1 | z=0), p(x=1 | z=1)


def toy_terms():
    """(reconstruction summed over the data, KL per datapoint) by enumeration."""
    recon, kl = 0.0, 0.0
    for x in TOY_X:
        q1 = TOY_Q[x]
        for z, qz in ((0, 1 - q1), (1, q1)):
            px = TOY_DECODER[z] if x == 1 else 1 - TOY_DECODER[z]
            pz = TOY_PRIOR if z == 1 else 1 - TOY_PRIOR
            recon += qz * math.log(px)
            kl += qz * math.log(qz / pz)
    return recon, kl / len(TOY_X)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_free_bits_view_by_enumeration(drive, lam):
    out = drive("free_bits_view", lam=lam)
    assert out["lam"] == pytest.approx(lam, abs=1e-12)
    recon, kl = toy_terms()
    assert out["reconstruction"] == pytest.approx(recon, abs=1e-5)
    assert out["kl_per_datapoint"] == pytest.approx(kl, abs=1e-5)
    assert out["objective"] == pytest.approx(recon - len(TOY_X) * max(lam, kl), abs=1e-5)
    assert out["clamped"] == (kl < lam)


def test_every_view_is_driven(drive):
    assert drive.undriven() == []
