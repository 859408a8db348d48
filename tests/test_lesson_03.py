"""Lesson 03, one sample is enough: the notebook's gradient estimator and both of its views,
checked against closed-form variances written here by hand and against gradients recomputed
here with Pyro's Trace_ELBO from the same seeds.

Sampled numbers are checked with |estimate - truth| <= Z_BOUND * s.e., a two-sided normal
tail of 7e-6 per check. Where the estimate is the sample variance of R normal draws its s.e.
is variance * sqrt(2 / (R - 1)) (the chi-square's spread: Var(s^2) = 2 sigma^4 / (R - 1));
for R = 300 the exact chi-square tails beyond 4.5 s.e. hold 1e-7 below and 2.4e-5 above.
Elsewhere the s.e. is the notebook's (from the spread of its squared deviations) or the one
derived here from exact moments. Seeds are fixed, so every run draws the same numbers.
"""

import functools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from lessons import Driver, run_notebook
from numpy.polynomial import polynomial as P
from pyro.infer import Trace_ELBO

from ppl_vae import VAEConfig, build_vae, load

NOTEBOOK = "03_one_sample_is_enough.ipynb"
Z_BOUND = 4.5


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    return run_notebook(NOTEBOOK, tmp_path_factory.mktemp("lesson_03"))


@pytest.fixture(scope="module")
def drive(namespace):
    return Driver(namespace)


# -- 1. the estimator on a linear-Gaussian pair with a closed-form variance -----------------
#
# p(z) = N(0, 1), p(x | z) = N(z, 1); q(z | x) = N(a x + m, s^2). With z = a x + m + s eps the
# per-image loss is z^2/2 + (x - z)^2/2 + log q(z) + const, and log q(z) = -eps^2/2 - log s
# - const does not move with m, so one sample's gradient in m is 2 z - x = (2a - 1) x + 2m
# + 2 s eps: linear in eps. Averaged over K samples and over B images drawn without
# replacement from N, Var = (2a - 1)^2 sigma_x^2 (N - B) / ((N - 1) B) + 4 s^2 / (B K), with
# sigma_x^2 the population variance of the N data. With a = 1/2 only 4 s^2 / (B K) is left
# and the estimate is exactly normal.

LG_N, LG_M, LG_S, LG_R = 50, 0.3, 0.5, 300


def lg_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[:, 0])


def lg_guide(x, *, a, m, s):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(a * x[:, 0] + m, s))


def lg_data():
    return torch.randn(LG_N, 1, generator=torch.Generator().manual_seed(5))


def lg_variance(a, x, B, K):
    """The closed form above."""
    n = len(x)
    pop = float(((x - x.mean()) ** 2).mean())
    return (2 * a - 1) ** 2 * pop * (n - B) / ((n - 1) * B) + 4 * LG_S**2 / (B * K)


def lg_estimates(namespace, a, B, K, seed):
    m = torch.tensor(LG_M, requires_grad=True)
    guide = functools.partial(lg_guide, a=a, m=m, s=LG_S)
    G = namespace["gradient_estimates"](lg_model, guide, lg_data(), [m], B, K, LG_R, seed)
    assert G.shape == (LG_R, 1)
    return G


@pytest.mark.parametrize("B, K", [(1, 1), (1, 8), (4, 2), (5, 10)])
def test_the_estimator_variance_is_the_closed_form_over_b_k(namespace, B, K):
    # a = 1/2: the gradient is 2m + 2s mean(eps), normal, variance 4 s^2 / (B K).
    G = lg_estimates(namespace, 0.5, B, K, seed=10 * B + K)
    v, se = namespace["total_variance"](G)
    truth = lg_variance(0.5, lg_data(), B, K)
    assert truth == pytest.approx(4 * LG_S**2 / (B * K))
    assert abs(v - truth) <= Z_BOUND * truth * math.sqrt(2 / (LG_R - 1)), (v, truth)
    assert float(G.mean()) == pytest.approx(2 * LG_M, abs=Z_BOUND * math.sqrt(truth / LG_R))
    # The reported s.e. estimates truth * sqrt(2 / (R - 1)); its own relative spread is
    # sqrt(mu4 - mu2^2) / (2 mu2 sqrt(R)) = sqrt(56) / (4 sqrt(300)) = 0.11 for a chi-square_1.
    assert se / (truth * math.sqrt(2 / (LG_R - 1))) == pytest.approx(1, abs=Z_BOUND * 0.11)


@pytest.mark.parametrize("B, K", [(1, 1), (4, 4), (LG_N, 1)])
def test_the_estimator_draws_images_without_replacement(namespace, B, K):
    # a = 3/2: the images' spread enters with the finite-population factor (N - B) / (N - 1);
    # at B = N it vanishes (with replacement it would be 4 sigma_x^2 / N, five times the rest).
    G = lg_estimates(namespace, 1.5, B, K, seed=100 + B + K)
    v, se = namespace["total_variance"](G)
    truth = lg_variance(1.5, lg_data(), B, K)
    assert abs(v - truth) <= Z_BOUND * se, (v, se, truth)


# -- 2. the VAE grid: slope -1 in B K at fixed K, and K = 1 wins at a fixed budget -----------


def _slope(rows):
    """Weighted least squares of log V on log(B K), weights 1 / s.e.(log V)^2 = (V / se)^2."""
    x = np.log([r["B"] * r["K"] for r in rows])
    y = np.log([r["variance"] for r in rows])
    w = np.array([(r["variance"] / r["stderr"]) ** 2 for r in rows])
    A = np.stack([np.ones_like(x), x], axis=1)
    cov = np.linalg.inv(A.T @ (w[:, None] * A))
    coef = cov @ A.T @ (w * y)
    return coef[1], math.sqrt(cov[1, 1])


@pytest.mark.parametrize("K", [1, 4, 16])
@pytest.mark.parametrize("layer", ["decoder's last layer", "encoder's last layer"])
def test_the_variance_falls_as_one_over_b_k_at_fixed_k(namespace, layer, K):
    rows = [r for r in namespace["grid"] if r["layer"] == layer and r["K"] == K]
    assert sorted(r["B"] for r in rows) == [1, 4, 16, 64]
    slope, se = _slope(rows)
    # At fixed K, V = a (N - B) / ((N - 1) B) + b / (B K): slope -1 but for the factor
    # (N - B) / (N - 1), which can tilt it by at most |log((N - 64) / (N - 1))| / log 64.
    n = len(namespace["images"])
    tilt = abs(math.log((n - 64) / (n - 1))) / math.log(64)
    assert abs(slope + 1) <= Z_BOUND * se + tilt, (slope, se, tilt)
    assert namespace["SLOPES"][layer, K][0] == pytest.approx(slope, abs=1e-9)


def test_at_a_fixed_budget_one_sample_per_image_has_the_least_variance(namespace):
    rows = {(r["B"], r["K"]): r for r in namespace["grid"] if r["layer"] == "decoder's last layer"}
    for budget in (16, 64):
        one, many = rows[budget, 1], rows[budget // 16, 16]
        gap = many["variance"] - one["variance"]
        assert gap > Z_BOUND * math.hypot(one["stderr"], many["stderr"]), (budget, one, many)


def _law_fit(namespace, layer):
    """The law's coefficients as the notebook holds them, and their covariance under
    weighted least squares with the grid's s.e. (how uncertain the law's prediction is)."""
    n = len(namespace["images"])
    rows = [r for r in namespace["grid"] if r["layer"] == layer]
    B = np.array([r["B"] for r in rows], float)
    K = np.array([r["K"] for r in rows], float)
    X = np.stack([(n - B) / ((n - 1) * B), 1 / (B * K)], axis=1)
    se = np.array([r["stderr"] for r in rows])
    return np.asarray(namespace["LAW"][layer]), np.linalg.inv(X.T @ (X / se[:, None] ** 2)), rows


@pytest.mark.parametrize("layer", ["decoder's last layer", "encoder's last layer"])
def test_the_fitted_law_goes_through_every_grid_point(namespace, layer):
    coef, _, rows = _law_fit(namespace, layer)
    n = len(namespace["images"])
    assert (coef >= 0).all()
    for r in rows:
        law = coef[0] * (n - r["B"]) / ((n - 1) * r["B"]) + coef[1] / (r["B"] * r["K"])
        assert abs(r["variance"] - law) <= Z_BOUND * r["stderr"], (r, law)


# -- 3. the view at one (B, K): recomputed here from the same seeds --------------------------


@pytest.fixture(scope="module")
def own_vae(namespace):
    """The lesson's VAE rebuilt here from its seed, and the data loaded here."""
    images = load("digits", binarize="static").train.images
    config = VAEConfig(
        dataset="digits", binarize="static", z_dim=2, hidden=(32,), image_shape=(1, 8, 8)
    )
    pyro.set_rng_seed(0)
    vae = build_vae(config)
    theirs = namespace["vae"]
    for mine, nb in ((vae.encoder, theirs.encoder), (vae.decoder, theirs.decoder)):
        for (k, a), (_, b) in zip(mine.state_dict().items(), nb.state_dict().items(), strict=True):
            assert torch.equal(a, b), k  # the notebook measures the untrained seeded VAE
    assert torch.equal(images, namespace["images"])
    heads = {"decoder's last layer": vae.decoder.head, "encoder's last layer": vae.encoder.head}
    return vae, images, heads


def _own_gradients(vae, images, head, B, K, R, seed):
    """R gradients of the per-image mean loss, each on B images drawn by torch.randperm, as the
    notebook says it draws them, then Trace_ELBO's noise; through backward() and .grad."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    elbo = Trace_ELBO(num_particles=K, vectorize_particles=True, max_plate_nesting=1)
    out = []
    for _ in range(R):
        x = images[torch.randperm(len(images))[:B]]
        vae.encoder.zero_grad()
        vae.decoder.zero_grad()
        (elbo.differentiable_loss(vae.model, vae.guide, x) / B).backward()
        out.append(np.concatenate([head.weight.grad.numpy().ravel(), head.bias.grad.numpy()]))
    return np.array(out, dtype=np.float64)


@functools.cache
def _full_gradient_norm(vae, images, head):
    return np.linalg.norm(_own_gradients(vae, images, head, len(images), 64, 1, seed=77)[0])


def full_gradient_norm(own_vae, layer):
    vae, images, heads = own_vae
    return _full_gradient_norm(vae, images, heads[layer])


@pytest.mark.parametrize(
    "B, K, layer, R, seed",
    [
        (8, 2, "decoder's last layer", 20, 3),
        (2, 8, "decoder's last layer", 10, 1),
        (32, 1, "encoder's last layer", 20, 2),
        (1, 32, "encoder's last layer", 10, 4),
        (64, 64, "decoder's last layer", 10, 0),
    ],
)
def test_the_variance_view_matches_gradients_recomputed_here(
    drive, namespace, own_vae, B, K, layer, R, seed
):
    out = drive("variance_at", B=B, K=K, layer=layer, R=R, seed=seed)
    assert (out["B"], out["K"], out["layer"], out["R"], out["seed"]) == (B, K, layer, R, seed)
    vae, images, heads = own_vae
    G = _own_gradients(vae, images, heads[layer], B, K, R, seed)
    variance = G.var(axis=0, ddof=1).sum()
    assert out["variance"] == pytest.approx(variance, rel=1e-4)
    spread = ((G - G.mean(0)) ** 2).sum(1) * R / (R - 1)
    assert out["stderr"] == pytest.approx(spread.std(ddof=1) / math.sqrt(R), rel=1e-3)

    # The law's prediction, written out from its two coefficients; the measurement agrees
    # with it within the measurement's s.e. and the law's own (propagated from the grid).
    coef, cov, _ = _law_fit(namespace, layer)
    n = len(images)
    x = np.array([(n - B) / ((n - 1) * B), 1 / (B * K)])
    assert out["predicted"] == pytest.approx(x @ coef, rel=1e-9)
    assert abs(out["variance"] - out["predicted"]) <= Z_BOUND * math.hypot(
        out["stderr"], math.sqrt(x @ cov @ x)
    )
    assert out["z"] == pytest.approx((out["variance"] - out["predicted"]) / out["stderr"])

    # SNR: |full-data gradient| recomputed here on all N images (another seed, K = 64, its
    # noise variance at most sigma2_eps / (64 N) for each of two estimates).
    norm = full_gradient_norm(own_vae, layer)
    noise = math.sqrt(2 * coef[1] / (64 * n))
    assert out["snr"] * math.sqrt(out["variance"]) == pytest.approx(norm, abs=Z_BOUND * noise)
    assert out["snr_stderr"] == pytest.approx(out["snr"] * out["stderr"] / (2 * out["variance"]))


# -- 4. score function against reparameterisation, exact moments -----------------------------
#
# z ~ N(0, 1), x | z ~ N(z, 1), x = 1; q = N(m, s^2); f = log p(x, z) - log q(z). With
# z = m + s eps, f is a quadratic in eps. The reparameterised gradient of -f in m is
# 2z - x. For a sampler without rsample, Trace_ELBO's surrogate is log q(z) * f (z held fixed,
# no entropy term), so one sample's gradient of the loss is -f(z) d log q(z) / dm =
# -f(z) eps / s, a cubic in eps whose moments are sums of E[eps^k] = (k - 1)!! (k even).

X_OBS = 1.0


def gaussian_moment(k):
    return 0.0 if k % 2 else float(np.prod(np.arange(k - 1, 0, -2)))


def expectation(poly):
    return sum(c * gaussian_moment(k) for k, c in enumerate(poly))


def score_polynomial(m, s):
    """-f(m + s eps) eps / s as polynomial coefficients in eps (lowest first)."""
    z = np.array([m, s])  # m + s eps
    log_prior = P.polyadd(-0.5 * P.polymul(z, z), [-0.5 * math.log(2 * math.pi)])
    resid = P.polysub([X_OBS], z)
    log_lik = P.polyadd(-0.5 * P.polymul(resid, resid), [-0.5 * math.log(2 * math.pi)])
    log_q = [-0.5 * math.log(2 * math.pi) - math.log(s), 0.0, -0.5]  # eps = (z - m) / s
    f = P.polysub(P.polyadd(log_prior, log_lik), log_q)
    return -P.polymul(f, [0.0, 1.0 / s])


def mean_of_k_moments(poly, K):
    """Mean, variance and fourth central moment of the average of K draws of poly(eps)."""
    mean = expectation(poly)
    centred = P.polysub(poly, [mean])
    mu2 = expectation(P.polypow(centred, 2))
    mu4 = expectation(P.polypow(centred, 4))
    return mean, mu2 / K, mu4 / K**3 + 3 * (K - 1) * mu2**2 / K**3


def sd_of_sample_variance(mu2, mu4, R):
    """s.d. of the unbiased sample variance of R i.i.d. draws."""
    return math.sqrt((mu4 - mu2**2 * (R - 3) / (R - 1)) / R)


@pytest.mark.parametrize(
    "K, m, s", [(1, 0.0, 1.0), (4, 2.0, 0.5), (16, -1.0, 1.5), (64, 0.5, 0.75), (1, 0.5, 0.25)]
)
def test_score_and_reparam_views_match_exact_moments(drive, K, m, s):
    out = drive("score_vs_reparam", K=K, m=m, s=s)
    R = out["R"]
    exact = 2 * m - X_OBS
    assert out["exact_gradient"] == pytest.approx(exact)

    # Reparameterised: 2(m + s mean(eps)) - x, normal with variance 4 s^2 / K.
    v_rep = 4 * s**2 / K
    assert out["reparam_variance_formula"] == pytest.approx(v_rep)
    assert abs(out["reparam_variance"] - v_rep) <= Z_BOUND * v_rep * math.sqrt(2 / (R - 1))
    assert abs(out["reparam_mean"] - exact) <= Z_BOUND * math.sqrt(v_rep / R)

    # Score function: exact mean (the same gradient), variance, and that variance's s.d.
    mean, mu2, mu4 = mean_of_k_moments(score_polynomial(m, s), K)
    assert mean == pytest.approx(exact)  # the oracle's own check: it is unbiased
    assert abs(out["score_mean"] - exact) <= Z_BOUND * math.sqrt(mu2 / R)
    assert abs(out["score_variance"] - mu2) <= Z_BOUND * sd_of_sample_variance(mu2, mu4, R)
    assert out["ratio"] == pytest.approx(out["score_variance"] / out["reparam_variance"])
    assert mu2 > v_rep  # here the score function is always the noisier one


def test_every_view_was_driven(drive):
    assert drive.undriven() == []
