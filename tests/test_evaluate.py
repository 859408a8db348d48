"""Test-set evaluation of a VAE: identities that must hold exactly, bounds that must hold
within their standard errors, and an exact check of log p(x) on probabilistic PCA.

Tolerances on Monte Carlo quantities are 4 standard errors of per-image paired differences:
a one-sided check fails by chance with p < 4e-5, a two-sided one with p < 7e-5.
"""

import functools
import itertools
import json
import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from ppl_vae.data import datasets as data
from ppl_vae.errors import DataError
from ppl_vae.guides import linear_gaussian as lg_guide
from ppl_vae.guides import vae as vae_guide
from ppl_vae.models import linear_gaussian as lg_model
from ppl_vae.models import vae
from ppl_vae.runs.evaluate import FLOAT_BUDGET, _sizes, evaluate, vae_log_evidence
from ppl_vae.runs.evaluation import Evaluation
from ppl_vae.vae import make_networks

KS = (1, 10, 100)
N_TEST = 100


@pytest.fixture(scope="module")
def digits_vae():
    """A 64-32-4 Bernoulli VAE after a dozen steps on binarised digits, and 100 test images.

    So little training leaves a small rate (well under a nat per image): the bounds below must
    hold for any pair, trained or not, so a weak model tests them as well as a good one.
    """
    dataset = data.load("digits", binarize="static")
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    encoder, decoder = make_networks(dataset.data_dim, 4, [32])
    model = functools.partial(vae.model, decoder=decoder)
    guide = functools.partial(vae_guide.guide, encoder=encoder)
    svi = SVI(model, guide, Adam({"lr": 3e-3}), Trace_ELBO())
    generator = torch.Generator().manual_seed(0)
    for x in itertools.islice(dataset.train_batches(128, generator=generator), 12):
        svi.step(x, check_data=False)
    pyro.clear_param_store()
    return model, guide, encoder, dataset.test.images[:N_TEST]


@pytest.fixture(scope="module")
def evaluations(digits_vae):
    model, guide, encoder, x = digits_vae
    # The trace-free IWAE that evaluate_run uses; a different seed per K keeps the IWAE draws
    # of the K's independent.
    fast = vae_log_evidence(encoder, model.keywords["decoder"])
    return {
        k: evaluate(model, guide, x, iwae_samples=k, seed=k, progress=False, log_evidence=fast)
        for k in KS
    }


LN2 = math.log(2.0)


class _Reshaped(torch.nn.Module):
    """The fixture's encoder with its means scaled per dimension and its log-variances shifted:
    q(z | x) = N(scale * mu(x), exp(log_var(x) + shift)). Known activities, and (with a large
    negative shift) a q so narrow that z = mu to float32 precision."""

    def __init__(self, encoder, scale, shift):
        super().__init__()
        self.inner = encoder
        self.x_dim, self.z_dim = encoder.x_dim, encoder.z_dim
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.shift = shift

    def forward(self, x):
        mu, log_var = self.inner(x)
        return mu * self.scale, log_var + self.shift


def _own_terms(encoder, decoder, x, z):
    """Per-image log p(x | z) (Bernoulli on the decoder's logits) and the closed-form
    KL(N(mu, sigma^2) || N(0, I)), written with torch.distributions; z: (..., N, 4)."""
    with torch.no_grad():
        mu, log_var = encoder(x)
        q = torch.distributions.Normal(mu.double(), (0.5 * log_var.double()).exp())
        kl_dims = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0))
        logits = decoder(z).double()
        recon = torch.distributions.Bernoulli(logits=logits).log_prob(x.double()).sum(-1)
    return recon, kl_dims, mu.double()


def _own_active_units(mu):
    """Burda et al. (2015): Cov_x(E_q[z_u | x]) > 0.01, the unbiased variance over images."""
    centred = mu - mu.sum(0) / mu.shape[0]
    activity = (centred * centred).sum(0) / (mu.shape[0] - 1)
    return int(sum(1 for a in activity.tolist() if a > 0.01)), activity


def _sample_se(values):
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


# Float32 tolerance of a per-image value: a sum of 64 log-probabilities of a few nats each, and
# four KL terms of ~20 nats (sharp q below), each rounded to 2^-24 relative: well under 1e-4.
F32_NATS = 1e-4


def test_elbo_terms_match_an_independent_computation_with_a_sharp_encoder(digits_vae):
    """q(z | x) of s.d. exp(-20) ~ 2e-9: z = mu(x) to float32 precision, so each image's
    one-particle ELBO is log p(x | mu(x)) - KL(q || p) with no Monte Carlo noise, and every
    number evaluate reports can be compared with one computed here."""
    model, _, encoder, x = digits_vae
    sharp = _Reshaped(encoder, [4.0, 1.0, 2.0, 0.5], shift=-40.0)
    guide = functools.partial(vae_guide.guide, encoder=sharp)
    ev = evaluate(model, guide, x, iwae_samples=1, seed=0, progress=False)

    decoder = model.keywords["decoder"]
    with torch.no_grad():
        mu = sharp(x)[0]
    recon, kl_dims, mu = _own_terms(sharp, decoder, x, mu)
    kl = kl_dims.sum(-1)
    elbo = (recon - kl).tolist()
    mean = sum(elbo) / N_TEST
    assert ev.n_images == N_TEST and ev.image_dim == 64 and ev.z_dim == 4
    assert ev.elbo_per_image.shape == (N_TEST,)
    torch.testing.assert_close(ev.elbo_per_image, recon - kl, atol=F32_NATS, rtol=0)
    assert ev.elbo == pytest.approx(mean, abs=F32_NATS)
    assert ev.elbo_se == pytest.approx(_sample_se(elbo), abs=F32_NATS)
    assert ev.reconstruction == pytest.approx(float(recon.mean()), abs=F32_NATS)
    assert ev.distortion == pytest.approx(-float(recon.mean()), abs=F32_NATS)
    assert ev.kl == pytest.approx(float(kl.mean()), abs=F32_NATS)
    assert ev.rate == pytest.approx(float(kl.mean()), abs=F32_NATS)
    assert ev.kl > 50  # ~20 nats per dimension: the shift took effect
    assert ev.kl_per_dim == pytest.approx(kl_dims.mean(0).tolist(), abs=F32_NATS)
    assert ev.bits_per_dim_elbo == pytest.approx(-mean / (64 * LN2), abs=F32_NATS / (64 * LN2))
    # Activities 0.009, 0.006, 0.008, 0.009 scaled by 16, 1, 4, 0.25: units 0 and 2 active.
    count, activity = _own_active_units(mu)
    assert count == 2 and ev.active_units == count
    assert (activity - 0.01).abs().min() > 1e-3  # no unit within float noise of the threshold


def test_elbo_matches_an_independent_estimate_of_the_trained_pair(evaluations, digits_vae):
    """Each image's one-particle ELBO against this file's 256-particle estimate with its own
    draws: unbiased for the same expectation, so the mean of the per-image paired differences
    is zero; |z| < 4 (normal approximation, 100 images) fails with probability < 7e-5."""
    model, _, encoder, x = digits_vae
    decoder = model.keywords["decoder"]
    with torch.no_grad():
        mu, log_var = encoder(x)
    eps = torch.randn(256, *mu.shape, generator=torch.Generator().manual_seed(11))
    recon, kl_dims, mu = _own_terms(encoder, decoder, x, mu + (0.5 * log_var).exp() * eps)
    kl = kl_dims.sum(-1)
    own = recon.mean(0) - kl  # (N,)
    count, _ = _own_active_units(mu)
    for ev in evaluations.values():
        assert ev.iwae_k in KS and ev.elbo_particles == 1
        assert ev.seconds > 0 and ev.device == "cpu"
        # The KL is closed-form: equal to float32 rounding.
        assert ev.kl == pytest.approx(float(kl.mean()), abs=F32_NATS)
        assert ev.kl_per_dim == pytest.approx(kl_dims.mean(0).tolist(), abs=F32_NATS)
        diff = (ev.elbo_per_image - own).tolist()
        z = (sum(diff) / N_TEST) / _sample_se(diff)
        assert abs(z) < 4, (ev.iwae_k, z)
        assert ev.elbo == pytest.approx(sum(ev.elbo_per_image.tolist()) / N_TEST, abs=1e-9)
        assert ev.elbo_se == pytest.approx(_sample_se(ev.elbo_per_image.tolist()), rel=1e-9)
        assert ev.bits_per_dim_elbo == pytest.approx(-ev.elbo / (64 * LN2), rel=1e-12)
        assert ev.active_units == count  # 0 here: every activity is 0.006..0.009


def test_iwae_is_at_least_the_elbo(evaluations):
    # E[IWAE_K - ELBO] >= 0; one-sided, 4 s.e. of the per-image paired differences.
    for k in (10, 100):
        ev = evaluations[k]
        diff = ev.iwae_per_image - ev.elbo_per_image
        assert ev.gap_elbo_iwae == pytest.approx(sum(diff.tolist()) / N_TEST, abs=1e-9)
        assert ev.gap_se == pytest.approx(_sample_se(diff.tolist()), rel=1e-9)
        assert ev.gap_elbo_iwae > -4 * ev.gap_se, (k, ev.gap_elbo_iwae, ev.gap_se)


def test_iwae_does_not_decrease_with_k(evaluations):
    # E[IWAE_K'] >= E[IWAE_K] for K' > K: per-image paired differences of independent runs.
    for small, large in itertools.pairwise(KS):
        diff = evaluations[large].iwae_per_image - evaluations[small].iwae_per_image
        se = float(diff.std()) / math.sqrt(N_TEST)
        assert float(diff.mean()) > -4 * se, (small, large, float(diff.mean()), se)


def test_one_sample_iwae_is_a_single_sample_elbo(evaluations):
    # IWAE_1 = log p(x, z) - log q(z | x), z ~ q: unbiased for the ELBO (two-sided, 4 s.e.).
    ev = evaluations[1]
    assert abs(ev.gap_elbo_iwae) < 4 * ev.gap_se, (ev.gap_elbo_iwae, ev.gap_se)


def test_bits_per_dim_are_nats_over_d_ln2(evaluations):
    ev = evaluations[100]
    elbo = sum(ev.elbo_per_image.tolist()) / N_TEST
    iwae = sum(ev.iwae_per_image.tolist()) / N_TEST
    assert ev.bits_per_dim_elbo == pytest.approx(-elbo / (64 * LN2), rel=1e-12)
    assert ev.bits_per_dim_iwae == pytest.approx(-iwae / (64 * LN2), rel=1e-12)
    assert ev.gap_bits_per_dim == pytest.approx((iwae - elbo) / (64 * LN2), rel=1e-9)
    assert ev.bits_per_dim_iwae <= ev.bits_per_dim_elbo + 4 * ev.gap_se / (64 * LN2)
    as_dict = ev.to_dict()
    assert as_dict["bits_per_dim_elbo"] == ev.bits_per_dim_elbo
    assert as_dict["bits_per_dim_iwae"] == ev.bits_per_dim_iwae


def test_to_dict_round_trips_through_json(evaluations):
    ev = evaluations[10]
    as_dict = ev.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert json.loads(ev.to_json()) == as_dict
    assert isinstance(as_dict["kl_per_dim"], list)
    assert "elbo_per_image" not in as_dict
    assert {"distortion", "rate", "bits_per_dim_elbo", "gap_elbo_iwae"} <= set(as_dict)
    rebuilt = Evaluation.from_dict(json.loads(ev.to_json(per_image=True)))
    assert rebuilt == ev
    assert torch.allclose(rebuilt.iwae_per_image, ev.iwae_per_image)


def test_table_states_units_and_bounds(evaluations):
    text = str(evaluations[100])
    assert "nats/image" in text and "bits/dim" in text
    assert "LOWER bounds on log p(x)" in text and "IWAE, K = 100" in text
    assert "active units" in text


def test_seed_reproduces_and_leaves_the_global_stream_alone(digits_vae):
    model, guide, _, x = digits_vae
    state = torch.get_rng_state()
    first = evaluate(model, guide, x[:20], iwae_samples=10, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    second = evaluate(model, guide, x[:20], iwae_samples=10, seed=3, progress=False)
    assert torch.equal(first.iwae_per_image, second.iwae_per_image)
    assert torch.equal(first.elbo_per_image, second.elbo_per_image)


def test_small_batches_and_chunks_give_one_value_per_image(digits_vae):
    model, guide, encoder, x = digits_vae
    ev = evaluate(
        model,
        guide,
        x[:23],
        encoder=encoder,
        iwae_samples=20,
        iwae_chunk=7,
        batch_size=5,
        elbo_particles=3,
        progress=False,
    )
    assert ev.iwae_per_image.shape == (23,) and ev.elbo_particles == 3
    assert ev.gap_elbo_iwae > -4 * ev.gap_se


def test_a_passed_log_evidence_is_used_after_the_elbo_draws(digits_vae):
    model, guide, _, x = digits_vae
    x = x[:20]
    plain = evaluate(model, guide, x, iwae_samples=10, seed=5, progress=False)
    calls = []

    def known(images, num_samples, progress):
        calls.append((images.shape, num_samples, progress))
        return torch.arange(images.shape[0], dtype=torch.float64)

    ev = evaluate(model, guide, x, iwae_samples=10, seed=5, progress=False, log_evidence=known)
    assert calls == [(x.shape, 10, False)]
    assert torch.equal(ev.iwae_per_image, torch.arange(20, dtype=torch.float64))
    assert torch.equal(ev.elbo_per_image, plain.elbo_per_image)  # the ELBO draws come first
    assert not torch.equal(plain.iwae_per_image, ev.iwae_per_image)


def test_trace_free_and_pyro_iwae_agree_within_noise(digits_vae):
    # Two estimators of one bound with independent draws: the per-image differences have mean
    # 0; two-sided, 4 s.e. of those differences.
    model, guide, encoder, x = digits_vae
    fast = vae_log_evidence(encoder, model.keywords["decoder"])
    results = [
        evaluate(model, guide, x, iwae_samples=50, seed=seed, progress=False, log_evidence=route)
        for seed, route in ((1, fast), (2, None))
    ]
    diff = results[0].iwae_per_image - results[1].iwae_per_image
    stderr = float(diff.std()) / math.sqrt(diff.numel())
    assert abs(float(diff.mean())) < 4 * stderr, (float(diff.mean()), stderr)


def test_default_sizes_keep_memory_bounded():
    for n, d, k, particles in ((10000, 784, 5000, 1), (1000, 64, 1000, 10), (3, 784, 1, 1)):
        elbo_batch, iwae_batch, chunk = _sizes(n, d, k, particles, None, None)
        assert 1 <= iwae_batch <= n and 1 <= elbo_batch <= n and 1 <= chunk <= k
        assert chunk * iwae_batch * d <= FLOAT_BUDGET or iwae_batch == 1
        assert particles * elbo_batch * d <= FLOAT_BUDGET
    # With batch_size = 10 the chunk is the most importance samples whose block of
    # chunk x 10 images x 784 values fits in the 32 Mi-float budget.
    assert FLOAT_BUDGET == 32 * 2**20
    elbo_batch, iwae_batch, chunk = _sizes(100, 784, 5000, 1, 10, None)
    assert (elbo_batch, iwae_batch) == (10, 10)
    assert chunk * 10 * 784 <= 32 * 2**20 < (chunk + 1) * 10 * 784
    assert _sizes(100, 784, 50, 1, 10, None)[2] == 50  # never more than K


def test_collapsed_vae_is_flagged(digits_vae):
    # An encoder head of zeros gives q(z | x) = N(0, I) = p(z): rate 0, no active unit.
    encoder, decoder = make_networks(64, 4, [32])
    torch.nn.init.zeros_(encoder.head.weight)
    torch.nn.init.zeros_(encoder.head.bias)
    model = functools.partial(vae.model, decoder=decoder)
    guide = functools.partial(vae_guide.guide, encoder=encoder)
    ev = evaluate(model, guide, digits_vae[3][:30], iwae_samples=5, progress=False)
    assert ev.kl == pytest.approx(0.0, abs=1e-7) and ev.active_units == 0
    assert ev.collapse is not None
    assert "WARNING: posterior collapse" in str(ev)


def test_bad_inputs_are_refused(digits_vae):
    model, guide, _, x = digits_vae
    bad = x[:4].clone()
    bad[0, 0] = math.nan
    with pytest.raises(DataError, match="NaN"):
        evaluate(model, guide, bad, iwae_samples=2, progress=False)
    with pytest.raises(ValueError, match="iwae_samples"):
        evaluate(model, guide, x, iwae_samples=0, progress=False)


# ------------------------------------------------ probabilistic PCA: log p(x) in closed form

D, Z, N, SIGMA = 5, 2, 200, 0.5


def test_iwae_and_elbo_against_the_exact_log_evidence():
    generator = torch.Generator().manual_seed(1)
    W = torch.randn(D, Z, generator=generator)
    b = torch.randn(D, generator=generator)
    x = (
        torch.randn(N, Z, generator=generator) @ W.T
        + b
        + SIGMA * torch.randn(N, D, generator=generator)
    )
    # An imperfect guide (scales doubled, mean map perturbed) so the ELBO's gap is large.
    A, c, scale = lg_guide.optimal_params(W, b, SIGMA)
    A = A + 0.1 * torch.randn(A.shape, generator=generator)
    lg_guide.set_params(A, c, 2.0 * scale)

    def model(x, beta=1.0, check_data=True):
        lg_model.model(x, W, b, SIGMA, beta)

    def guide(x, beta=1.0, check_data=True):
        lg_guide.guide(x, W, b, SIGMA, beta)

    ev = evaluate(model, guide, x, iwae_samples=1000, elbo_particles=50, progress=False)
    assert ev.active_units is None and ev.kl_per_dim is None
    exact = lg_model.log_evidence(x, W, b, SIGMA).double()  # (N,)

    # log p(x) - ELBO = KL(q(z | x) || p(z | x)), in closed form per image.
    mean = x @ A.T + c
    q = torch.distributions.MultivariateNormal(mean, scale_tril=torch.diag_embed(2 * scale))
    kl = torch.distributions.kl_divergence(q, lg_model.posterior(x, W, b, SIGMA)).double()
    diff = exact - ev.elbo_per_image - kl
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(N)
    assert float(kl.mean()) > 0.5

    # IWAE_1000 is below log p(x) (one-sided, 4 s.e.), and its gap is the delta-method bias
    # log p(x) - IWAE_K = chi2(p(z | x) || q) / (2K) + O(1/K^2) (Maddison et al. 2017;
    # Rainforth et al. 2018), chi2 = Var_q(w) / p(x)^2 = int p(z | x)^2 / q(z | x) dz - 1, in
    # closed form for two Gaussians. The O(1/K^2) term, of order mean(chi2^2) / K^2, is under
    # 1% of the s.e. (checked below; q is wider than the posterior, so every moment of w
    # exists). Two-sided, 4 s.e. of the per-image gaps: fails by chance with p < 7e-5.
    gap = exact - ev.iwae_per_image
    se = float(gap.std()) / math.sqrt(N)
    assert float(gap.mean()) > -4 * se
    post = lg_model.posterior(x, W, b, SIGMA)
    m1, s1 = post.loc.double()[..., None], post.covariance_matrix.double()
    m2, s2 = mean.double()[..., None], torch.diag_embed((2 * scale).double() ** 2)
    s1_inv, s2_inv = torch.linalg.inv(s1), torch.linalg.inv(s2)
    prec = 2 * s1_inv - s2_inv  # positive definite: the integral is finite
    h = 2 * s1_inv @ m1 - s2_inv @ m2
    log_int = (
        -torch.logdet(s1)
        + 0.5 * torch.logdet(s2)
        - 0.5 * torch.logdet(prec)
        + 0.5 * (h.mT @ torch.linalg.solve(prec, h)).squeeze((-2, -1))
        - (m1.mT @ s1_inv @ m1).squeeze((-2, -1))
        + 0.5 * (m2.mT @ s2_inv @ m2).squeeze((-2, -1))
    )
    chi2 = log_int.exp() - 1.0
    predicted = float(chi2.mean()) / (2 * 1000)
    assert float((chi2**2).mean()) / 1000**2 < 0.01 * se
    assert abs(float(gap.mean()) - predicted) < 4 * se, (float(gap.mean()), predicted, se)
    # The closed form itself: int N(0, 1)^2 / N(0, 4) = 2 / sqrt(1.75) (a 1-d quadrature).
    grid = torch.linspace(-30, 30, 200001, dtype=torch.float64)
    p1, q4 = torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(0.0, 2.0)
    quad = torch.trapezoid((2 * p1.log_prob(grid) - q4.log_prob(grid)).exp(), grid)
    assert float(quad) == pytest.approx(2 / math.sqrt(1.75), rel=1e-6)
    assert "LOWER bounds" in str(ev)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluation_runs_on_the_images_device(digits_vae):
    model, guide, encoder, x = digits_vae
    encoder, decoder = make_networks(64, 4, [32])
    encoder, decoder = encoder.cuda(), decoder.cuda()
    model = functools.partial(vae.model, decoder=decoder)
    guide = functools.partial(vae_guide.guide, encoder=encoder)
    ev = evaluate(model, guide, x.cuda(), iwae_samples=10, progress=False)
    assert ev.device.startswith("cuda") and ev.iwae_per_image.device.type == "cpu"
    assert ev.gap_elbo_iwae > -4 * ev.gap_se
