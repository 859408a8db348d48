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

from ppl_vae import data
from ppl_vae.errors import DataError
from ppl_vae.evaluate import FLOAT_BUDGET, Evaluation, _sizes, evaluate
from ppl_vae.guides import linear_gaussian as lg_guide
from ppl_vae.guides import vae as vae_guide
from ppl_vae.models import linear_gaussian as lg_model
from ppl_vae.models import vae
from ppl_vae.networks import make_networks

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
    model, guide, _, x = digits_vae
    # A different seed per K keeps the IWAE draws of the K's independent.
    return {k: evaluate(model, guide, x, iwae_samples=k, seed=k, progress=False) for k in KS}


def test_elbo_is_reconstruction_minus_kl(evaluations):
    for ev in evaluations.values():
        assert ev.n_images == N_TEST and ev.image_dim == 64
        assert ev.elbo == pytest.approx(ev.reconstruction - ev.kl, abs=1e-9)
        assert ev.distortion == -ev.reconstruction and ev.rate == ev.kl
        assert ev.elbo_per_image.shape == ev.iwae_per_image.shape == (N_TEST,)
        assert float(ev.elbo_per_image.mean()) == pytest.approx(ev.elbo, abs=1e-9)
        # The KL is closed-form, so it equals the sum of the per-dimension KLs of the encoder.
        assert ev.z_dim == len(ev.kl_per_dim) == 4
        assert sum(ev.kl_per_dim) == pytest.approx(ev.kl, rel=1e-5, abs=1e-6)
        assert 0 <= ev.active_units <= 4
        assert ev.iwae_k in KS and ev.elbo_particles == 1
        assert ev.seconds > 0 and ev.device == "cpu"


def test_iwae_is_at_least_the_elbo(evaluations):
    # E[IWAE_K - ELBO] >= 0; one-sided, 4 s.e. of the per-image paired differences.
    for k in (10, 100):
        ev = evaluations[k]
        diff = ev.iwae_per_image - ev.elbo_per_image
        assert ev.gap_elbo_iwae == pytest.approx(float(diff.mean()), abs=1e-9)
        assert ev.gap_se == pytest.approx(float(diff.std()) / math.sqrt(N_TEST), rel=1e-6)
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
    assert ev.bits_per_dim_elbo == -ev.elbo / (64 * math.log(2))
    assert ev.bits_per_dim_iwae == -ev.iwae / (64 * math.log(2))
    assert ev.bits_per_dim_iwae <= ev.bits_per_dim_elbo + 4 * ev.gap_se / (64 * math.log(2))
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


def test_default_sizes_keep_memory_bounded():
    for n, d, k, particles in ((10000, 784, 5000, 1), (1000, 64, 1000, 10), (3, 784, 1, 1)):
        elbo_batch, iwae_batch, chunk = _sizes(n, d, k, particles, None, None)
        assert 1 <= iwae_batch <= n and 1 <= elbo_batch <= n and 1 <= chunk <= k
        assert chunk * iwae_batch * d <= FLOAT_BUDGET or iwae_batch == 1
        assert particles * elbo_batch * d <= FLOAT_BUDGET
    assert _sizes(100, 784, 5000, 1, 10, None) == (10, 10, 4279)


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

    # IWAE_1000 is below log p(x) (one-sided, 4 s.e.) and has closed most of the gap.
    gap = exact - ev.iwae_per_image
    se = float(gap.std()) / math.sqrt(N)
    assert float(gap.mean()) > -4 * se
    assert float(gap.mean()) < 0.05 * float(kl.mean()) + 4 * se, (float(gap.mean()), se)
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
