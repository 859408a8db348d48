"""Importance-weight diagnostics against closed forms, brute-force sums and known tails.

Stochastic checks use fixed seeds; each tolerance is 4 standard errors of the quantity
checked (a normal deviate beyond 4 s.d. has probability 6e-5), derived in the comment above it.
"""

import math

import pytest
import torch

from ppl_vae.elbo import (
    KHAT_GOOD,
    KHAT_UNRELIABLE,
    effective_sample_size,
    log_mean_exp_stderr,
    pareto_khat,
    pareto_khat_from_largest,
    pareto_tail_size,
)


def _gpd_draws(k: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Generalised Pareto(k, sigma = 1) by inversion: F(x) = 1 - (1 + k x)^(-1/k)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    if k == 0:
        return -torch.log1p(-u)  # the exponential limit
    return ((1 - u) ** -k - 1) / k


def _shrunk(k: float, m: int) -> float:
    """PSIS's prior, (M k + 10 * 0.5) / (M + 10): where an unbiased fit of k is pulled to."""
    return (m * k + 5) / (m + 10)


def _mills(x: float) -> float:
    """R(x) = P(N(0,1) > x) / phi(x), through the scaled complementary error function."""
    return math.sqrt(math.pi / 2) * float(torch.special.erfcx(torch.tensor(x / math.sqrt(2))))


# --- tail size


def test_tail_size_is_the_smaller_of_a_fifth_and_three_root_k():
    for k in range(1, 3000):
        root = 0
        while root * root < 9 * k:  # the least integer >= 3 sqrt(k), without a float sqrt
            root += 1
        assert pareto_tail_size(k) == min((k + 4) // 5, root), k
    assert pareto_tail_size(100) == 20 and pareto_tail_size(1000) == 95
    with pytest.raises(ValueError):
        pareto_tail_size(0)


# --- k-hat


@pytest.mark.parametrize("k", [-0.25, 0.0, 0.2, 0.5, 0.9])
def test_khat_recovers_the_shape_of_generalized_pareto_weights(k):
    # Above any threshold u, GPD(k, 1) exceedances are GPD(k, 1 + k u) (threshold stability),
    # so the M = 949 tail points of K = 10^5 draws are an exact GPD sample. The shape MLE has
    # asymptotic s.d. (1 + k) / sqrt(M) for k > -1/2 (Zhang & Stephens' estimator is close to
    # efficient: 0.93-1.14 of it, measured); the prior multiplies it by M / (M + 10). The mean
    # of R = 20 independent items then has s.d. sd / sqrt(R): |z| < 4.
    # Finite-M bias of the estimator, measured over 200 items: under 0.004 (< 0.6 of that s.d.).
    num, reps = 100_000, 20
    m = pareto_tail_size(num)
    generator = torch.Generator().manual_seed(11)
    log_w = _gpd_draws(k, (reps, num), generator).log()  # weights = draws; items along dim 0
    khat = pareto_khat(log_w, dim=1)
    assert khat.shape == (reps,) and khat.dtype == torch.float64
    sd = (1 + k) / math.sqrt(m) * m / (m + 10)
    assert abs(float(khat.mean()) - _shrunk(k, m)) < 4 * sd / math.sqrt(reps), khat
    # The spread across items: a sample s.d. of R normal values has relative s.d.
    # 1 / sqrt(2 (R - 1)) = 0.16; allow 4 of those (catches a constant or wildly noisy k-hat).
    assert abs(float(khat.std()) / sd - 1) < 4 / math.sqrt(2 * (reps - 1)), float(khat.std())


def test_khat_is_pulled_towards_one_half_by_the_prior_when_the_tail_is_short():
    # K = 100: M = 20 tail points, so the prior (weight 10 at 0.5) moves k = -0.25 to
    # (20 (-0.25) + 5) / 30 = 0: halfway is -0.125. Without the prior the estimator's own
    # small-sample pull towards 1/2 leaves its mean near -0.20 (measured over 5000 items), with
    # it near +0.03; the mean of 2000 items has s.d. ~0.003, so both sit > 25 s.d. from -0.125.
    generator = torch.Generator().manual_seed(16)
    khat = pareto_khat(_gpd_draws(-0.25, (2000, 100), generator).log(), dim=1)
    assert float(khat.mean()) > -0.125, float(khat.mean())


def test_khat_of_an_exactly_pareto_importance_ratio_and_the_reliability_flag():
    # q = Exp(1), p = Exp(lam): w = p/q = lam exp((1 - lam) z), so P(w > t) = P(z > log(t/lam)
    # / (1 - lam)) = (t / lam)^(-1 / (1 - lam)) for t >= lam: an exact Pareto tail, k = 1 - lam.
    # One item each, K = 10^5 (M = 949); s.d. (1 + k) / sqrt(M) * M / (M + 10): |z| < 4.
    num = 100_000
    m = pareto_tail_size(num)
    generator = torch.Generator().manual_seed(12)
    khats = {}
    for lam in (0.02, 0.5, 0.8):
        z = -torch.log1p(-torch.rand(num, generator=generator, dtype=torch.float64))
        k = 1 - lam
        khats[lam] = float(pareto_khat(math.log(lam) + (1 - lam) * z))
        sd = (1 + k) / math.sqrt(m) * m / (m + 10)
        assert abs(khats[lam] - _shrunk(k, m)) < 4 * sd, (lam, khats[lam])
    # k = 0.98 (infinite variance): shrunk 0.975, 4 s.d. = 0.25, so k-hat > 0.72 > 0.7: flagged.
    assert khats[0.02] > KHAT_UNRELIABLE
    # k = 0.2: shrunk 0.203, 4 s.d. = 0.15, so k-hat < 0.36 < 0.5: good.
    assert khats[0.8] < KHAT_GOOD


def test_khat_of_log_normal_weights_is_small():
    # log w ~ N(0, 1): a log-normal tail is lighter than every power law (k = 0 in the limit),
    # but not exponential at finite K. The GPD fitted above u sees the local shape
    # xi(t) = d/dt [P(w > t) / f(t)] (exactly k for a GPD, where that ratio is sigma + k t);
    # for the log-normal, with z = log t, xi = (1 + z) R(z) - 1 (R the Mills ratio), which falls
    # from xi(z_u) at the threshold z_u = Phi^-1(1 - M/K) to 0. So the mean k-hat of R = 20 items
    # (K = 10^4, M = 300) lies in [shrunk(0), shrunk(xi(z_u))] = [0.016, 0.28] up to 4 s.d.
    # of that mean, (1 + 0.28) / sqrt(M R) = 0.017; both bounds are below KHAT_GOOD.
    num, reps = 10_000, 20
    m = pareto_tail_size(num)
    generator = torch.Generator().manual_seed(13)
    log_w = torch.randn(num, reps, generator=generator, dtype=torch.float64)
    khat = pareto_khat(log_w)  # dim 0: items along dim 1
    z_u = float(torch.special.ndtri(torch.tensor(1 - m / num, dtype=torch.float64)))
    upper = _shrunk((1 + z_u) * _mills(z_u) - 1, m)
    sd = (1 + upper) / math.sqrt(m * reps)
    mean = float(khat.mean())
    assert _shrunk(0.0, m) - 4 * sd < mean < upper + 4 * sd, (mean, upper, sd)
    assert upper + 4 * sd < KHAT_GOOD


def test_khat_is_scale_invariant_and_vectorised_over_other_dims():
    generator = torch.Generator().manual_seed(14)
    log_w = _gpd_draws(0.4, (3, 500, 2), generator).log()
    khat = pareto_khat(log_w, dim=1)
    assert khat.shape == (3, 2)
    # A constant factor on every weight (a log offset that would overflow exp) changes nothing.
    shifted = pareto_khat(log_w + 1000.0, dim=1)
    assert torch.allclose(shifted, khat, rtol=0, atol=1e-9)
    # Each item on its own gives the same value as in the batch.
    for i in range(3):
        for j in range(2):
            assert torch.allclose(pareto_khat(log_w[i, :, j]), khat[i, j], rtol=0, atol=1e-12)
    # A float32 input: the selection is exact, the fit float64; values agree to float32 rounding.
    assert torch.allclose(pareto_khat(log_w.float(), dim=1), khat, rtol=0, atol=1e-3)


def test_khat_from_the_largest_weights_in_any_order_equals_khat():
    generator = torch.Generator().manual_seed(15)
    log_w = _gpd_draws(0.6, (1000,), generator).log()
    m = pareto_tail_size(1000)
    top = torch.sort(log_w, descending=True).values[: m + 1]
    shuffled = top[torch.randperm(m + 1, generator=generator)]
    assert float(pareto_khat_from_largest(shuffled)) == float(pareto_khat(log_w))


def test_khat_conventions_for_degenerate_tails():
    # Constant weights (q is the target): a flat top, k = -inf, and not flagged.
    constant = pareto_khat(torch.full((1000, 2), 3.5))
    assert torch.equal(constant, torch.full((2,), -math.inf, dtype=torch.float64))
    # K <= 20: M = min(ceil(K/5), ceil(3 sqrt K)) < 5 tail points, NaN; K = 21 gives M = 5.
    assert math.isnan(float(pareto_khat(torch.randn(20))))
    assert math.isfinite(float(pareto_khat(torch.randn(21))))
    # Ties: the top M + 1 = 31 of 300 all at the maximum is a flat top again, -inf; three
    # values above 297 ties leave 3 distinct exceedances (< 5), NaN; six above the ties leave a
    # first quartile of 0 (over a quarter tied at the threshold), NaN.
    assert float(pareto_khat(torch.tensor([0.0, 1.0, 2.0] * 100))) == -math.inf
    assert math.isnan(float(pareto_khat(torch.tensor([5.0, 4.0, 3.0] + [0.0] * 297))))
    assert math.isnan(float(pareto_khat(torch.tensor([6.0, 5, 4, 3, 2, 1] + [0.0] * 294))))
    # Every weight 0 (log w = -inf), or a NaN: NaN.
    assert math.isnan(float(pareto_khat(torch.full((100,), -math.inf))))
    assert math.isnan(float(pareto_khat(torch.cat([torch.randn(99), torch.tensor([math.nan])]))))


# --- effective sample size


def test_ess_of_equal_weights_is_k_and_of_one_dominant_weight_is_one():
    # log w = 1234.5 for all: exp would overflow; (K c)^2 / (K c^2) = K.
    for k in (1, 7, 1000):
        ess = effective_sample_size(torch.full((k,), 1234.5))
        assert ess.dtype == torch.float64
        assert math.isclose(float(ess), k, rel_tol=1e-12)
    # One weight 1, the others e^-50: ESS = (1 + 99 e^-50)^2 / (1 + 99 e^-100) = 1 + 4e-20.
    log_w = torch.tensor([0.0] + [-50.0] * 99)
    assert math.isclose(float(effective_sample_size(log_w)), 1.0, rel_tol=1e-12)
    # One weight 3 and nine of 1: 12^2 / (9 + 9) = 8.
    log_w = torch.tensor([math.log(3.0)] + [0.0] * 9, dtype=torch.float64)
    assert math.isclose(float(effective_sample_size(log_w)), 8.0, rel_tol=1e-12)


def test_ess_matches_the_brute_force_sum_along_any_dim():
    generator = torch.Generator().manual_seed(21)
    log_w = 2 * torch.randn(4, 50, 3, generator=generator, dtype=torch.float64)
    w = log_w.exp()  # moderate: no overflow, the plain formula is exact enough
    expected = w.sum(1) ** 2 / (w**2).sum(1)
    assert torch.allclose(effective_sample_size(log_w, dim=1), expected, rtol=1e-10, atol=0)
    assert torch.allclose(effective_sample_size(log_w, dim=-2), expected, rtol=1e-10, atol=0)


# --- delta-method standard error of log-mean-exp


def test_stderr_matches_the_sample_variance_by_brute_force():
    # se(log m) = se(m) / m with se(m)^2 = s^2 / K, s^2 the unbiased sample variance.
    generator = torch.Generator().manual_seed(22)
    log_w = torch.randn(5, 40, generator=generator, dtype=torch.float64)
    w = log_w.exp()
    expected = (w.var(dim=1, correction=1) / (40 * w.mean(1) ** 2)).sqrt()
    assert torch.allclose(log_mean_exp_stderr(log_w, dim=1), expected, rtol=1e-10, atol=0)
    # Equal weights: no spread, s.e. 0; a single weight: no variance to estimate, NaN.
    assert float(log_mean_exp_stderr(torch.full((10,), -3.0))) == 0.0
    assert math.isnan(float(log_mean_exp_stderr(torch.tensor([0.3]))))


def test_stderr_matches_the_spread_of_repeated_estimates():
    # R = 4000 independent estimates log((1/K) sum w), K = 100, log w ~ N(0, 0.25): the
    # empirical s.d. of the estimates against the mean reported s.e. The sample s.d. of R
    # near-normal values has s.d. sd / sqrt(2 (R - 1)); the mean s.e. has s.d. sd(se) / sqrt(R);
    # |difference| < 4 times their combined s.d. (0.0024 here). The delta method and the square
    # root of an unbiased variance bias the s.e. low by ~(kurtosis(w) - 1) / (8 K) ~ 1 %, 0.0007
    # (measured over 10^5 repeats), well inside that.
    reps, num, sigma = 4000, 100, 0.5
    generator = torch.Generator().manual_seed(23)
    log_w = sigma * torch.randn(reps, num, generator=generator, dtype=torch.float64)
    estimates = torch.logsumexp(log_w, dim=1) - math.log(num)
    se = log_mean_exp_stderr(log_w, dim=1)
    spread = float(estimates.std())
    tolerance = 4 * math.hypot(spread / math.sqrt(2 * (reps - 1)), float(se.std()) / reps**0.5)
    assert abs(spread - float(se.mean())) < tolerance, (spread, float(se.mean()), tolerance)
    # Both against the closed form: Var(w) / E[w]^2 = exp(sigma^2) - 1 for a log-normal w.
    exact = math.sqrt((math.exp(sigma**2) - 1) / num)
    assert abs(spread - exact) < 4 * exact / math.sqrt(2 * (reps - 1))
