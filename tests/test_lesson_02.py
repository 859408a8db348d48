"""Lesson 02, what the KL term asks: every view of the notebook, driven at several values and
checked against closed forms written here by hand and integrals taken here by quadrature.

Sampled numbers are checked against the truth with the standard error the notebook reports:
|estimate - truth| <= Z_BOUND * s.e., a two-sided normal tail of 7e-6 per check. Seeds are
fixed, so every run draws the same numbers.
"""

import math

import numpy as np
import pytest
from lessons import Driver, run_notebook
from scipy import integrate, optimize, stats

NOTEBOOK = "02_what_the_kl_term_asks.ipynb"
Z_BOUND = 4.5


def kl_to_standard_normal(mu, sigma):
    """KL(N(mu, sigma^2) || N(0, 1)) in nats, by hand."""
    return 0.5 * (sigma**2 + mu**2 - 1) - math.log(sigma)


def kl_normal(m1, s1, m2, s2):
    """KL(N(m1, s1^2) || N(m2, s2^2)) in nats, by hand."""
    return math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def kl_by_quadrature(log_a, log_b, points=(), lo=-40.0, hi=40.0):
    """KL(a || b) = int a (log a - log b) dz, by adaptive quadrature."""

    def integrand(z):
        la = log_a(z)
        return math.exp(la) * (la - log_b(z)) if la > -700 else 0.0

    value, _ = integrate.quad(integrand, lo, hi, points=points or None, limit=400)
    return value


def normal_logpdf(m, s):
    """log N(z; m, s^2), by hand."""
    return lambda z: -0.5 * math.log(2 * math.pi) - math.log(s) - (z - m) ** 2 / (2 * s**2)


def mixture_logpdf(gap, weight, width):
    """The lesson's two bumps: means -gap/2 and gap/2, width each, weight on the right one."""
    left, right = normal_logpdf(-gap / 2, width), normal_logpdf(gap / 2, width)

    def log_p(z):
        a, b = math.log(1 - weight) + left(z), math.log(weight) + right(z)
        top = max(a, b)
        return top + math.log(math.exp(a - top) + math.exp(b - top))

    return log_p


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    return run_notebook(NOTEBOOK, tmp_path_factory.mktemp("lesson_02"))


@pytest.fixture(scope="module")
def drive(namespace):
    return Driver(namespace)


# -- 1. the KL term, closed form and sampled ----------------------------------------------


@pytest.mark.parametrize(
    ("mu", "sigma", "n", "seed"),
    [
        (1.0, 0.5, 1000, 0),
        (-2.5, 0.2, 5000, 3),
        (2.0, 2.5, 2000, 7),
        (0.3, 3.0, 500, 1),
        (0.0, 0.05, 800, 4),
    ],
)
def test_kl_view_closed_form_and_sampled_estimate(drive, mu, sigma, n, seed):
    out = drive("kl_view", mu=mu, sigma=sigma, n=n, seed=seed)
    assert (out["mu"], out["sigma"], out["n"]) == (mu, sigma, n)
    assert out["closed_form"] == pytest.approx(kl_to_standard_normal(mu, sigma), rel=1e-12)
    # At z = mu + sigma eps, log q(z) - log p(z) = -log sigma + mu^2 / 2 + mu sigma eps
    # + (sigma^2 - 1) eps^2 / 2, of variance mu^2 sigma^2 + (sigma^2 - 1)^2 / 2: the s.e. of a mean
    true_se = math.sqrt(mu**2 * sigma**2 + (sigma**2 - 1) ** 2 / 2) / math.sqrt(n)
    assert out["stderr"] == pytest.approx(true_se, rel=0.25)  # a sample s.e. of n >= 500 draws
    assert abs(out["sampled"] - out["closed_form"]) <= Z_BOUND * out["stderr"]


def test_kl_view_is_zero_at_the_prior_and_sampling_there_is_exact(drive):
    out = drive("kl_view", mu=0.0, sigma=1.0, n=100, seed=0)
    assert out["closed_form"] == pytest.approx(0.0, abs=1e-15)
    # q = p: every term log q(z) - log p(z) is 0, so is the estimate and its s.e.
    assert out["sampled"] == pytest.approx(0.0, abs=1e-12)
    assert out["stderr"] == pytest.approx(0.0, abs=1e-12)


def test_kl_view_standard_error_shrinks_as_one_over_root_n(drive):
    small = drive("kl_view", mu=1.5, sigma=0.7, n=1000, seed=2)
    large = drive("kl_view", mu=1.5, sigma=0.7, n=16000, seed=2)
    assert large["stderr"] == pytest.approx(small["stderr"] / 4, rel=0.15)


# -- 2. the reparameterisation against direct sampling ------------------------------------


def assert_moments_match(out, mu, sigma, n):
    se_mean, se_std = sigma / math.sqrt(n), sigma / math.sqrt(2 * (n - 1))
    for which in ("reparam", "direct"):
        assert abs(out[f"mean_{which}"] - mu) <= Z_BOUND * se_mean, which
        assert abs(out[f"std_{which}"] - sigma) <= Z_BOUND * se_std, which


@pytest.mark.parametrize(
    ("mu", "sigma", "n", "seed"),
    [(1.0, 0.5, 2000, 0), (-2.0, 2.5, 5000, 1), (0.0, 0.1, 1000, 2), (2.5, 3.0, 3000, 5)],
)
def test_reparameterised_samples_are_draws_from_the_normal(drive, mu, sigma, n, seed):
    out = drive("reparam_view", mu=mu, sigma=sigma, n=n, seed=seed)
    assert (out["mu"], out["sigma"], out["n"]) == (mu, sigma, n)
    assert_moments_match(out, mu, sigma, n)
    # Under the null the KS p-value is uniform on (0, 1): below 1e-3 with probability 1e-3.
    assert out["p_value"] > 1e-3
    # The reported statistic and p-value agree: the asymptotic KS tail at sqrt(n/2) D.
    assert out["p_value"] == pytest.approx(
        stats.kstwobign.sf(math.sqrt(n / 2) * out["ks_statistic"]), abs=0.05
    )


@pytest.mark.parametrize(("sigma", "n"), [(2.0, 2000), (0.5, 2000)])
def test_the_two_sample_test_rejects_a_wrong_sampler(drive, namespace, monkeypatch, sigma, n):
    # The check of the check: with sigma^2 as the scale the samples are not N(mu, sigma^2);
    # the notebook's own KS test and the moment check above both say so.
    monkeypatch.setitem(namespace, "reparameterise", lambda mu, sigma, eps: mu + sigma**2 * eps)
    out = drive("reparam_view", mu=0.5, sigma=sigma, n=n, seed=0)
    assert out["p_value"] < 1e-6
    assert out["std_reparam"] == pytest.approx(sigma**2, rel=0.05)
    with pytest.raises(AssertionError):
        assert_moments_match(out, 0.5, sigma, n)


# -- 3. gradients through the sample ------------------------------------------------------


@pytest.mark.parametrize(
    ("mu", "sigma", "n", "seed"),
    [(1.0, 0.5, 1000, 0), (-2.0, 2.0, 4000, 1), (0.0, 1.0, 500, 2), (0.5, 0.2, 2000, 3)],
)
def test_gradients_flow_through_the_reparameterised_sample(drive, mu, sigma, n, seed):
    out = drive("gradient_view", mu=mu, sigma=sigma, n=n, seed=seed)
    assert (out["mu"], out["sigma"], out["n"]) == (mu, sigma, n)
    z, eps = np.array(out["z"]), np.array(out["eps"])
    assert len(z) == 5
    np.testing.assert_allclose(z, mu + sigma * eps, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out["dz_dmu"], np.ones(5))  # dz/dmu = 1
    np.testing.assert_allclose(out["dz_dsigma"], (z - mu) / sigma, rtol=1e-9, atol=1e-9)  # = eps
    # d KL / d mu = mu and d KL / d sigma = sigma - 1 / sigma, from the closed form by hand
    assert out["closed_form_grad_mu"] == pytest.approx(mu, abs=1e-12)
    assert out["closed_form_grad_sigma"] == pytest.approx(sigma - 1 / sigma, rel=1e-12)
    # Per sample, the reparameterised gradient is z for mu (s.d. sigma) and
    # -1/sigma + mu eps + sigma eps^2 for sigma (s.d. sqrt(mu^2 + 2 sigma^2)).
    assert out["grad_mu_stderr"] == pytest.approx(sigma / math.sqrt(n), rel=0.2)
    assert out["grad_sigma_stderr"] == pytest.approx(
        math.sqrt(mu**2 + 2 * sigma**2) / math.sqrt(n), rel=0.25
    )
    assert abs(out["grad_mu"] - mu) <= Z_BOUND * out["grad_mu_stderr"]
    assert abs(out["grad_sigma"] - (sigma - 1 / sigma)) <= Z_BOUND * out["grad_sigma_stderr"]


# -- 4. the two directions of KL ----------------------------------------------------------


@pytest.mark.parametrize(
    ("mu_q", "sigma_q", "mu_p", "sigma_p"),
    [(0.5, 0.4, 0.0, 1.5), (0.0, 1.5, 0.5, 0.4), (1.0, 0.3, -1.0, 2.5), (-2.0, 2.0, 1.0, 0.7)],
)
def test_both_directions_match_their_closed_forms_and_differ(drive, mu_q, sigma_q, mu_p, sigma_p):
    out = drive("directions_view", mu_q=mu_q, sigma_q=sigma_q, mu_p=mu_p, sigma_p=sigma_p)
    assert (out["mu_q"], out["sigma_q"], out["mu_p"], out["sigma_p"]) == (
        mu_q,
        sigma_q,
        mu_p,
        sigma_p,
    )
    forward = kl_normal(mu_q, sigma_q, mu_p, sigma_p)
    backward = kl_normal(mu_p, sigma_p, mu_q, sigma_q)
    assert out["kl_q_p"] == pytest.approx(forward, rel=1e-10)
    assert out["kl_p_q"] == pytest.approx(backward, rel=1e-10)
    # the oracle itself, against quadrature
    q, p = normal_logpdf(mu_q, sigma_q), normal_logpdf(mu_p, sigma_p)
    assert forward == pytest.approx(kl_by_quadrature(q, p, points=(mu_q, mu_p)), rel=1e-6)
    assert backward == pytest.approx(kl_by_quadrature(p, q, points=(mu_q, mu_p)), rel=1e-6)
    assert abs(out["kl_q_p"] - out["kl_p_q"]) > 0.5


def test_a_narrow_q_inside_a_wide_p_costs_less_in_the_direction_the_elbo_uses(drive):
    inside = drive("directions_view", mu_q=0.0, sigma_q=0.4, mu_p=0.0, sigma_p=1.5)
    swapped = drive("directions_view", mu_q=0.0, sigma_q=1.5, mu_p=0.0, sigma_p=0.4)
    assert inside["kl_q_p"] < inside["kl_p_q"]
    assert (swapped["kl_q_p"], swapped["kl_p_q"]) == pytest.approx(
        (inside["kl_p_q"], inside["kl_q_p"]), rel=1e-12
    )


def test_with_equal_widths_the_two_directions_agree(drive):
    out = drive("directions_view", mu_q=1.0, sigma_q=0.8, mu_p=-0.5, sigma_p=0.8)
    assert out["kl_q_p"] == pytest.approx(1.5**2 / (2 * 0.8**2), rel=1e-12)
    assert out["kl_p_q"] == pytest.approx(out["kl_q_p"], rel=1e-12)


# -- 5. mode-seeking and mass-covering fits -----------------------------------------------


def reverse_kl_fit(log_p, start, bumps):
    """argmin over (m, s) of KL(N(m, s^2) || p), by Nelder-Mead on quadrature."""

    def objective(x):
        m, log_s = x
        return kl_by_quadrature(normal_logpdf(m, math.exp(log_s)), log_p, points=bumps)

    options = {"xatol": 1e-5, "fatol": 1e-9}
    start = [start[0], math.log(start[1])]
    fit = optimize.minimize(objective, start, method="Nelder-Mead", options=options)
    return fit.x[0], math.exp(fit.x[1]), fit.fun


@pytest.mark.parametrize(
    ("gap", "weight", "width"),
    [(4.0, 0.6, 0.6), (6.0, 0.7, 0.4), (3.0, 0.25, 0.5), (0.0, 0.5, 1.0), (2.0, 0.3, 0.8)],
)
def test_one_gaussian_fitted_to_two_bumps_each_way(drive, gap, weight, width):
    out = drive("mixture_view", gap=gap, weight=weight, width=width)
    assert (out["gap"], out["weight"], out["width"]) == (gap, weight, width)
    log_p = mixture_logpdf(gap, weight, width)
    bumps = (-gap / 2, gap / 2)
    # Mass-covering: KL(p || q) over Gaussian q is least at q's moments = p's moments.
    mean = weight * gap / 2 - (1 - weight) * gap / 2
    var = width**2 + (gap / 2) ** 2 - mean**2
    assert out["mass_covering_mu"] == pytest.approx(mean, abs=0.01)
    assert out["mass_covering_sigma"] == pytest.approx(math.sqrt(var), abs=0.01)
    # Mode-seeking: the least KL(q || p), found here from the heavier bump by Nelder-Mead.
    heavier = gap / 2 if weight >= 0.5 else -gap / 2
    m, s, least = reverse_kl_fit(log_p, (heavier, width), bumps)
    assert out["mode_seeking_mu"] == pytest.approx(m, abs=0.01)
    assert out["mode_seeking_sigma"] == pytest.approx(s, abs=0.01)
    assert out["mode_seeking_kl_q_p"] == pytest.approx(least, abs=1e-4)
    # Every KL the view reports, against quadrature at the fitted (m, s).
    for name in ("mode_seeking", "mass_covering"):
        q = normal_logpdf(out[f"{name}_mu"], out[f"{name}_sigma"])
        q_p, p_q = kl_by_quadrature(q, log_p, bumps), kl_by_quadrature(log_p, q, bumps)
        assert out[f"{name}_kl_q_p"] == pytest.approx(q_p, rel=1e-5, abs=1e-7)
        assert out[f"{name}_kl_p_q"] == pytest.approx(p_q, rel=1e-5, abs=1e-7)
    # Each fit wins in the direction it minimised.
    assert out["mode_seeking_kl_q_p"] <= out["mass_covering_kl_q_p"] + 1e-9
    assert out["mass_covering_kl_p_q"] <= out["mode_seeking_kl_p_q"] + 1e-9


def test_with_well_separated_bumps_one_fit_picks_a_bump_and_the_other_covers_both(drive):
    out = drive("mixture_view", gap=6.0, weight=0.7, width=0.4)
    assert out["mode_seeking_mu"] == pytest.approx(3.0, abs=0.05)
    assert out["mode_seeking_sigma"] == pytest.approx(0.4, rel=0.05)
    # stuck on one bump, q misses the other: KL(q || p) is about -log(weight)
    assert out["mode_seeking_kl_q_p"] == pytest.approx(-math.log(0.7), abs=0.01)
    assert out["mass_covering_sigma"] > 2.5
    assert out["mode_seeking_kl_p_q"] > 10 * out["mass_covering_kl_p_q"]


def test_every_view_is_driven(drive):
    assert drive.undriven() == []
