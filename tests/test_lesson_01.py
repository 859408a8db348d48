"""Lesson 01, the ELBO on the binary toy: every view of the notebook against closed forms.

The oracles are written here from the toy's three numbers (prior p(z=1) = 0.5, decoder
p(x=1 | z=0) = 0.2 and p(x=1 | z=1) = theta, 0.8 by default): Bayes' rule, the two ELBO terms
as sums over z in {0, 1}, and the distribution of the per-particle ELBO, which takes two values.
"""

import math

import pytest
from lessons import Driver, run_notebook

NOTEBOOK = "01_elbo_binary_toy.ipynb"

PRIOR = 0.5  # p(z = 1)
LIK0 = 0.2  # p(x = 1 | z = 0)
LIK1 = 0.8  # p(x = 1 | z = 1), the default decoder
# The guide's q goes through Pyro's unit-interval transform in float32 (a relative error of
# ~1e-7), and the terms have slopes |d/dq| < 5 on q in [0.05, 0.95]; their float32 sums of
# O(1) values carry a few units of 6e-8. 2e-6 covers both with a margin of 3.
ABS = 2e-6
Z_BOUND = 4.5  # two-sided normal tail 7e-6: a correct notebook fails one check in 1e5


def exact(q: float, lik1: float = LIK1) -> dict[str, float]:
    """The toy's exact quantities at x = 1 for the guide q(z=1 | x=1) = q, by hand."""
    evidence = PRIOR * lik1 + (1 - PRIOR) * LIK0  # p(x=1) = sum_z p(z) p(x=1 | z)
    posterior = PRIOR * lik1 / evidence  # Bayes' rule
    reconstruction = q * math.log(lik1) + (1 - q) * math.log(LIK0)
    kl = q * math.log(q / PRIOR) + (1 - q) * math.log((1 - q) / (1 - PRIOR))
    gap = q * math.log(q / posterior) + (1 - q) * math.log((1 - q) / (1 - posterior))
    return {
        "reconstruction": reconstruction,
        "kl": kl,
        "elbo": reconstruction - kl,
        "log_px": math.log(evidence),
        "posterior": posterior,
        "gap": gap,
    }


def per_particle(q: float) -> tuple[float, float]:
    """The two values of log p(x=1, z) - log q(z): (z = 0, z = 1)."""
    f0 = math.log((1 - PRIOR) * LIK0) - math.log(1 - q)
    f1 = math.log(PRIOR * LIK1) - math.log(q)
    return f0, f1


@pytest.fixture(scope="module")
def drive(tmp_path_factory):
    return Driver(run_notebook(NOTEBOOK, tmp_path_factory.mktemp("lesson_01")))


# -- view 1: the guide's q, and the gap -------------------------------------------------------


@pytest.mark.parametrize("q", [0.05, 0.3, 0.5, 0.7, 0.8, 0.95])
def test_guide_view_terms_match_the_closed_forms(drive, q):
    out = drive("guide_view", q=q)
    want = exact(q)
    for key in ("reconstruction", "kl", "elbo", "log_px", "gap"):
        assert out[key] == pytest.approx(want[key], abs=ABS), key
    # The independent brute-force KL(q || p(z | x)) is the same gap.
    assert out["kl_to_posterior"] == pytest.approx(want["gap"], abs=ABS)
    assert out["elbo"] <= out["log_px"] + ABS  # a lower bound
    assert out["posterior"] == pytest.approx(want["posterior"], abs=1e-7)


def test_guide_view_reproduces_the_worked_example_at_q_0_7(drive):
    out = drive("guide_view", q=0.7)
    want = exact(0.7)
    quoted = {
        "reconstruction": -0.6390,
        "kl": 0.0823,
        "elbo": -0.7213,
        "log_px": -0.6931,
        "gap": 0.0282,
        "kl_to_posterior": 0.0282,
    }
    for key, number in quoted.items():
        # The hand computation rounds to the quoted number, and so does the view's.
        assert round(want["gap" if key == "kl_to_posterior" else key], 4) == number, key
        assert round(out[key], 4) == number, key


def test_guide_view_gap_touches_zero_at_the_posterior(drive):
    out = drive("guide_view", q=0.8)
    assert exact(0.8)["posterior"] == pytest.approx(0.8)
    assert abs(out["gap"]) < ABS and abs(out["kl_to_posterior"]) < ABS
    assert out["elbo"] == pytest.approx(out["log_px"], abs=ABS)
    # The drawn gap curve is smallest at the grid point q = 0.8: its neighbours 0.78 and 0.82
    # are KL ~ 0.02**2 / (2 * 0.8 * 0.2) = 1.2e-3 nats above, far beyond float32 rounding.
    assert out["grid_q_smallest_gap"] == pytest.approx(0.8)
    # Anywhere else the gap is strictly positive, at least its closed form less rounding.
    for q in (0.75, 0.85):
        assert drive("guide_view", q=q)["gap"] >= exact(q)["gap"] - ABS > 1e-3


# -- view 2: the decoder's p(x=1 | z=1) moves the posterior -----------------------------------


@pytest.mark.parametrize(
    ("theta", "q"), [(0.2, 0.3), (0.5, 0.7), (0.8, 0.7), (0.95, 0.4), (0.05, 0.9)]
)
def test_decoder_view_posterior_is_bayes_rule(drive, theta, q):
    out = drive("decoder_view", p_x1_given_z1=theta, q=q)
    want = exact(q, lik1=theta)
    assert out["posterior"] == pytest.approx(want["posterior"], abs=1e-6)
    assert out["log_px"] == pytest.approx(want["log_px"], abs=ABS)
    assert out["elbo"] == pytest.approx(want["elbo"], abs=ABS)
    assert out["gap"] == pytest.approx(want["gap"], abs=ABS)
    assert out["kl_to_posterior"] == pytest.approx(want["gap"], abs=ABS)
    # The ELBO's maximiser is the posterior. Near it the ELBO is log p(x) - (q - p)^2 / (2 p
    # (1 - p)) to second order; float32 resolves ELBO differences down to eps ~ 2e-6 at most
    # (|ELBO| < 4), so the maximiser is pinned within sqrt(2 * eps * p (1 - p)) <= 1e-3 of p
    # (p (1 - p) <= 1/4), plus the optimiser's xatol 1e-5: 2e-3 is a margin of 2.
    assert out["tight_q"] == pytest.approx(want["posterior"], abs=2e-3)
    # There the gap is KL <= (2e-3)^2 / (2 p (1 - p)) < 2e-5 for these p (p (1 - p) >= 0.14).
    assert -ABS <= out["gap_at_tight_q"] <= 2e-5


def test_decoder_view_at_the_default_decoder_is_the_worked_example(drive):
    out = drive("decoder_view", p_x1_given_z1=0.8, q=0.7)
    assert round(out["posterior"], 4) == 0.8
    assert round(out["gap"], 4) == 0.0282
    assert round(out["log_px"], 4) == round(math.log(0.5), 4) == -0.6931


# -- view 3: the sampled estimate and its standard error -------------------------------------


@pytest.mark.parametrize(("particles", "q", "seed"), [(2, 0.7, 0), (10, 0.3, 1), (1000, 0.7, 2)])
def test_particles_view_is_an_average_of_the_two_per_particle_values(drive, particles, q, seed):
    # Each particle gives f0 or f1, so the estimate is f0 + (k / N)(f1 - f0) for an integer k (the
    # draws of z = 1), and its s.e. is |f1 - f0| sqrt(k/N (1 - k/N) / (N - 1)) exactly.
    out = drive("particles_view", particles=particles, q=q, seed=seed)
    assert out["particles"] == particles
    f0, f1 = per_particle(q)
    k = particles * (out["sampled"] - f0) / (f1 - f0)
    # float32 means of N values of size < 3 err by < 1e-5, i.e. < N * 1e-5 / |f1 - f0| in k.
    assert k == pytest.approx(round(k), abs=max(1e-3, particles * 1e-5 / abs(f1 - f0) * 3))
    share = round(k) / particles
    se = abs(f1 - f0) * math.sqrt(share * (1 - share) / (particles - 1))
    assert out["stderr"] == pytest.approx(se, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("particles", [100, 1000, 10000])
@pytest.mark.parametrize(("q", "seed"), [(0.7, 0), (0.3, 3), (0.55, 7)])
def test_particles_view_estimate_within_a_z_bound_of_the_exact_elbo(drive, particles, q, seed):
    out = drive("particles_view", particles=particles, q=q, seed=seed)
    want = exact(q)
    assert out["exact"] == pytest.approx(want["elbo"], abs=ABS)
    assert out["log_px"] == pytest.approx(want["log_px"], abs=ABS)
    # From N = 100 particles the mean of i.i.d. draws is near normal and the reported s.e. within
    # ~20% of the true one (next test), so |z| < 4.5 fails with probability well under 1e-4.
    assert out["stderr"] > 0
    z = (out["sampled"] - want["elbo"]) / out["stderr"]
    assert abs(z) < Z_BOUND
    assert out["z"] == pytest.approx(z, abs=1e-3)


@pytest.mark.parametrize("particles", [1000, 10000])
@pytest.mark.parametrize(("q", "seed"), [(0.7, 4), (0.3, 5), (0.5, 6)])
def test_particles_view_stderr_matches_the_closed_form_variance(drive, particles, q, seed):
    out = drive("particles_view", particles=particles, q=q, seed=seed)
    f0, f1 = per_particle(q)
    sd = math.sqrt(q * (1 - q)) * abs(f1 - f0)  # a two-point law: Var = q (1 - q) (f1 - f0)^2
    want = sd / math.sqrt(particles)
    # The reported s.e. is |f1 - f0| sqrt(p (1 - p) / (N - 1)) with p the share of z = 1 draws.
    # With p = q + d, p (1 - p) / (q (1 - q)) - 1 = ((1 - 2q) d - d^2) / (q (1 - q)); on the
    # event |d| < 4.5 sqrt(q (1 - q) / N) (failure < 1e-5) that is below
    # 4.5 |1 - 2q| / sqrt(q (1 - q) N) + 4.5^2 / N. The s.e. is its square root, which halves a
    # small relative error (not halved here: a margin of 2); N / (N - 1) adds 1 / N.
    rel = (
        Z_BOUND * abs(1 - 2 * q) / math.sqrt(q * (1 - q) * particles) + Z_BOUND**2 / particles
    ) + 1 / particles
    assert out["stderr"] == pytest.approx(want, rel=rel)


def test_particles_view_tight_guide_has_no_error_bar(drive):
    out = drive("particles_view", particles=1000, q=0.8, seed=0)
    f0, f1 = per_particle(0.8)
    assert f0 == pytest.approx(f1) == pytest.approx(math.log(0.5))  # every particle: log p(x)
    assert out["stderr"] < 1e-6
    assert out["sampled"] == pytest.approx(math.log(0.5), abs=1e-5)
    assert out["exact"] == pytest.approx(math.log(0.5), abs=ABS)


def test_every_view_was_driven(drive):
    assert drive.undriven() == []
