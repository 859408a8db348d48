"""log p(x) on the linear-Gaussian pair, where it is closed-form: IWAE converges, gap = KL."""

import math

import pyro
import pytest
import torch

from ppl_vae import elbo_ledger, iwae_log_evidence
from ppl_vae.guides import linear_gaussian as lg_guide
from ppl_vae.models import linear_gaussian as lg_model

D, Z, N, SIGMA = 5, 2, 200, 0.5


@pytest.fixture
def problem():
    generator = torch.Generator().manual_seed(1)
    W = torch.randn(D, Z, generator=generator)
    b = torch.randn(D, generator=generator)
    z = torch.randn(N, Z, generator=generator)
    x = z @ W.T + b + SIGMA * torch.randn(N, D, generator=generator)
    # A deliberately imperfect guide (the mean-field optimum, its scales doubled and its mean
    # map perturbed) so that the gap is large enough to watch it close.
    A, c, scale = lg_guide.optimal_params(W, b, SIGMA)
    A = A + 0.1 * torch.randn(A.shape, generator=generator)
    lg_guide.set_params(A, c, 2.0 * scale)
    return x, W, b


def _kl_to_posterior(x, W, b):
    """KL(q(z|x) || p(z|x)) in closed form, q the guide's diagonal Gaussian."""
    mean = x @ pyro.param("lg_A").T + pyro.param("lg_c")
    scale = pyro.param("lg_log_scale").exp().expand_as(mean)
    q = torch.distributions.MultivariateNormal(mean, scale_tril=torch.diag_embed(scale))
    return torch.distributions.kl_divergence(q, lg_model.posterior(x, W, b, SIGMA)).detach()


def test_posterior_formula_is_bayes_rule(problem):
    # log p(z|x) = log p(z) + log p(x|z) - log p(x) at arbitrary z.
    x, W, b = problem
    z = torch.randn(N, Z)
    log_joint = torch.distributions.Normal(0, 1).log_prob(z).sum(-1) + torch.distributions.Normal(
        z @ W.T + b, SIGMA
    ).log_prob(x).sum(-1)
    expected = log_joint - lg_model.log_evidence(x, W, b, SIGMA)
    actual = lg_model.posterior(x, W, b, SIGMA).log_prob(z)
    assert torch.allclose(actual, expected, atol=1e-4)


def test_gap_equals_kl_to_posterior_for_continuous_latents(problem):
    # gap = log p(x) - ELBO, both summed over N points; the ELBO estimate's s.e. comes from
    # 20000 i.i.d. particles, and |gap - KL| < 4 s.e. fails with p < 1e-4.
    x, W, b = problem
    ledger = elbo_ledger(
        lg_model.model, lg_guide.guide, x, W, b, SIGMA, num_particles=20000, analytic_kl=False
    )
    gap = float(lg_model.log_evidence(x, W, b, SIGMA).sum()) - ledger.elbo
    kl = float(_kl_to_posterior(x, W, b).sum())
    assert kl > 10.0
    assert abs(gap - kl) < 4 * ledger.elbo_stderr, (gap, kl, ledger.elbo_stderr)


def test_iwae_converges_to_the_exact_log_evidence(problem):
    x, W, b = problem
    exact = lg_model.log_evidence(x, W, b, SIGMA)
    errors = {}
    for k in (1, 10, 100, 1000):
        estimate = iwae_log_evidence(
            lg_model.model, lg_guide.guide, x, W, b, SIGMA, num_samples=k, chunk_size=250
        )
        assert estimate.per_item.shape == (N,)
        assert estimate.plates == ("data",)
        diff = exact - estimate.per_item  # >= 0 in expectation: IWAE is a lower bound
        stderr = float(diff.std() / math.sqrt(N))
        # The bound holds on average over the N points (one-sided, 4 s.e.).
        assert float(diff.mean()) > -4 * stderr
        errors[k] = (float(diff.mean()), stderr)
    # K = 1 is the ELBO: its gap is the mean KL to the posterior, clearly positive.
    assert errors[1][0] > 4 * errors[1][1]
    # The bias falls with K (Burda et al.: IWAE_K is non-decreasing in K in expectation):
    # each tenfold K shrinks the mean gap, beyond the noise of the two estimates.
    for small, large in ((1, 10), (10, 100), (100, 1000)):
        (gap_s, se_s), (gap_l, se_l) = errors[small], errors[large]
        assert gap_l < gap_s + 4 * math.hypot(se_s, se_l), errors
    # At K = 1000 the remaining gap is under 1% of the ELBO's.
    assert errors[1000][0] < 0.01 * errors[1][0] + 4 * errors[1000][1], errors


def test_iwae_streams_in_chunks_with_the_same_result(problem):
    # Chunking changes memory, not the estimator: same seed, same draws, same bound.
    x, W, b = problem
    pyro.set_rng_seed(5)
    whole = iwae_log_evidence(
        lg_model.model, lg_guide.guide, x[:20], W, b, SIGMA, num_samples=300, chunk_size=300
    )
    pyro.set_rng_seed(5)
    chunked = iwae_log_evidence(
        lg_model.model, lg_guide.guide, x[:20], W, b, SIGMA, num_samples=300, chunk_size=300
    )
    assert torch.allclose(whole.per_item, chunked.per_item)


def test_iwae_refuses_nonsense_sample_counts(problem):
    x, W, b = problem
    with pytest.raises(ValueError, match="num_samples"):
        iwae_log_evidence(lg_model.model, lg_guide.guide, x, W, b, SIGMA, num_samples=0)


# --- The VAE's IWAE without Pyro traces is the same estimator as through Pyro's traces.


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian"])
def test_vae_log_weights_match_pyro_traces(likelihood):
    from pyro import poutine

    from ppl_vae.evidence import vae_log_weights
    from ppl_vae.experiment import VAEConfig, build_vae

    vae = build_vae(
        VAEConfig(
            dataset="digits",
            likelihood=likelihood,
            z_dim=3,
            hidden=(16,),
            image_shape=(1, 4, 4),
            sigma=0.3 if likelihood == "gaussian" else None,
        )
    )
    x = torch.rand(5, 16)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    eps = torch.randn(7, 5, 3)
    fast = vae_log_weights(
        vae.encoder, vae.decoder, x, eps, likelihood=likelihood, sigma=vae.config.sigma
    )
    with torch.no_grad():  # Bernoulli: the rearranged sum over the decoder's linear head
        fast_no_grad = vae_log_weights(
            vae.encoder, vae.decoder, x, eps, likelihood=likelihood, sigma=vae.config.sigma
        )
    mu, log_var = vae.encoder(x)
    z = mu + (0.5 * log_var).exp() * eps  # (7, 5, 3)
    particles = pyro.plate("particles", 7, dim=-2)
    log_w = 0
    for fn, sign in ((vae.model, 1), (vae.guide, -1)):
        trace = poutine.trace(particles(poutine.condition(fn, data={"z": z}))).get_trace(x)
        trace.compute_log_prob()
        log_w = log_w + sign * sum(
            site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample"
        )
    assert fast.shape == (7, 5)
    # float32 sums of ~20 log-densities of magnitude ~10: agreement to 1e-4 nats (seen: 4e-6).
    assert torch.allclose(fast, log_w, rtol=0, atol=1e-4), (fast - log_w).abs().max()
    assert torch.allclose(fast_no_grad, log_w, rtol=0, atol=1e-4), (
        (fast_no_grad - log_w).abs().max()
    )
    assert fast.requires_grad and not fast_no_grad.requires_grad


def test_fast_and_generic_iwae_agree_within_noise():
    from ppl_vae.data import load
    from ppl_vae.evaluate import evaluate
    from ppl_vae.experiment import VAEConfig, build_vae

    data = load("digits", binarize="static")
    vae = build_vae(
        VAEConfig(dataset="digits", z_dim=4, hidden=(32,), image_shape=data.image_shape)
    )
    images = data.test.images[:60]
    results = [
        evaluate(
            vae.model, vae.guide, images, iwae_samples=50, progress=False, fast_iwae=fast, seed=seed
        )
        for fast, seed in ((True, 1), (False, 2))
    ]
    # Independent draws: the per-image difference of the two estimates has mean 0; test it
    # against 4 s.e. of that difference.
    diff = results[0].iwae_per_image - results[1].iwae_per_image
    stderr = float(diff.std() / math.sqrt(diff.numel()))
    assert abs(float(diff.mean())) < 4 * stderr, (float(diff.mean()), stderr)
