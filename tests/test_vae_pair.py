"""The Gaussian VAE model/guide pair: network shapes, ELBOs, beta, data checks, generation."""

from __future__ import annotations

import functools
import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from torch.distributions import Normal, kl_divergence

from ppl_vae.errors import DataError
from ppl_vae.guides import vae as vae_guide
from ppl_vae.models import vae
from ppl_vae.vae import ConvDecoder, ConvEncoder, Decoder, Encoder, GatedLinear, make_networks

Z_DIM = 3
LIKELIHOODS = ["bernoulli", "gaussian", "continuous-bernoulli"]


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _data(likelihood: str, n: int = 6, x_dim: int = 64) -> torch.Tensor:
    x = torch.rand(n, x_dim)
    return (x > 0.5).float() if likelihood == "bernoulli" else x


def _pair(likelihood: str, x_dim: int = 64, **kwargs):
    """(model, guide, encoder, decoder) with the networks bound by functools.partial."""
    learn_sigma = "pixel" if likelihood == "gaussian" else None
    enc, dec = make_networks(x_dim, Z_DIM, [16], likelihood, learn_sigma=learn_sigma, **kwargs)
    model = functools.partial(vae.model, decoder=dec, likelihood=likelihood)
    guide = functools.partial(vae_guide.guide, encoder=enc)
    return model, guide, enc, dec


# ------------------------------------------------------------------ network shapes


@pytest.mark.parametrize("arch", ["mlp", "gated", "conv"])
@pytest.mark.parametrize("image_shape", [(1, 8, 8), (1, 28, 28)])
def test_network_shapes(arch, image_shape):
    enc, dec = make_networks(image_shape, Z_DIM, [32], arch=arch)
    x_dim = image_shape[1] * image_shape[2]
    assert enc.x_dim == dec.x_dim == x_dim
    assert isinstance(enc, ConvEncoder if arch == "conv" else Encoder)
    assert isinstance(dec, ConvDecoder if arch == "conv" else Decoder)
    x = torch.rand(5, x_dim)
    mu, log_var = enc(x)
    assert mu.shape == log_var.shape == (5, Z_DIM)
    assert dec(mu).shape == (5, x_dim)
    # Leading particle dimensions pass through the decoder.
    assert dec(torch.randn(4, 5, Z_DIM)).shape == (4, 5, x_dim)


def test_gated_layers_gate_each_unit():
    """arch="gated": each hidden layer is act(W h + b) * sigmoid(V h + c). Checked on the
    units' own behaviour: a gate driven to -inf zeroes its unit whatever the input, one
    driven to +inf passes act(W h + b) alone, and the layer is the MLP's size twice over."""
    enc, dec = make_networks(64, Z_DIM, [30, 20], arch="gated", activation="tanh")
    plain, _ = make_networks(64, Z_DIM, [30, 20], activation="tanh")
    gated = [m for m in enc.modules() if isinstance(m, GatedLinear)]
    assert len(gated) == 2 and sum(isinstance(m, GatedLinear) for m in dec.modules()) == 2
    first = gated[0]
    linear = first.linear  # rows 0..29: W, b; rows 30..59: V, c
    with torch.no_grad():
        linear.weight[30:] = 0
        linear.bias[30:] = -1e4  # every gate shut
        x = torch.rand(7, 64)
        assert torch.equal(first(x), torch.zeros(7, 30))
        linear.bias[30:] = 1e4  # every gate open: the activation of the first half alone
        torch.testing.assert_close(
            first(x), torch.tanh(x @ linear.weight[:30].T + linear.bias[:30])
        )
    body = sum(p.numel() for p in enc.body.parameters())
    assert body == 2 * sum(p.numel() for p in plain.body.parameters())


def test_conv_odd_sizes_and_image_input():
    enc, dec = make_networks((2, 9, 7), Z_DIM, [8], arch="conv", channels=[4, 8])
    x = torch.rand(3, 2, 9, 7)
    mu, _ = enc(x)
    assert mu.shape == (3, Z_DIM)
    assert torch.equal(mu, enc(x.reshape(3, -1))[0])
    assert dec(mu).shape == (3, 2 * 9 * 7)


def test_mlp_hidden_and_activation():
    enc, dec = make_networks(64, Z_DIM, [300, 300], activation="tanh")
    assert sum(isinstance(m, torch.nn.Linear) for m in enc.modules()) == 3
    assert sum(isinstance(m, torch.nn.Tanh) for m in dec.modules()) == 2
    with pytest.raises(ValueError, match="conv"):
        make_networks(64, Z_DIM, arch="conv")
    with pytest.raises(ValueError, match="gaussian"):
        make_networks(64, Z_DIM, likelihood="bernoulli", learn_sigma="scalar")


# ------------------------------------------------------------------ ELBOs


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize(
    "elbo",
    [
        Trace_ELBO(),
        TraceMeanField_ELBO(),
        Trace_ELBO(num_particles=4, vectorize_particles=True),
        TraceMeanField_ELBO(num_particles=4, vectorize_particles=True),
    ],
    ids=["trace", "meanfield", "trace-vec4", "meanfield-vec4"],
)
def test_elbo_runs(likelihood, elbo):
    model, guide, _, _ = _pair(likelihood)
    x = _data(likelihood)
    loss = elbo.differentiable_loss(model, guide, x, beta=0.5)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_svi_step_conv(likelihood):
    model, guide, _, _ = _pair(likelihood, x_dim=(1, 8, 8), arch="conv")
    x = _data(likelihood)
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True)
    svi = SVI(model, guide, Adam({"lr": 1e-2}), elbo)
    assert all(torch.isfinite(torch.tensor(svi.step(x, beta=1.0))) for _ in range(2))


def test_vectorised_particles_match_sequential_mean():
    """The vectorised 64-particle loss and the mean of 64 one-particle losses estimate the same
    expectation. Each is a mean of 64 i.i.d. particles of s.d. sd (estimated from the
    one-particle losses), so their difference has s.e. at most sqrt(2) sd / 8 (less if the
    shared seed correlates their draws): |difference| < 4 of these fails with p < 7e-5."""
    model, guide, _, _ = _pair("bernoulli")
    x = _data("bernoulli")
    pyro.set_rng_seed(1)
    vec = Trace_ELBO(num_particles=64, vectorize_particles=True).loss(model, guide, x)
    pyro.set_rng_seed(1)
    single = torch.tensor([Trace_ELBO().loss(model, guide, x) for _ in range(64)])
    sd = float(single.std())
    assert sd > 0
    se = math.sqrt(2) * sd / math.sqrt(64)
    assert abs(vec - float(single.mean())) < 4 * se, (vec, float(single.mean()), se)


# ------------------------------------------------------------------ beta


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("beta", [0.5, 4.0])
def test_beta_multiplies_exactly_the_kl(likelihood, beta):
    model, guide, enc, dec = _pair(likelihood)
    enc.double(), dec.double()
    x = _data(likelihood).double()
    elbo = TraceMeanField_ELBO()

    def loss(b):
        pyro.set_rng_seed(7)
        return elbo.differentiable_loss(model, guide, x, beta=b).detach()

    # Analytic KL from the encoder, and the reconstruction term at the same seeded sample.
    mu, log_var = enc(x)
    kl = kl_divergence(Normal(mu, (0.5 * log_var).exp()), Normal(0.0, 1.0)).sum().detach()
    pyro.set_rng_seed(7)
    z = pyro.poutine.trace(guide).get_trace(x, beta=beta).nodes["z"]["value"]
    recon = vae.observation(dec, z, likelihood).log_prob(x).sum().detach()

    torch.testing.assert_close(loss(beta), -(recon - beta * kl))
    torch.testing.assert_close(loss(beta) - loss(1.0), (beta - 1.0) * kl)


# ------------------------------------------------------------------ data checks


def test_non_binary_data_names_the_fix():
    model, guide, _, _ = _pair("bernoulli")
    x = torch.rand(6, 64)
    with pytest.raises(DataError, match=r"binar.*--binarize static\|dynamic.*continuous-bernoulli"):
        Trace_ELBO().loss(model, guide, x)
    # The same data are fine for the [0, 1] likelihoods.
    for lik in ["continuous-bernoulli", "gaussian"]:
        m, g, _, _ = _pair(lik)
        assert torch.isfinite(torch.tensor(Trace_ELBO().loss(m, g, x)))


def test_out_of_range_continuous_bernoulli():
    model, guide, _, _ = _pair("continuous-bernoulli")
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        Trace_ELBO().loss(model, guide, torch.rand(6, 64) * 255)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data(likelihood, bad):
    model, guide, _, _ = _pair(likelihood)
    x = _data(likelihood)
    x[2, 5] = bad
    with pytest.raises(DataError, match="NaN or inf"):
        Trace_ELBO().loss(model, guide, x)
    with pytest.raises(DataError, match="NaN or inf"):  # the model alone checks too
        model(x)


_EDGE_VALUES = [
    0.0,
    -0.0,
    1.0,
    0.5,
    1e-45,
    1e-38,
    1 - 2**-24,
    1 + 2**-23,
    -1e-45,
    2.0,
    -1.0,
    1e30,
    float("nan"),
    float("inf"),
    float("-inf"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_value_checks_agree_with_elementwise_definitions(dtype):
    """The one-pass checks (min/max, and sum of x (1 - x) for 0/1) accept exactly the tensors
    that the elementwise definitions accept, for every single edge value planted in 0/1 data."""
    rule = {
        "bernoulli": lambda x: bool(((x == 0) | (x == 1)).all()),
        "continuous-bernoulli": lambda x: bool(((x >= 0) & (x <= 1)).all()),
        "gaussian": lambda x: bool(torch.isfinite(x).all()),
        None: lambda x: bool(torch.isfinite(x).all()),
    }
    base = torch.bernoulli(
        torch.full((5, 7), 0.5, dtype=torch.float64), generator=torch.Generator().manual_seed(0)
    )
    for value in _EDGE_VALUES:
        x = base.clone()
        x[3, 4] = value
        x = x.to(dtype)
        for likelihood, accepts in rule.items():
            try:
                vae.check_data(x, likelihood=likelihood)
                accepted = True
            except DataError:
                accepted = False
            assert accepted == accepts(x), (value, likelihood, dtype)
    vae.check_data(base[:0].to(dtype), likelihood="bernoulli")  # no rows: nothing to reject


def test_wrong_shape_and_dtype():
    model, guide, _, _ = _pair("bernoulli")
    with pytest.raises(DataError, match=r"\(6, 63\).*\(N, 64\)"):
        Trace_ELBO().loss(model, guide, torch.zeros(6, 63))
    with pytest.raises(DataError, match=r"\(6, 63\).*\(N, 64\)"):
        model(torch.zeros(6, 63))
    with pytest.raises(DataError, match="2-D"):
        model(torch.zeros(6, 8, 8))
    with pytest.raises(DataError, match="float"):
        model(torch.zeros(6, 64, dtype=torch.long))


def test_check_data_false_skips_the_check():
    """With the check off, Pyro's own validation (left on) still rejects non-binary data."""
    model, guide, _, _ = _pair("bernoulli")
    with pytest.raises(ValueError) as info:
        Trace_ELBO().loss(model, guide, torch.rand(6, 64), check_data=False)
    assert not isinstance(info.value, DataError)


# ------------------------------------------------------------------ learned sigma


@pytest.mark.parametrize("learn_sigma", ["scalar", "pixel"])
def test_learned_sigma_is_trained(learn_sigma):
    enc, dec = make_networks(64, Z_DIM, [16], "gaussian", learn_sigma=learn_sigma)
    model = functools.partial(vae.model, decoder=dec, likelihood="gaussian")
    guide = functools.partial(vae_guide.guide, encoder=enc)
    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    svi.step(torch.rand(6, 64))
    store = pyro.get_param_store()
    assert "decoder$$$log_sigma" in store.keys()
    log_sigma = store["decoder$$$log_sigma"]
    assert log_sigma.requires_grad
    assert log_sigma.shape == ((1,) if learn_sigma == "scalar" else (64,))
    assert not torch.equal(log_sigma.detach(), torch.zeros_like(log_sigma))  # it moved


def test_gaussian_needs_a_sigma():
    enc, dec = make_networks(64, Z_DIM, [16], "gaussian")
    model = functools.partial(vae.model, decoder=dec, likelihood="gaussian")
    with pytest.raises(ValueError, match="sigma"):
        model(torch.rand(6, 64))
    fixed = functools.partial(vae.model, decoder=dec, likelihood="gaussian", sigma=0.1)
    guide = functools.partial(vae_guide.guide, encoder=enc)
    assert torch.isfinite(torch.tensor(Trace_ELBO().loss(fixed, guide, torch.rand(6, 64))))


# ------------------------------------------------------------------ generate / reconstruct


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli"])
def test_generate_and_reconstruct(arch, likelihood):
    enc, dec = make_networks((1, 8, 8), Z_DIM, [16], likelihood, arch=arch)
    images = vae.generate(dec, 5, likelihood=likelihood)
    assert images.shape == (5, 64)
    assert images.reshape(-1, *dec.image_shape).shape == (5, 1, 8, 8)
    x = _data(likelihood)
    recon = vae.reconstruct(enc, dec, x, likelihood)
    assert recon.shape == x.shape
    for out in (images, recon):
        assert not out.requires_grad
        assert ((out >= 0) & (out <= 1)).all()
