"""check_pair on the pairs users found it wrong on: subsampling, beta, many datapoints, mixed
latents, model-side enumeration, uncertainty, gradients and bad input.

Every oracle is written here: Bayes' rule and Bernoulli KLs by hand, brute-force sums over
configurations in plain Python, Gaussian expectations in closed form, quadrature. A z-score
test |z| < 4 fails by chance with probability < 1e-4 (normal) or 5e-4 (t with 24 d.o.f., the
repeats behind an enumerated-and-sampled s.e.).
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import constraints

from ppl_vae import check_pair
from ppl_vae.errors import ArgumentError, ModelGuideMismatchError, PairExecutionError

PRIOR, DECODER = 0.5, (0.2, 0.8)


def _bern_kl(q: float, p: float) -> float:
    return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))


def _toy_by_hand(x: float, q1: float) -> tuple[float, float, float]:
    """(ELBO, log p(x), KL(q || posterior)) of one binary-toy datapoint, by Bayes' rule."""
    like = [DECODER[z] if x == 1 else 1 - DECODER[z] for z in (0, 1)]
    evidence = PRIOR * like[0] + PRIOR * like[1]
    post1 = PRIOR * like[1] / evidence
    kl_post = _bern_kl(q1, post1)
    return math.log(evidence) - kl_post, math.log(evidence), kl_post


# --- 1. subsampled plates: one minibatch, unscaled, with full-data estimates beside.


def toy_model_subsampled(x, m):
    with pyro.plate("data", x.shape[0], subsample_size=m) as idx:
        z = pyro.sample("z", dist.Bernoulli(PRIOR))
        pyro.sample("x", dist.Bernoulli(torch.tensor(DECODER)[z.long()]), obs=x[idx])


def toy_guide_subsampled(x, m):
    table = pyro.param("q_table", torch.tensor([0.3, 0.7]), constraint=constraints.unit_interval)
    with pyro.plate("data", x.shape[0], subsample_size=m) as idx:
        pyro.sample("z", dist.Bernoulli(table[x[idx].long()]))


def test_subsampled_pair_reports_the_minibatch_and_the_scaled_estimate():
    # All ones: every minibatch of m = 5 is the same, so the values are known by hand.
    x = torch.ones(20)
    report = check_pair(toy_model_subsampled, toy_guide_subsampled, x, 5, num_particles=2000)
    elbo, log_px, kl = _toy_by_hand(1.0, 0.7)
    assert report.exact_elbo == pytest.approx(5 * elbo, abs=1e-5)
    assert report.log_evidence == pytest.approx(5 * log_px, abs=1e-5)
    assert report.kl_to_posterior == pytest.approx(5 * kl, abs=1e-5)
    assert report.gap_minus_kl == pytest.approx(0.0, abs=1e-5)
    assert report.full_data["elbo"][0] == pytest.approx(20 * elbo, abs=1e-4)
    assert report.full_data["log_evidence"][0] == pytest.approx(20 * log_px, abs=1e-4)
    assert abs(report.z_score) < 4
    assert "'data': 5 of 20" in str(report)


def test_random_minibatch_is_the_same_for_every_estimator():
    # Mixed data: a different minibatch per estimator gave gap - KL of 5-13 nats.
    x = torch.tensor([1.0, 0.0] * 15)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        report = check_pair(toy_model_subsampled, toy_guide_subsampled, x, 6, num_particles=1000)
        assert report.gap_minus_kl == pytest.approx(0.0, abs=1e-5)
        assert abs(report.z_score) < 4
        # p(x=0) = p(x=1) = 0.5, so log p(x) of any minibatch is 6 log 0.5; its ELBO is one
        # of the 7 sums of per-datapoint values by hand (k ones among the 6).
        assert report.log_evidence == pytest.approx(6 * math.log(0.5), abs=1e-5)
        per = {v: _toy_by_hand(v, 0.7 if v == 1 else 0.3) for v in (0.0, 1.0)}
        sums = [k * per[1.0][0] + (6 - k) * per[0.0][0] for k in range(7)]
        assert min(abs(report.exact_elbo - s) for s in sums) < 1e-5


def lg_model(x, idx, w=1.5, s=0.7):
    with pyro.plate("data", x.shape[0], subsample=idx):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(w * z, s), obs=x[idx])


def lg_guide(x, idx, w=1.5, s=0.7):
    with pyro.plate("data", x.shape[0], subsample=idx):
        pyro.sample("z", dist.Normal(0.6 * x[idx], 0.6))


def _lg_log_px(x, w=1.5, s=0.7):
    return dist.Normal(0.0, math.sqrt(w * w + s * s)).log_prob(x)


def test_iwae_bound_of_a_subsampled_pair_stays_below_log_px():
    x = torch.linspace(-2.0, 2.5, 40)
    idx = torch.tensor([3, 11, 17, 25, 38])
    report = check_pair(lg_model, lg_guide, x, idx, num_particles=500, iwae_samples=2000)
    true = float(_lg_log_px(x[idx]).sum())
    # A lower bound, and close (q is near the posterior): within 4 s.e. + 0.05 below the truth.
    se = report.log_evidence_stderr
    assert 0 < se < 0.05
    assert report.log_evidence < true + 4 * se
    assert report.log_evidence > true - 4 * se - 0.05
    assert "(lower bound)" in str(report)
    assert report.full_data["log_evidence"][0] == pytest.approx(8 * report.log_evidence)


# --- 2. beta through poutine.scale: every check on the beta = 1 pair.


def chain_model(x, beta=1.0):
    with poutine.scale(scale=beta):
        a = pyro.sample("a", dist.Categorical(torch.tensor([0.2, 0.5, 0.3])))
    with pyro.plate("data", x.shape[0]):
        with poutine.scale(scale=beta):
            z = pyro.sample("z", dist.Bernoulli(torch.tensor([0.1, 0.5, 0.9])[a.long()]))
        pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.5])[z.long()], 0.8), obs=x)


def chain_guide(x, beta=1.0):
    probs_a = pyro.param("probs_a", torch.tensor([0.3, 0.3, 0.4]), constraint=constraints.simplex)
    slope = pyro.param("slope", torch.tensor(0.8))
    with poutine.scale(scale=beta):
        a = pyro.sample("a", dist.Categorical(probs_a))
    with pyro.plate("data", x.shape[0]):
        logits = torch.tensor([-0.8, 0.4, 0.8])[a.long()] + slope * x
        with poutine.scale(scale=beta):
            pyro.sample("z", dist.Bernoulli(logits=logits))


X4 = [-1.2, 0.3, 2.0, 1.1]


def _chain_brute_force(x, beta=1.0):
    """(log p(x), ELBO, KL(q || posterior), recon, KL(q || prior)) over all 3 * 2^N configs."""
    prior_a, z_prob, locs = [0.2, 0.5, 0.3], [0.1, 0.5, 0.9], [-1.0, 1.5]
    q_a, cols = [0.3, 0.3, 0.4], [-0.8, 0.4, 0.8]
    rows = []
    for a in range(3):
        for zs in itertools.product((0, 1), repeat=len(x)):
            lp_z = math.log(prior_a[a])
            lq = math.log(q_a[a])
            lx = 0.0
            for xi, z in zip(x, zs, strict=True):
                lp_z += math.log(z_prob[a] if z else 1 - z_prob[a])
                q1 = 1 / (1 + math.exp(-(cols[a] + 0.8 * xi)))
                lq += math.log(q1 if z else 1 - q1)
                lx += -0.5 * ((xi - locs[z]) / 0.8) ** 2 - math.log(0.8 * math.sqrt(2 * math.pi))
            rows.append((lp_z, lx, lq))
    log_px = math.log(sum(math.exp(lp + lx) for lp, lx, _ in rows))
    recon = sum(math.exp(lq) * lx for _, lx, lq in rows)
    kl_prior = sum(math.exp(lq) * (lq - lp) for lp, _, lq in rows)
    kl_post = sum(math.exp(lq) * (lq - (lp + lx - log_px)) for lp, lx, lq in rows)
    return log_px, recon - kl_prior, kl_post, recon, kl_prior


@pytest.mark.parametrize("beta", [0.5, 4.0])
def test_beta_pair_is_checked_at_beta_one(beta):
    x = torch.tensor(X4)
    report = check_pair(chain_model, chain_guide, x, beta, num_particles=1000)
    log_px, elbo, kl_post, recon, kl_prior = _chain_brute_force(X4)
    assert report.exact_elbo == pytest.approx(elbo, abs=1e-4)
    assert report.log_evidence == pytest.approx(log_px, abs=1e-4)
    assert report.kl_to_posterior == pytest.approx(kl_post, abs=1e-4)
    # The pair's own objective beside it: recon - beta KL.
    assert report.objective == pytest.approx(recon - beta * kl_prior, abs=1e-4)
    assert abs(report.z_score) < 4
    assert "beta-objective" in str(report)


def test_continuous_beta_pair_log_px_is_not_scaled():
    x = torch.linspace(-2.0, 2.5, 6)

    def model(x, beta):
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=beta):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", x.shape[0]):
            pyro.sample("x", dist.Normal(1.5 * z, 0.7), obs=x)

    def guide(x, beta):
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=beta):
            pyro.sample("z", dist.Normal(0.6 * x, 0.6))

    report = check_pair(model, guide, x, 0.5, num_particles=500, iwae_samples=2000)
    true = float(_lg_log_px(x).sum())
    se = report.log_evidence_stderr
    assert true - 4 * se - 0.05 < report.log_evidence < true + 4 * se


# --- 3. many datapoints: the posterior factorises over the plate.


def toy_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(PRIOR))
        pyro.sample("x", dist.Bernoulli(torch.tensor(DECODER)[z.long()]), obs=x)


def toy_guide(x):
    table = pyro.param("q_table", torch.tensor([0.3, 0.7]), constraint=constraints.unit_interval)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(table[x.long()]))


@pytest.mark.parametrize("n", [17, 10_000])
def test_many_datapoints_get_an_exact_kl(n):
    x = (torch.arange(n) % 3 == 0).float()
    report = check_pair(toy_model, toy_guide, x, num_particles=200)
    ones = int(x.sum())
    expected = ones * _toy_by_hand(1.0, 0.7)[2] + (n - ones) * _toy_by_hand(0.0, 0.3)[2]
    assert report.kl_to_posterior == pytest.approx(expected, rel=1e-5)
    # log p(x) and the ELBO are float32 sums of n terms: pairwise summation errs by about
    # log2(n) eps relative per stage; 4 stages' worth bounds gap - KL (the report says so too).
    rounding = 4 * math.log2(n) * 2**-24 * (abs(report.log_evidence) + abs(report.exact_elbo))
    assert report.gap_minus_kl == pytest.approx(0.0, abs=max(1e-5, rounding))
    assert report.rounding >= rounding


# --- 4. mixed pairs: discrete sites enumerated, continuous ones sampled.


def mixed_model(x):
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Bernoulli(0.4))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z + 2 * y, 1.0), obs=x)


def mixed_guide(x):
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Bernoulli(torch.sigmoid(x)))
        pyro.sample("z", dist.Normal(0.5 * x - y, 0.8))


def _mixed_elbo_closed_form(x: list[float]) -> float:
    total, s = 0.0, 0.8
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    for xi in x:
        q1 = 1 / (1 + math.exp(-xi))
        for y, qy in ((0, 1 - q1), (1, q1)):
            m = 0.5 * xi - y
            log_py = math.log(0.4 if y else 0.6)
            e_log_pz = -half_log_2pi - 0.5 * (m * m + s * s)
            e_log_px = -half_log_2pi - 0.5 * ((xi - 2 * y - m) ** 2 + s * s)
            entropy = 0.5 * math.log(2 * math.pi * s * s) + 0.5
            total += qy * (log_py - math.log(qy) + e_log_pz + e_log_px + entropy)
    return total


def test_mixed_pair_enumerates_the_discrete_site():
    x = [0.3, 1.5, -0.7]
    report = check_pair(mixed_model, mixed_guide, torch.tensor(x), num_particles=2000)
    exact = _mixed_elbo_closed_form(x)
    assert "enumerated over ['y'], sampled over ['z']" in report.estimators["exact_elbo"]
    assert abs(report.exact_elbo - exact) < 4 * report.exact_elbo_stderr
    assert abs(report.sampled_elbo - exact) < 4 * report.sampled_stderr
    # Summing y out removes its share of the noise: the enumerated s.e. is the smaller.
    assert report.exact_elbo_stderr < report.sampled_stderr


# --- 5. model-side enumeration: the local assignment summed out in the model.


def switch_model(x):
    a = pyro.sample("a", dist.Categorical(torch.tensor([0.2, 0.5, 0.3])))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(torch.tensor([0.1, 0.5, 0.9])[a.long()]))
        pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.5])[z.long()], 0.8), obs=x)


def switch_guide(x):
    probs = pyro.param("probs_a", torch.tensor([0.3, 0.3, 0.4]), constraint=constraints.simplex)
    pyro.sample("a", dist.Categorical(probs))


def test_model_side_enumeration_gives_the_exact_marginal_elbo():
    x = X4
    prior_a, z_prob, locs, q_a = [0.2, 0.5, 0.3], [0.1, 0.5, 0.9], [-1.0, 1.5], [0.3, 0.3, 0.4]

    def log_px_given_a(a):
        total = 0.0
        for xi in x:
            like = [
                math.exp(-0.5 * ((xi - loc) / 0.8) ** 2) / (0.8 * math.sqrt(2 * math.pi))
                for loc in locs
            ]
            total += math.log((1 - z_prob[a]) * like[0] + z_prob[a] * like[1])
        return total

    joint = [math.log(prior_a[a]) + log_px_given_a(a) for a in range(3)]
    log_px = math.log(sum(math.exp(j) for j in joint))
    elbo = sum(q_a[a] * (joint[a] - math.log(q_a[a])) for a in range(3))
    report = check_pair(switch_model, switch_guide, torch.tensor(x), num_particles=2000)
    assert report.exact
    assert report.exact_elbo == pytest.approx(elbo, abs=1e-4)
    assert report.log_evidence == pytest.approx(log_px, abs=1e-4)
    assert report.gap_minus_kl == pytest.approx(0.0, abs=1e-4)
    assert abs(report.z_score) < 4


def gmm_model(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
    with pyro.plate("data", x.shape[0]):
        a = pyro.sample("a", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(loc * a, 1.0), obs=x)


def gmm_guide(x):
    pyro.sample("loc", dist.Normal(2.0, 0.5))


def test_gaussian_mixture_with_the_assignment_summed_out():
    x = torch.tensor([0.1, 2.3, -0.4, 2.9, 0.5])
    report = check_pair(gmm_model, gmm_guide, x, num_particles=2000, iwae_samples=400)
    # log p(x) by quadrature over loc on a fine grid (the integrand is smooth and unimodal).
    grid = torch.linspace(-15, 15, 60001, dtype=torch.float64)
    mix = torch.stack(
        [0.7 * dist.Normal(0.0, 1.0).log_prob(x.double()).exp().expand(grid.shape[0], -1),
         0.3 * dist.Normal(grid[:, None], 1.0).log_prob(x.double()).exp()]
    ).sum(0)  # fmt: skip
    log_joint = dist.Normal(0.0, 3.0).log_prob(grid) + mix.log().sum(-1)
    true = float(torch.logsumexp(log_joint, 0) + math.log(grid[1] - grid[0]))
    assert "summed out in the model over ['a']" in report.estimators["exact_elbo"]
    assert report.exact_elbo < true
    se = report.log_evidence_stderr
    assert report.log_evidence < true + 4 * se
    assert report.log_evidence > report.exact_elbo - 4 * math.hypot(se, report.exact_elbo_stderr)


# --- 6. uncertainty on everything not exact.


def narrow_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 0.1), obs=x)


def narrow_guide(x):
    # The posterior's s.d. is 0.0995; a q five times narrower gives weights with a heavy tail.
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x, 0.02))


def test_heavy_tailed_weights_are_flagged():
    x = torch.tensor([0.3, -0.5])
    report = check_pair(narrow_model, narrow_guide, x, num_particles=500, iwae_samples=2000)
    assert report.iwae is not None and report.iwae.max_khat > 0.7
    assert "s.e. unreliable" in str(report)


# --- Gradients.


def test_gradient_check_passes_a_right_estimator_and_fails_a_doubled_one():
    from pyro.infer import Trace_ELBO

    from ppl_vae.elbo import bind_pair, check_gradients

    class DoubledGradient(Trace_ELBO):
        def differentiable_loss(self, model, guide, *args, **kwargs):
            loss = super().differentiable_loss(model, guide, *args, **kwargs)
            return 2 * loss - loss.detach()  # same value, twice the gradient

    x = torch.tensor(X4)
    report = check_pair(chain_model, chain_guide, x, num_particles=2000, gradients=True)
    assert {g.param for g in report.gradients} == {"probs_a", "slope"}
    assert all(g.passed for g in report.gradients)
    bound = bind_pair(chain_model, chain_guide, (x,), {})
    doubled = check_gradients(bound, num_particles=2000, elbo=DoubledGradient)
    assert not all(g.passed for g in doubled)


# --- 7. bad input.


def test_guide_with_more_categories_than_the_model():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(torch.ones(3) / 3))
            pyro.sample("x", dist.Normal(z.float(), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Categorical(torch.ones(4) / 4))

    with pyro.validation_enabled(False):
        with pytest.raises((ModelGuideMismatchError, PairExecutionError), match="'z'"):
            check_pair(model, guide, torch.tensor(X4), num_particles=10)


@pytest.mark.parametrize("particles", [0, -5, 1])
def test_particle_counts_below_two_are_refused(particles):
    with pytest.raises(ArgumentError, match="num_particles must be an integer >= 2"):
        check_pair(toy_model, toy_guide, torch.ones(3), num_particles=particles)


def test_zero_prior_mass_under_q_is_an_explicit_infinity():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(logits=torch.tensor([0.0, 0.0, -math.inf])))
            pyro.sample("x", dist.Normal(z.float(), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Categorical(torch.tensor([0.4, 0.3, 0.3])))

    report = check_pair(model, guide, torch.tensor([0.5]), num_particles=100)
    assert report.exact_elbo == -math.inf
    assert report.kl_to_posterior == math.inf
    for value in (report.z_score, report.sampled_stderr, report.exact_elbo_stderr):
        assert not math.isnan(value)
    assert "value 2" in report.estimators["kl_to_posterior"]
    assert "nan" not in str(report)


def test_float64_data_gives_the_float32_values():
    x = torch.tensor(X4)
    low = check_pair(chain_model, chain_guide, x, num_particles=100)
    high = check_pair(chain_model, chain_guide, x.double(), num_particles=100)
    assert high.exact_elbo == pytest.approx(low.exact_elbo, abs=1e-6)
    assert high.log_evidence == pytest.approx(low.log_evidence, abs=1e-6)
    assert "float64 data cast to float32" in str(high)


def test_guide_missing_the_data_plate_is_refused_without_pyro_validation():
    def guide(x):
        table = pyro.param(
            "q_table", torch.tensor([0.3, 0.7]), constraint=constraints.unit_interval
        )
        pyro.sample("z", dist.Bernoulli(table[1]))

    with pyro.validation_enabled(False):
        with pytest.raises(ModelGuideMismatchError, match="plates"):
            check_pair(toy_model, guide, torch.ones(3), num_particles=10)
