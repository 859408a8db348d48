"""check_pair on pairs it has never seen, and the clear errors for pairs that do not line up."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import constraints

from ppl_vae import check_pair, elbo_ledger, enumerate_joint, exact_log_evidence
from ppl_vae.errors import ModelGuideMismatchError, NotEnumerableError

# --- A chain of dependent discrete sites: a (Categorical, global) -> z_i (Bernoulli, per datum)
# --- -> x_i (Normal observation), with the guide's z_i depending on a and x_i.


def chain_model(x, beta=1.0):
    weights = torch.tensor([0.2, 0.5, 0.3])
    with poutine.scale(scale=beta):
        a = pyro.sample("a", dist.Categorical(weights))
    with pyro.plate("data", x.shape[0]):
        with poutine.scale(scale=beta):
            z = pyro.sample("z", dist.Bernoulli(torch.tensor([0.1, 0.5, 0.9])[a.long()]))
        loc = torch.tensor([-1.0, 1.5])[z.long()]
        pyro.sample("x", dist.Normal(loc, 0.8), obs=x)


def chain_guide(x, beta=1.0):
    probs_a = pyro.param("probs_a", torch.tensor([0.3, 0.3, 0.4]), constraint=constraints.simplex)
    table = pyro.param("table", torch.tensor([0.3, 0.6, 0.7]), constraint=constraints.unit_interval)
    slope = pyro.param("slope", torch.tensor(0.8))
    with poutine.scale(scale=beta):
        a = pyro.sample("a", dist.Categorical(probs_a))
    with pyro.plate("data", x.shape[0]):
        logits = torch.logit(table[a.long()]) + slope * x
        with poutine.scale(scale=beta):
            pyro.sample("z", dist.Bernoulli(logits=logits))


X = torch.tensor([-1.2, 0.3, 2.0, 1.1])


def test_dependent_categorical_and_bernoulli_sites():
    report = check_pair(chain_model, chain_guide, X, num_particles=4000)
    assert report.exact
    # Two latent sites with their own KL terms, adding up to the total KL.
    ledger = report.ledger
    assert {t.site for t in ledger.terms if t.kind == "kl"} == {"a", "z"}
    assert ledger.term("a").value + ledger.term("z").value == pytest.approx(report.kl, abs=1e-6)
    # The gap identity against the brute-force posterior over 3 * 2^4 configurations.
    assert "48 configurations" in report.estimators["kl_to_posterior"]
    assert report.gap > 0.01
    assert report.gap_minus_kl == pytest.approx(0.0, abs=1e-5)
    # The sampled Trace_ELBO agrees with the exact value: |z| < 4 fails with p < 1e-4.
    assert abs(report.z_score) < 4


def test_kl_terms_of_a_dependent_pair_match_brute_force():
    # Per-site KL terms are expected conditional KLs, summed here over all 3 x 2^4 values of
    # (a, z_1..z_4) with the numbers of chain_model and chain_guide written out:
    #   KL_a = E_q[log q(a) - log p(a)],
    #   KL_z = E_q(a)[sum_i E_q(z_i | a)[log q(z_i | a, x_i) - log p(z_i | a)]].
    prior_a, prior_z = [0.2, 0.5, 0.3], [0.1, 0.5, 0.9]
    q_a, table, slope = [0.3, 0.3, 0.4], [0.3, 0.6, 0.7], 0.8
    x = X.tolist()
    kl_a = kl_z = elbo = 0.0
    log_px_terms = []
    for a, *z in itertools.product(range(3), *[(0, 1)] * len(x)):
        q_z = []
        for xi in x:
            logit = math.log(table[a] / (1 - table[a])) + slope * xi
            q_z.append(1 / (1 + math.exp(-logit)))
        log_q_a = math.log(q_a[a])
        log_q_z = [math.log(qi if zi else 1 - qi) for qi, zi in zip(q_z, z, strict=True)]
        log_p_z = [math.log(prior_z[a] if zi else 1 - prior_z[a]) for zi in z]
        log_lik = sum(
            -0.5 * ((xi - (1.5 if zi else -1.0)) / 0.8) ** 2
            - math.log(0.8 * math.sqrt(2 * math.pi))
            for xi, zi in zip(x, z, strict=True)
        )
        weight = math.exp(log_q_a + sum(log_q_z))  # q(a, z)
        kl_a += weight * (log_q_a - math.log(prior_a[a]))
        kl_z += weight * (sum(log_q_z) - sum(log_p_z))
        log_joint = math.log(prior_a[a]) + sum(log_p_z) + log_lik
        elbo += weight * (log_joint - log_q_a - sum(log_q_z))
        log_px_terms.append(log_joint)
    top = max(log_px_terms)
    log_px = top + math.log(sum(math.exp(v - top) for v in log_px_terms))
    assert len(log_px_terms) == 48

    ledger = elbo_ledger(chain_model, chain_guide, X)
    store = pyro.get_param_store()
    assert store["probs_a"].tolist() == pytest.approx(q_a)  # the guide's values, unchanged
    assert store["table"].tolist() == pytest.approx(table)
    assert store["slope"].item() == pytest.approx(slope)
    # float32 sums of 48 terms of order 1: 1e-5.
    assert ledger.term("a").value == pytest.approx(kl_a, abs=1e-5)
    assert ledger.term("z").value == pytest.approx(kl_z, abs=1e-5)
    assert kl_a > 0.01 and kl_z > 0.01  # both terms are non-trivial
    assert ledger.kl == pytest.approx(kl_a + kl_z, abs=1e-5)
    assert ledger.elbo == pytest.approx(elbo, abs=1e-5)
    assert ledger.reconstruction == pytest.approx(elbo + kl_a + kl_z, abs=1e-5)
    table_ = enumerate_joint(chain_model, chain_guide, X)
    assert table_.elbo() == pytest.approx(elbo, abs=1e-5)
    assert exact_log_evidence(chain_model, X) == pytest.approx(log_px, abs=1e-5)


@pytest.mark.parametrize("beta", [0.5, 4.0])
def test_beta_scales_every_kl_term(beta):
    plain = elbo_ledger(chain_model, chain_guide, X)
    scaled = elbo_ledger(chain_model, chain_guide, X, beta=beta)
    for site in ("a", "z"):
        assert scaled.term(site).value == pytest.approx(beta * plain.term(site).value, abs=1e-6)
    assert scaled.reconstruction == pytest.approx(plain.reconstruction, abs=1e-6)


def test_report_prints_as_a_table():
    text = str(check_pair(chain_model, chain_guide, X, num_particles=100))
    for label in ("ELBO (exact)", "log p(x)", "KL(q(z|x) || p(z|x))", "z-score", "nats"):
        assert label in text


def test_too_many_configurations_is_reported_not_hidden():
    # The posterior factorises over 'data' given 'a'; the cap binds on 'a''s 3 values, the
    # truly joint part, and the message names it.
    report = check_pair(chain_model, chain_guide, X, num_particles=100, max_configurations=2)
    assert math.isnan(report.kl_to_posterior)
    assert "not checked" in report.estimators["kl_to_posterior"]
    assert "the sites 'a' take 3" in report.estimators["kl_to_posterior"]


# --- Pairs that do not line up.


def _model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _guide_extra_site(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("w", dist.Bernoulli(0.5))


def _guide_observes(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)


def _guide_missing_site(x):
    pass


def _continuous_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _continuous_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.5 * x, 0.7))


def test_guide_site_the_model_lacks():
    with pytest.raises(ModelGuideMismatchError, match="samples site 'w', which the model lacks"):
        check_pair(_model, _guide_extra_site, X)


def test_observed_site_in_guide():
    with pytest.raises(ModelGuideMismatchError, match="site 'x' is observed in the guide"):
        check_pair(_model, _guide_observes, X)


def test_model_latent_without_guide_site():
    # A continuous site cannot be summed out in the model: it needs a guide site. (A discrete
    # one is summed out: tests/test_check_trust.py checks that case.)
    with pytest.raises(ModelGuideMismatchError, match=r"latent site\(s\) \['z'\] have no guide"):
        elbo_ledger(_continuous_model, _guide_missing_site, X)


def test_exact_values_of_a_continuous_pair():
    with pytest.raises(NotEnumerableError, match="site 'z' is a Normal"):
        elbo_ledger(_continuous_model, _continuous_guide, X, exact=True)
    with pytest.raises(NotEnumerableError, match="site 'z' is a Normal"):
        exact_log_evidence(_continuous_model, X)
    with pytest.raises(NotEnumerableError, match="site 'z' is a Normal"):
        enumerate_joint(_continuous_model, _continuous_guide, X)


def test_continuous_report_names_its_estimators():
    report = check_pair(
        _continuous_model, _continuous_guide, X, num_particles=500, iwae_samples=200
    )
    assert not report.exact
    assert "IWAE bound, K=200" in report.estimators["log_evidence"]
    assert "not exact" in report.estimators["exact_elbo"]
    assert math.isnan(report.kl_to_posterior)
    assert "(lower bound)" in str(report)
