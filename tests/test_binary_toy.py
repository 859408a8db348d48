"""The worked example, reproduced by the code: exact ELBO terms, the gap identity, beta, SVI."""

import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.optim import Adam

from ppl_vae import check_pair, elbo_ledger, enumerate_joint, exact_log_evidence
from ppl_vae.errors import DataError
from ppl_vae.guides import binary_toy as toy_guide
from ppl_vae.models import binary_toy as toy_model

X1 = torch.tensor(1.0)


def test_worked_example_against_closed_form():
    # The README's worked example, by independent arithmetic from its three inputs: prior
    # p(z=1) = 0.5, p(x=1 | z) = 0.2 (z=0) and 0.8 (z=1), q(z=1 | x=1) = 0.7. The README rounds
    # these to: reconstruction -0.6390, KL 0.0823, ELBO -0.7213, log p(x=1) -0.6931, gap 0.0282.
    toy_guide.initialise(q_given_x1=0.7)
    prior, lik, q = 0.5, (0.2, 0.8), 0.7
    recon = q * math.log(lik[1]) + (1 - q) * math.log(lik[0])
    kl = q * math.log(q / prior) + (1 - q) * math.log((1 - q) / (1 - prior))
    log_px = math.log(prior * lik[1] + (1 - prior) * lik[0])
    post = prior * lik[1] / math.exp(log_px)  # Bayes: p(z=1 | x=1) = 0.8
    kl_post = q * math.log(q / post) + (1 - q) * math.log((1 - q) / (1 - post))
    elbo = recon - kl
    # float32 arithmetic on numbers of order 1: 1e-6 is some 16 rounding units.
    ledger = elbo_ledger(toy_model.model, toy_guide.guide, X1)
    assert ledger.exact
    assert ledger.reconstruction == pytest.approx(recon, abs=1e-6)
    assert ledger.kl == pytest.approx(kl, abs=1e-6)
    assert ledger.elbo == pytest.approx(elbo, abs=1e-6)
    assert exact_log_evidence(toy_model.model, X1) == pytest.approx(log_px, abs=1e-6)
    report = check_pair(toy_model.model, toy_guide.guide, X1, num_particles=2000)
    assert report.reconstruction == pytest.approx(recon, abs=1e-6)
    assert report.kl == pytest.approx(kl, abs=1e-6)
    assert report.exact_elbo == pytest.approx(elbo, abs=1e-6)
    assert report.log_evidence == pytest.approx(log_px, abs=1e-6)
    assert report.gap == pytest.approx(log_px - elbo, abs=1e-6)
    assert report.kl_to_posterior == pytest.approx(kl_post, abs=1e-6)
    assert abs(report.gap_minus_kl) < 1e-6


def test_true_posterior_makes_the_bound_tight_with_zero_variance():
    toy_guide.initialise(q_given_x1=0.8, q_given_x0=0.2)
    x = torch.tensor([1.0, 0.0, 1.0])
    report = check_pair(toy_model.model, toy_guide.guide, x, num_particles=500)
    assert report.exact_elbo == pytest.approx(report.log_evidence, abs=1e-6)
    assert report.gap == pytest.approx(0.0, abs=1e-6)
    # Every particle gives log p(x): the spread is float32 rounding only.
    assert report.sampled_stderr < 1e-6
    assert report.sampled_elbo == pytest.approx(report.log_evidence, abs=1e-5)
    assert report.z_score == 0.0


def test_true_posterior_formula_matches_bayes():
    assert toy_model.true_posterior(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([0.2, 0.8])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_elbo_agrees_with_exact(seed):
    # Trace_ELBO's estimate is a mean of N i.i.d. particles: |sampled - exact| < 4 standard
    # errors fails with probability < 1e-4 per seed (normal approximation, N = 4000).
    pyro.set_rng_seed(seed)
    x = torch.tensor([1.0, 0.0, 1.0, 1.0])
    report = check_pair(toy_model.model, toy_guide.guide, x, num_particles=4000)
    assert report.sampled_stderr > 0
    assert abs(report.z_score) < 4


def test_our_sampled_estimate_is_trace_elbo():
    # Same seed, same vectorised particle plate: identical draws, identical estimate.
    x = torch.tensor([1.0, 0.0, 1.0])
    pyro.set_rng_seed(3)
    ours = elbo_ledger(
        toy_model.model, toy_guide.guide, x, exact=False, num_particles=300, analytic_kl=False
    ).elbo
    pyro.set_rng_seed(3)
    elbo = Trace_ELBO(num_particles=300, vectorize_particles=True, max_plate_nesting=1)
    assert ours == pytest.approx(-elbo.loss(toy_model.model, toy_guide.guide, x), abs=1e-5)


def test_exact_ledger_sums_to_traceenum_loss():
    x = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    ledger = elbo_ledger(toy_model.model, toy_guide.guide, x)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(
        toy_model.model, config_enumerate(toy_guide.guide), x
    )
    assert ledger.elbo == pytest.approx(-loss, abs=1e-5)
    assert ledger.reconstruction - ledger.kl == pytest.approx(ledger.elbo, abs=1e-6)


def test_brute_force_table_agrees_with_enumeration():
    x = torch.tensor([1.0, 0.0, 1.0])
    table = enumerate_joint(toy_model.model, toy_guide.guide, x)
    assert table.num_configurations == 2**3
    assert table.log_evidence == pytest.approx(exact_log_evidence(toy_model.model, x), abs=1e-5)
    assert table.elbo() == pytest.approx(
        elbo_ledger(toy_model.model, toy_guide.guide, x).elbo, abs=1e-5
    )


@pytest.mark.parametrize("beta", [0.5, 1.0, 4.0])
def test_beta_multiplies_exactly_the_kl(beta):
    x = torch.tensor([1.0, 0.0, 1.0])
    plain = elbo_ledger(toy_model.model, toy_guide.guide, x)
    scaled = elbo_ledger(toy_model.model, toy_guide.guide, x, beta=beta)
    assert scaled.reconstruction == pytest.approx(plain.reconstruction, abs=1e-6)
    assert scaled.kl == pytest.approx(beta * plain.kl, abs=1e-6)
    # Pyro's own objective agrees: -loss = reconstruction - beta * KL.
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(
        toy_model.model, config_enumerate(toy_guide.guide), x, beta=beta
    )
    assert -loss == pytest.approx(plain.reconstruction - beta * plain.kl, abs=1e-5)


def _gradient(elbo, x, guide=toy_guide.guide):
    toy_guide.initialise(q_given_x1=0.7, q_given_x0=0.4)
    elbo.loss_and_grads(toy_model.model, guide, x)
    unconstrained = pyro.get_param_store().get_param(toy_guide.PARAM_NAME).unconstrained()
    return unconstrained.grad.clone()


def test_sampled_gradients_agree_with_exact():
    # 30 independent Trace_ELBO gradient estimates of 2000 particles each: their mean lies
    # within 4 standard errors (s.d. across repeats / sqrt(30)) of the exact gradient.
    x = torch.tensor([1.0, 0.0, 1.0])
    exact = _gradient(TraceEnum_ELBO(max_plate_nesting=1), x, config_enumerate(toy_guide.guide))
    sampled = torch.stack(
        [
            _gradient(
                Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1), x
            )
            for _ in range(30)
        ]
    )
    stderr = sampled.std(0) / math.sqrt(sampled.shape[0])
    assert (stderr > 0).all()
    assert ((sampled.mean(0) - exact).abs() < 4 * stderr).all(), (sampled.mean(0), exact, stderr)


def test_svi_recovers_the_true_posterior():
    x = torch.cat([torch.ones(50), torch.zeros(50)])
    toy_guide.initialise(q_given_x1=0.5, q_given_x0=0.5)
    svi = SVI(
        toy_model.model,
        config_enumerate(toy_guide.guide),
        Adam({"lr": 0.05}),
        TraceEnum_ELBO(max_plate_nesting=1),
    )
    # TraceEnum_ELBO's gradient is exact (no Monte Carlo error), so Adam settles on the
    # optimum q(z=1 | x) = p(z=1 | x) up to float32 rounding (reached by step ~300: 400 steps).
    for _ in range(400):
        svi.step(x)
    table = pyro.param(toy_guide.PARAM_NAME).detach()
    # Bayes from the model's numbers: p(z=1 | x) = 0.5 p(x | z=1) / p(x).
    posterior = [0.5 * 0.2 / (0.5 * 0.2 + 0.5 * 0.8), 0.5 * 0.8 / (0.5 * 0.8 + 0.5 * 0.2)]
    # 1e-6: some 16 float32 rounding units of 0.8 (2^-24 relative), far below 1e-3 misses.
    assert table.tolist() == pytest.approx(posterior, abs=1e-6)


def test_non_binary_data_is_refused():
    with pytest.raises(DataError, match="must be 0 or 1"):
        elbo_ledger(toy_model.model, toy_guide.guide, torch.tensor([0.5]))
