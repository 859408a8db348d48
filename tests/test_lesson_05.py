"""Lesson 05, "KL is all you need": every view driven at several values and compared with
computations written here (sums by hand, closed forms, chi and binomial moments). Monte Carlo
numbers are checked within five standard errors derived from the exact moments (a normal tail
of 5 s.e. has probability 6e-7 per check); exact numbers within float rounding."""

import itertools
import math

import numpy as np
import pytest
from lessons import Driver, run_notebook
from scipy import stats

NOTEBOOK = "05_kl_is_all_you_need.ipynb"
Z = 5.0  # standard errors allowed to a Monte Carlo number
F32 = 1e-5  # the binary toy's log-probabilities are float32 in the library: a few 1e-7 per term


@pytest.fixture(scope="module")
def drive(tmp_path_factory):
    return Driver(run_notebook(NOTEBOOK, tmp_path_factory.mktemp("lesson_05")))


def bernoulli_kl(p, q):
    """KL(Bernoulli(p) || Bernoulli(q)), the two-term sum, 0 log 0 = 0."""
    return sum(a * math.log(a / b) for a, b in ((p, q), (1 - p, 1 - q)) if a > 0)


# --- 1. weight of evidence --------------------------------------------------------------------

COINS = [  # (true bias, h1, h2, flips)
    (0.6, 0.6, 0.5, 200),
    (0.5, 0.3, 0.8, 50),
    (0.9, 0.7, 0.95, 1000),
    (0.3, 0.4, 0.1, 1),
    (0.2, 0.25, 0.15, 400),
]


def llr_values(h1, h2):
    """The weight of evidence of one head and of one tail."""
    return math.log(h1 / h2), math.log((1 - h1) / (1 - h2))


@pytest.mark.parametrize("p, h1, h2, n", COINS)
def test_evidence_is_the_sum_of_log_likelihood_ratios_over_the_flips(drive, p, h1, h2, n):
    out = drive("evidence_view", p_true=p, h1=h1, h2=h2, flips=n)
    head, tail = llr_values(h1, h2)
    k = out["heads"]
    assert out["flips"] == n and 0 <= k <= n
    assert out["evidence_nats"] == pytest.approx(k * head + (n - k) * tail, abs=1e-9)
    assert out["evidence_bits"] == pytest.approx(out["evidence_nats"] / math.log(2), abs=1e-9)


@pytest.mark.parametrize("p, h1, h2, n", COINS)
def test_expected_evidence_per_flip_is_the_difference_of_two_kls(drive, p, h1, h2, n):
    out = drive("evidence_view", p_true=p, h1=h1, h2=h2, flips=n)
    head, tail = llr_values(h1, h2)
    per_flip = p * head + (1 - p) * tail  # E_p[log h1(x) / h2(x)], the sum over x written out
    assert out["kl_true_h1"] == pytest.approx(bernoulli_kl(p, h1), abs=1e-12)
    assert out["kl_true_h2"] == pytest.approx(bernoulli_kl(p, h2), abs=1e-12)
    assert out["expected_per_flip_nats"] == pytest.approx(per_flip, abs=1e-12)
    assert out["expected_nats"] == pytest.approx(n * per_flip, abs=1e-9)


def test_with_h1_true_the_expected_evidence_is_kl_h1_h2(drive):
    out = drive("evidence_view", p_true=0.7, h1=0.7, h2=0.4, flips=100)
    assert out["kl_true_h1"] == pytest.approx(0.0, abs=1e-15)
    assert out["expected_nats"] == pytest.approx(100 * bernoulli_kl(0.7, 0.4), abs=1e-9)


def probability_evidence_positive(p, h1, h2, n):
    """P(W_n > 0) for W_n = K log(h1/h2) + (n - K) log((1-h1)/(1-h2)), K ~ Binomial(n, p)."""
    head, tail = llr_values(h1, h2)
    total = 0.0
    for k in range(n + 1):
        w = k * head + (n - k) * tail
        assert abs(w) > 1e-9, "a tie: the sign would be down to rounding"
        if w > 0:
            log_pmf = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            total += math.exp(log_pmf + k * math.log(p) + (n - k) * math.log1p(-p))
    return total


@pytest.mark.parametrize("p, h1, h2, n", COINS)
def test_repeated_experiments_agree_with_the_exact_moments(drive, p, h1, h2, n):
    out = drive("evidence_view", p_true=p, h1=h1, h2=h2, flips=n)
    m = out["experiments"]
    head, tail = llr_values(h1, h2)
    # one flip's evidence takes two values; its variance and fourth central moment
    var1 = p * (1 - p) * (head - tail) ** 2
    m4 = p * (1 - p) * (head - tail) ** 4 * ((1 - p) ** 3 + p**3)
    var = n * var1  # of W_n, a sum of n independent flips
    mu4 = n * m4 + 3 * n * (n - 1) * var1**2
    mean = n * (p * head + (1 - p) * tail)
    assert abs(out["mean_nats"] - mean) <= Z * math.sqrt(var / m)
    # the sample s.d. of m experiments: s.e. sqrt(Var(s^2)) / (2 sd), Var(s^2) = (mu4 - var^2) / m
    sd_se = math.sqrt((mu4 - var**2) / m) / (2 * math.sqrt(var))
    assert abs(out["sd_nats"] - math.sqrt(var)) <= Z * sd_se
    assert out["se_nats"] == pytest.approx(out["sd_nats"] / math.sqrt(m), rel=1e-12)
    # the fraction of experiments with W > 0, a binomial proportion
    prob = probability_evidence_positive(p, h1, h2, n)
    assert abs(out["fraction_favouring_h1"] - prob) <= Z * math.sqrt(prob * (1 - prob) / m) + 1e-12


# --- 2. asymmetry -----------------------------------------------------------------------------


def test_fair_against_double_headed_is_infinite_and_the_reverse_is_log_2(drive):
    out = drive("asymmetry_view", eps=1e-3)
    assert out["kl_fair_double"] == math.inf  # infinity itself, not a large finite number
    assert out["kl_double_fair"] == pytest.approx(math.log(2), abs=1e-12)


@pytest.mark.parametrize("eps", [0.3, 1e-3, 1e-8, 1e-12, 1e-15])
def test_a_near_double_headed_coin_one_kl_grows_without_bound_the_other_tends_to_log_2(drive, eps):
    out = drive("asymmetry_view", eps=eps)
    e = out["eps"]
    assert e == pytest.approx(eps, rel=1e-6)
    fair_near = 0.5 * math.log(0.5 / (1 - e)) + 0.5 * math.log(0.5 / e)
    near_fair = (1 - e) * math.log(2 * (1 - e)) + e * math.log(2 * e)
    assert out["kl_fair_near"] == pytest.approx(fair_near, rel=1e-9)
    assert out["kl_near_fair"] == pytest.approx(near_fair, rel=1e-9)
    # KL(fair || 1 - eps) = log(1 / (4 eps (1 - eps))) / 2 >= log(1 / (4 eps)) / 2, and
    # KL(1 - eps || fair) - log 2 = (1 - eps) log(1 - eps) + eps log eps, at most
    # eps (1 + |log eps|) in size (plus the float64 rounding of a dozen operations near 1)
    assert out["kl_fair_near"] >= 0.5 * math.log(1 / (4 * e)) - 1e-12
    assert abs(out["kl_near_fair"] - math.log(2)) <= e * (1 + abs(math.log(e))) + 1e-14
    assert out["kl_fair_double"] == math.inf


def test_the_growing_direction_is_unbounded_as_eps_shrinks(drive):
    values = [drive("asymmetry_view", eps=e)["kl_fair_near"] for e in (1e-2, 1e-6, 1e-10, 1e-15)]
    assert all(b > a + 1.9 for a, b in itertools.pairwise(values))
    assert values[-1] > 16.5  # log(1 / (4e-15)) / 2 = 16.58


# --- 3. the Gaussian shell --------------------------------------------------------------------

SHELLS = [(1, 0.5), (2, 1.0), (10, 3.0), (100, 9.0), (100, 5.0), (1000, 31.0), (1000, 32.0)]


def chi_raw_moment(d, k):
    """E||z||^k for z ~ N(0, I_d): 2^(k/2) Gamma((d + k)/2) / Gamma(d/2)."""
    return math.exp(k / 2 * math.log(2) + math.lgamma((d + k) / 2) - math.lgamma(d / 2))


@pytest.mark.parametrize("d, r", SHELLS)
def test_shell_radius_against_the_chi_distribution(drive, d, r):
    out = drive("shell_view", d=d, radius=r)
    n = out["samples"]
    mean = chi_raw_moment(d, 1)  # sqrt(2) Gamma((d+1)/2) / Gamma(d/2)
    var = d - mean**2  # E||z||^2 = d
    m3, m4 = chi_raw_moment(d, 3), d * (d + 2)
    mu4 = m4 - 4 * mean * m3 + 6 * mean**2 * d - 3 * mean**4  # central fourth moment
    assert abs(out["mean_radius"] - mean) <= Z * math.sqrt(var / n)
    sd_se = math.sqrt((mu4 - var**2) / n) / (2 * math.sqrt(var))
    assert abs(out["sd_radius"] - math.sqrt(var)) <= Z * sd_se
    assert out["se_mean_radius"] == pytest.approx(out["sd_radius"] / math.sqrt(n), rel=1e-12)
    # ||z||^2 ~ chi^2_d: mean d, variance 2d
    assert abs(out["mean_sq_radius"] - d) <= Z * math.sqrt(2 * d / n)
    assert out["sqrt_d"] == pytest.approx(math.sqrt(d), rel=1e-15)
    assert out["relative_width_asymptotic"] == pytest.approx(1 / math.sqrt(2 * d), rel=1e-15)
    assert out["relative_width"] == pytest.approx(out["sd_radius"] / out["mean_radius"], rel=1e-12)
    # the fraction within r: P(chi^2_d <= r^2), a binomial proportion of n samples
    prob = stats.chi2.cdf(r**2, d)
    assert out["exact_fraction_within"] == pytest.approx(prob, rel=1e-8, abs=1e-15)
    assert abs(out["fraction_within"] - prob) <= Z * math.sqrt(prob * (1 - prob) / n) + 1e-12
    # log N(0; 0, I) - log N(z; 0, I) = ||z||^2 / 2, and ||z|| = sqrt(d) on the shell
    assert out["log_density_origin_minus_shell"] == pytest.approx(d / 2, rel=1e-12)


def test_the_shell_thins_like_one_over_sqrt_2d(drive):
    d = 1000
    out = drive("shell_view", d=d, radius=31.0)
    n, mean = out["samples"], chi_raw_moment(d, 1)
    var = d - mean**2
    sd = math.sqrt(var)
    assert sd / mean == pytest.approx(1 / math.sqrt(2 * d), rel=1e-3)  # the exact chi ratio
    # the sampled ratio s / m: its error is at most |s - sd| / mean + sd |m - mean| / mean^2
    # to first order, each term bounded by Z of its s.e. (as in the test above)
    mu4 = d * (d + 2) - 4 * mean * chi_raw_moment(d, 3) + 6 * mean**2 * d - 3 * mean**4
    sd_se = math.sqrt((mu4 - var**2) / n) / (2 * sd)
    bound = Z * (sd_se / mean + sd * math.sqrt(var / n) / mean**2)
    assert abs(out["relative_width"] - sd / mean) <= bound


def test_at_d_100_no_sample_is_near_the_densest_point(drive):
    out = drive("shell_view", d=100, radius=5.0)
    assert out["fraction_within"] == 0.0  # P = 1e-11 per sample, 2000 samples
    assert out["log_density_origin_minus_shell"] == pytest.approx(50.0, rel=1e-12)


# --- 4. the data processing inequality --------------------------------------------------------

P_TOY = (0.5, (0.2, 0.8))  # the binary toy's defaults, the view's p


def toy_tables(prior, decoder):
    """{(x, z): p(x, z)}, {x: p(x)}, {x: p(z=1 | x)} of the binary toy, by hand."""
    pz = {0: 1 - prior, 1: prior}
    px1 = {0: decoder[0], 1: decoder[1]}
    joint = {(x, z): pz[z] * (px1[z] if x else 1 - px1[z]) for x in (0, 1) for z in (0, 1)}
    marginal = {x: joint[(x, 0)] + joint[(x, 1)] for x in (0, 1)}
    posterior = {x: joint[(x, 1)] / marginal[x] for x in (0, 1)}
    return joint, marginal, posterior


def table_kl(p, q):
    return sum(v * math.log(v / q[k]) for k, v in p.items() if v > 0)


TOYS = [(0.3, 0.1, 0.7), (0.5, 0.8, 0.2), (0.9, 0.5, 0.55), (0.05, 0.95, 0.01), (0.5, 0.2, 0.8)]


@pytest.mark.parametrize("prior, d0, d1", TOYS)
def test_dpi_on_the_binary_toy(drive, prior, d0, d1):
    out = drive("dpi_toy_view", prior=prior, decoder0=d0, decoder1=d1)
    jp, mp, postp = toy_tables(*P_TOY)
    jq, mq, postq = toy_tables(prior, (d0, d1))
    joint, marginal = table_kl(jp, jq), table_kl(mp, mq)
    conditional = sum(mp[x] * bernoulli_kl(postp[x], postq[x]) for x in (0, 1))
    assert out["joint_kl"] == pytest.approx(joint, abs=F32)
    assert out["marginal_kl"] == pytest.approx(marginal, abs=F32)
    assert out["difference"] == pytest.approx(out["joint_kl"] - out["marginal_kl"], abs=1e-12)
    assert out["difference"] == pytest.approx(conditional, abs=F32)
    assert out["expected_conditional_kl"] == pytest.approx(conditional, abs=F32)
    assert out["difference"] >= 0.0


def test_swapped_labels_same_marginal_different_joint(drive):
    out = drive("dpi_toy_view", prior=0.5, decoder0=0.8, decoder1=0.2)
    assert out["marginal_kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["joint_kl"] == pytest.approx(0.6 * math.log(4), abs=F32)  # 2 x 0.3 log(0.4/0.1)


def test_identical_models_are_indistinguishable(drive):
    out = drive("dpi_toy_view", prior=0.5, decoder0=0.2, decoder1=0.8)
    assert out["joint_kl"] == 0.0 and out["marginal_kl"] == 0.0 and out["difference"] == 0.0


P_GAUSS = (1.0, 0.0, 0.5)  # (w, b, sigma) of the view's p


def gaussian_kl(mu_p, cov_p, mu_q, cov_q):
    """KL(N(mu_p, cov_p) || N(mu_q, cov_q)), the closed form written with numpy."""
    inv = np.linalg.inv(cov_q)
    diff = mu_q - mu_p
    _, logdet_p = np.linalg.slogdet(cov_p)
    _, logdet_q = np.linalg.slogdet(cov_q)
    return 0.5 * (np.trace(inv @ cov_p) + diff @ inv @ diff - len(mu_p) + logdet_q - logdet_p)


def gauss_joint(w, b, sigma):
    """Mean and covariance of (x, z) with z ~ N(0, 1), x | z ~ N(w z + b, sigma^2)."""
    return np.array([b, 0.0]), np.array([[w * w + sigma**2, w], [w, 1.0]])


def gauss_conditional_kl(p, q):
    """E_p(x) KL(p(z | x) || q(z | x)): the posteriors are N(k (x - b), s2) with
    k = w / (w^2 + sigma^2), s2 = sigma^2 / (w^2 + sigma^2); x ~ N(b_p, w_p^2 + sigma_p^2)."""
    (wp, bp, sp), (wq, bq, sq) = p, q
    kp, kq = wp / (wp**2 + sp**2), wq / (wq**2 + sq**2)
    s2p, s2q = sp**2 / (wp**2 + sp**2), sq**2 / (wq**2 + sq**2)
    vp = wp**2 + sp**2
    mean_sq_gap = (kp - kq) ** 2 * vp + (kq * (bq - bp)) ** 2  # E[(m_p(x) - m_q(x))^2]
    return 0.5 * math.log(s2q / s2p) + (s2p + mean_sq_gap) / (2 * s2q) - 0.5


GAUSSES = [(0.5, 0.5, 1.0), (-1.0, 0.0, 0.5), (2.0, -2.0, 0.1), (0.05, 1.0, 2.0), (1.0, 0.0, 0.5)]


@pytest.mark.parametrize("w, b, sigma", GAUSSES)
def test_dpi_on_the_linear_gaussian_pair(drive, w, b, sigma):
    out = drive("dpi_gauss_view", w=w, b=b, sigma=sigma)
    mp, cp = gauss_joint(*P_GAUSS)
    mq, cq = gauss_joint(w, b, sigma)
    joint = gaussian_kl(mp, cp, mq, cq)
    marginal = gaussian_kl(mp[:1], cp[:1, :1], mq[:1], cq[:1, :1])
    conditional = gauss_conditional_kl(P_GAUSS, (w, b, sigma))
    assert out["joint_kl"] == pytest.approx(joint, rel=1e-9, abs=1e-12)
    assert out["marginal_kl"] == pytest.approx(marginal, rel=1e-9, abs=1e-12)
    assert out["difference"] == pytest.approx(conditional, rel=1e-8, abs=1e-12)
    assert out["expected_conditional_kl"] == pytest.approx(conditional, rel=1e-9, abs=1e-12)
    assert out["difference"] >= -1e-12 and conditional >= 0
    assert out["model_mismatch"] < 1e-12  # the closed forms are the library model's (relative)


def test_a_sign_flipped_loading_hides_from_the_marginal_only(drive):
    out = drive("dpi_gauss_view", w=-1.0, b=0.0, sigma=0.5)
    assert out["marginal_kl"] == pytest.approx(0.0, abs=1e-12)
    assert out["joint_kl"] > 1.0


# --- 5. the ELBO as distortion + rate ---------------------------------------------------------

ELBOS = [(0.3, 0.7, 0.7), (0.2, 0.8, 0.5), (0.9, 0.05, 0.2), (0.5, 0.5, 0.99), (0.01, 0.99, 0.4)]


def decomposition_by_hand(q0, q1, p_data1):
    joint, marginal, posterior = toy_tables(*P_TOY)
    prior = P_TOY[0]
    data = {0: 1 - p_data1, 1: p_data1}
    q = {0: q0, 1: q1}
    out = dict.fromkeys(("D", "R", "H", "kl_data", "kl_post", "joint_kl"), 0.0)
    for x, w in data.items():
        qz = {1: q[x], 0: 1 - q[x]}
        pz = {1: prior, 0: 1 - prior}
        out["D"] += w * sum(-qz[z] * math.log(joint[(x, z)] / pz[z]) for z in (0, 1))
        out["R"] += w * sum(qz[z] * math.log(qz[z] / pz[z]) for z in (0, 1))
        out["H"] -= w * math.log(w)
        out["kl_data"] += w * math.log(w / marginal[x])
        out["kl_post"] += w * bernoulli_kl(q[x], posterior[x])
        out["joint_kl"] += sum(w * qz[z] * math.log(w * qz[z] / joint[(x, z)]) for z in (0, 1))
    return out


@pytest.mark.parametrize("q0, q1, p_data1", ELBOS)
def test_elbo_is_distortion_plus_rate_and_entropy_plus_two_kls(drive, q0, q1, p_data1):
    out = drive("elbo_view", q0=q0, q1=q1, p_data1=p_data1)
    want = decomposition_by_hand(q0, q1, p_data1)
    assert out["distortion"] == pytest.approx(want["D"], abs=F32)
    assert out["rate"] == pytest.approx(want["R"], abs=F32)
    assert out["entropy"] == pytest.approx(want["H"], abs=1e-12)
    assert out["kl_data_model"] == pytest.approx(want["kl_data"], abs=F32)
    assert out["kl_q_posterior"] == pytest.approx(want["kl_post"], abs=F32)
    assert out["neg_elbo"] == pytest.approx(want["D"] + want["R"], abs=F32)
    # the decomposition sums to -E[ELBO] (the two sides come from different library routines)
    assert out["sum"] == pytest.approx(out["neg_elbo"], abs=1e-6)
    assert out["joint_kl"] == pytest.approx(want["joint_kl"], abs=F32)
    assert out["joint_kl"] >= out["kl_data_model"] - 1e-6  # the DPI again


def test_the_right_model_and_encoder_sit_on_the_entropy_floor(drive):
    out = drive("elbo_view", q0=0.2, q1=0.8, p_data1=0.5)
    assert out["kl_q_posterior"] == pytest.approx(0.0, abs=1e-6)
    assert out["kl_data_model"] == pytest.approx(0.0, abs=1e-6)
    assert out["neg_elbo"] == pytest.approx(math.log(2), abs=1e-6)


# --- every view was driven --------------------------------------------------------------------


def test_every_view_was_driven(drive):
    assert drive.undriven() == []
