"""Learned priors (VAEConfig.prior = "mog:K" / "vamp:K"): their densities against brute-force
mixtures written here, the trace-free IWAE weights against Pyro's traces, ELBO surgery against
the closed form, and a VampPrior VAE trained, evaluated and reported end to end on digits."""

import functools
import json
import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from ppl_vae.data import datasets as data
from ppl_vae.errors import DataError
from ppl_vae.guides import vae as vae_guide
from ppl_vae.models import vae as vae_model
from ppl_vae.runs import evaluate_run, train_run, write_report
from ppl_vae.training import TrainConfig, fit
from ppl_vae.vae import (
    M2Config,
    MixturePrior,
    VAEConfig,
    VampPrior,
    build_m2,
    build_vae,
    elbo_surgery,
    make_networks,
    parse_prior,
    vae_log_weights,
)
from ppl_vae.vae.priors import DiagonalGaussianMixture

Z = 3


def _normal_log_pdf(z, loc, scale):
    """sum_d log N(z_d; loc_d, scale_d^2), numpy, float64."""
    return np.sum(-0.5 * ((z - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi), -1)


def _brute_force_mixture(z, weights, locs, scales):
    """log sum_k w_k N(z; loc_k, diag(scale_k^2)), one component at a time."""
    total = np.zeros(z.shape[0])
    for w, loc, scale in zip(weights, locs, scales, strict=True):
        total += w * np.exp(_normal_log_pdf(z, loc, scale))
    return np.log(total)


def test_mixture_prior_density_is_the_mixture():
    torch.manual_seed(0)
    prior = MixturePrior(Z, 4)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.3, -1.0, 0.0, 2.0]))
        prior.log_scale.copy_(0.3 * torch.randn(4, Z))
    z = torch.randn(50, Z)
    got = prior.distribution().log_prob(z).detach().double().numpy()
    w = np.exp([0.3, -1.0, 0.0, 2.0]) / np.exp([0.3, -1.0, 0.0, 2.0]).sum()
    locs = prior.loc.detach().double().numpy()
    scales = prior.log_scale.detach().exp().double().numpy()
    np.testing.assert_allclose(
        got, _brute_force_mixture(z.double().numpy(), w, locs, scales), rtol=1e-5
    )


def test_vamp_prior_is_the_mixture_of_the_encoders_posteriors():
    """p(z) = (1/K) sum_k q(z | u_k), u_k = sigmoid(w_k): the encoder run here on the pseudo
    inputs, the K Gaussian densities summed by hand."""
    torch.manual_seed(0)
    encoder, _ = make_networks(10, Z, [8])
    prior = VampPrior(10, Z, 5)
    with torch.no_grad():
        prior.pseudo_logits.copy_(torch.randn(5, 10))  # five distinct pseudo-inputs
        u = 1 / (1 + torch.exp(-prior.pseudo_logits))
        mu, log_var = encoder(u)
    z = 2 * torch.randn(40, Z)
    got = prior.distribution(encoder).log_prob(z).detach().double().numpy()
    want = _brute_force_mixture(
        z.double().numpy(),
        np.full(5, 0.2),
        mu.double().numpy(),
        np.exp(0.5 * log_var.double().numpy()),
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="pass the encoder"):
        prior.distribution()


def test_the_mixture_log_density_by_matrix_products_is_the_mixture_where_floats_cancel():
    """Far from the origin with narrow components, (z - m)^2 / s^2 computed as z^2 p - 2 z m p
    + m^2 p cancels by ~1e4: in float64 it still gives the brute-force mixture to 1e-9 nats,
    broadcast by a Pyro plate as when the model samples z, and its gradient is torch's."""
    gen = torch.Generator().manual_seed(3)
    k, d = 6, 4
    loc = 30 + torch.randn(k, d, generator=gen, dtype=torch.float64)
    scale = 0.05 + 0.1 * torch.rand(k, d, generator=gen, dtype=torch.float64)
    logits = torch.randn(k, generator=gen, dtype=torch.float64)
    z = loc[torch.randint(k, (20,), generator=gen)] + 0.1 * torch.randn(20, d, generator=gen)
    mixture = DiagonalGaussianMixture(
        pyro.distributions.Categorical(logits=logits),
        pyro.distributions.Normal(loc, scale).to_event(1),
    )
    weights = torch.softmax(logits, -1).numpy()
    want = _brute_force_mixture(z.numpy(), weights, loc.numpy(), scale.numpy())
    np.testing.assert_allclose(mixture.log_prob(z).numpy(), want, rtol=0, atol=1e-9)
    expanded = mixture.expand(torch.Size([20]))  # what pyro.plate("data", 20) makes of it
    np.testing.assert_allclose(expanded.log_prob(z).numpy(), want, rtol=0, atol=1e-9)
    torch_mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1),
    )
    zz = z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(mixture.log_prob(zz).sum(), zz)
    (want_grad,) = torch.autograd.grad(torch_mixture.log_prob(zz).sum(), zz)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spec", ["mog:3", "vamp:4"])
def test_trace_free_log_weights_are_pyros_under_a_learned_prior(spec):
    """vae_log_weights with a learned prior = log p(x, z) - log q(z | x) from Pyro's own
    traces of the bound pair at the same z (the guide's draw, the model replayed on it): the
    same numbers by another route, to float32 rounding of ~40-nat sums."""
    torch.manual_seed(1)
    vae = build_vae(
        VAEConfig(dataset="digits", z_dim=Z, hidden=(16,), image_shape=(1, 8, 8), prior=spec)
    )
    x = (torch.rand(6, 64) < 0.3).float()
    with torch.no_grad():
        guide = poutine.trace(vae.guide).get_trace(x)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
        log_p = sum(model.nodes[n]["fn"].log_prob(model.nodes[n]["value"]) for n in ("z", "x"))
        z = guide.nodes["z"]["value"]
        log_q = guide.nodes["z"]["fn"].log_prob(z)
        mu, log_var = vae.encoder(x)
        eps = ((z - mu) / (0.5 * log_var).exp())[None]  # the noise that gives Pyro's z
        fast = vae_log_weights(vae.encoder, vae.decoder, x, eps, prior=vae.prior_distribution())[0]
    torch.testing.assert_close(fast, log_p - log_q, atol=1e-4, rtol=1e-6)


def test_elbo_surgery_with_a_prior_samples_what_the_closed_form_gives():
    """Passing N(0, I) itself as a learned prior: the sampled rate and KL(q(z) || p(z)) agree
    with the closed-form path within 4 standard errors (per image, over 300 images and 20
    draws each; the mutual information is the same estimate in both)."""
    torch.manual_seed(2)
    mu, log_var = torch.randn(300, Z), 0.5 * torch.randn(300, Z) - 1.0
    closed = elbo_surgery(mu, log_var, num_samples=20, seed=3)
    standard = torch.distributions.Normal(torch.zeros(Z), 1.0)
    sampled = elbo_surgery(
        mu, log_var, num_samples=20, seed=3, prior=torch.distributions.Independent(standard, 1)
    )
    assert sampled.sampled_kl and not closed.sampled_kl
    assert sampled.mutual_info == pytest.approx(closed.mutual_info, rel=1e-12)
    assert abs(sampled.marginal_kl - closed.marginal_kl) < 4 * sampled.marginal_kl_se
    assert sampled.avg_kl == pytest.approx(sampled.mutual_info + sampled.marginal_kl)
    assert "sampled" in str(sampled) and "closed form" in str(closed)


def test_prior_settings_are_checked():
    assert parse_prior("vamp:500") == ("vamp", 500)
    for bad in ("vamp", "mog:0", "gmm:3", "vamp:x"):
        with pytest.raises(ValueError, match="unknown prior"):
            VAEConfig(prior=bad)
    # A configuration saved before the setting existed reads, and writes, as it was.
    assert "prior" not in VAEConfig().to_dict()
    assert VAEConfig.from_dict(VAEConfig().to_dict()).prior == "normal"
    assert VAEConfig(prior="mog:3").to_dict()["prior"] == "mog:3"
    with pytest.raises(DataError, match="--prior vamp:5 is for --model vae"):
        build_m2(
            VAEConfig(dataset="digits", image_shape=(1, 8, 8), prior="vamp:5"),
            M2Config(labels=10),
            10,
            100,
        )


@pytest.fixture(scope="module")
def vamp_run(tmp_path_factory):
    """A VampPrior VAE on digits, 6 epochs, through the run folder a user writes."""
    out = tmp_path_factory.mktemp("vamp")
    pyro.clear_param_store()
    vae = VAEConfig(dataset="digits", z_dim=4, hidden=(64,), prior="vamp:10")
    train = TrainConfig(epochs=6, batch_size=64, lr=3e-3, progress=False, device="cpu", threads=1)
    return train_run(out, vae, train)


def test_a_vamp_prior_run_trains_evaluates_and_reports(vamp_run):
    history = vamp_run.history
    assert history[-1]["val_elbo"] > history[0]["val_elbo"] + 1.0  # measured: +5 nats
    config = json.loads((vamp_run.path / "config.json").read_text())
    assert config["vae"]["prior"] == "vamp:10"
    result = evaluate_run(vamp_run.path, iwae_samples=50, limit=100, progress=False)
    assert result.kl_sampled and result.kl_per_dim is None
    assert "KL(q(z|x) || p(z)) (sampled)" in str(result)
    # The IWAE bound sits above the ELBO (paired over the same images).
    assert result.gap_elbo_iwae > 0
    index = write_report(vamp_run.path, iwae_images=20, iwae_k=20, latent_images=100)
    page = index.read_text()
    assert "sampled (learned prior)" in page and "VampPrior(10)" in page
    assert "sampled (no closed form for the prior)" in page
    assert (index.parent / "latent_space.png").exists()
    assert not (index.parent / "gaussian_kl.png").exists()  # the N(0, 1) map does not apply


def test_a_learned_prior_is_trained_with_the_pseudo_inputs(vamp_run):
    """The pseudo-inputs moved from their start (they are in the optimiser), and a resumed
    load restores them: the loaded run's prior is the trained one."""
    from ppl_vae.runs import load_run

    loaded = load_run(vamp_run.path, checkpoint="last")
    trained = vamp_run.vae.prior.pseudo_logits.detach()
    assert float(trained.abs().max()) > 0.05  # started within ~4 x 0.01 of zero
    torch.testing.assert_close(loaded.vae.prior.pseudo_logits.detach(), trained, rtol=0, atol=0)


def test_the_mixture_prior_trains_through_fit():
    """fit on the bound pair with a MoG prior: the prior's parameters get gradients and move,
    and the validation KL (sampled) is a finite positive number."""
    dataset = data.load("digits", binarize="static")
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    encoder, decoder = make_networks(dataset.data_dim, Z, [32])
    prior = MixturePrior(Z, 3)
    start = prior.loc.detach().clone()
    model = functools.partial(vae_model.model, decoder=decoder, prior=prior, encoder=encoder)
    guide = functools.partial(vae_guide.guide, encoder=encoder)
    config = TrainConfig(epochs=2, batch_size=64, lr=1e-2, progress=False, device="cpu")
    history = fit(
        model,
        guide,
        dataset.train.images,
        validation=dataset.validation.images,
        config=config,
        modules={"encoder": encoder, "decoder": decoder, "prior": prior},
    )
    assert not torch.equal(prior.loc.detach(), start)
    assert all(math.isfinite(r["val_kl"]) and r["val_kl"] > 0 for r in history)


def test_resume_takes_the_defaults_of_settings_a_run_predates(tmp_path):
    """A run folder written before --prior / --objective existed (its config.json lacks them)
    resumes when those are asked for at their defaults, what it ran with; another value is
    a named difference."""
    from ppl_vae.errors import ConfigMismatchError
    from ppl_vae.runs import resume_run

    pyro.clear_param_store()
    vae = VAEConfig(dataset="digits", z_dim=2, hidden=(16,))
    train = TrainConfig(epochs=1, batch_size=128, progress=False, device="cpu", threads=1)
    run = train_run(tmp_path, vae, train)
    config = json.loads((run.path / "config.json").read_text())
    for key in ("objective", "patience"):
        del config["train"][key]
    assert "prior" not in config["vae"]
    (run.path / "config.json").write_text(json.dumps(config))
    defaults = {"vae": {"prior": "normal"}, "train": {"objective": "elbo"}}
    assert len(resume_run(run.path, expect=defaults).history) == 1
    with pytest.raises(ConfigMismatchError, match=r"vae\.prior: saved 'normal', asked 'vamp:3'"):
        resume_run(run.path, expect={"vae": {"prior": "vamp:3"}})
