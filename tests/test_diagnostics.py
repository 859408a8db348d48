"""Diagnostics on cases whose answers are known in closed form: latent codes, rate and
distortion, ELBO surgery, the IWAE curve and the binary toy."""

import math

import numpy as np
import pyro
import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from ppl_vae import elbo_ledger
from ppl_vae.guides import linear_gaussian as lg_guide
from ppl_vae.models import linear_gaussian as lg_model
from ppl_vae.runs import toy_elbo_curve
from ppl_vae.training import History
from ppl_vae.vae import (
    MIN_RATE,
    RateDistortion,
    active_units,
    collapse_warning,
    elbo_surgery,
    iwae_curve,
    kl_per_dimension,
    posterior_moments,
    rate_distortion,
)

N, D, Z = 200, 6, 3


class ConstantEncoder(nn.Module):
    """A collapsed encoder: q(z | x) = N(c, s^2 I) whatever x is."""

    def __init__(self, c: torch.Tensor, log_var: torch.Tensor) -> None:
        super().__init__()
        self.c, self.log_var = c, log_var

    def forward(self, x):
        shape = (*x.shape[:-1], self.c.shape[0])
        return self.c.expand(shape), self.log_var.expand(shape)


class LinearEncoder(nn.Module):
    """mu = x @ A, log_var fixed: Cov_x(mu_u) = (A^T Cov(x) A)_uu."""

    def __init__(self, A: torch.Tensor, log_var: float = -2.0) -> None:
        super().__init__()
        self.A, self.log_var = A, log_var

    def forward(self, x):
        mu = x @ self.A
        return mu, torch.full_like(mu, self.log_var)


@pytest.fixture
def x():
    return torch.randn(N, D, generator=torch.Generator().manual_seed(3))


def test_collapsed_encoder_has_no_active_units_and_closed_form_kl(x):
    c = torch.tensor([0.0, 0.5, -1.0])
    log_var = torch.tensor([0.0, -1.0, 0.7])
    mu, lv = posterior_moments(ConstantEncoder(c, log_var), x, batch_size=64)
    assert mu.shape == lv.shape == (N, Z)
    count, activity = active_units(mu)
    assert count == 0
    assert torch.allclose(activity, torch.zeros(Z))
    sigma2 = log_var.exp()
    expected = 0.5 * (c**2 + sigma2 - log_var - 1.0)
    assert torch.allclose(kl_per_dimension(mu, lv), expected, atol=1e-6)
    # The first dimension is the prior itself: KL exactly 0.
    assert float(kl_per_dimension(mu, lv)[0]) == pytest.approx(0.0, abs=1e-7)


def test_activity_of_a_linear_encoder_is_the_covariance_of_its_mean(x):
    A = torch.tensor([[1.0, 0.0, 0.05], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]] + [[0.0] * Z] * (D - 3))
    count, activity = active_units(LinearEncoder(A)(x)[0])
    expected = np.cov((x @ A).numpy().T).diagonal()  # ddof = 1, as Burda et al.'s Cov_x
    assert np.allclose(activity.numpy(), expected, rtol=1e-5, atol=1e-8)
    # Unit 0 ~ (1.25 Var x), unit 1 identically 0, unit 2 ~ 0.0025 < 0.01: one active unit.
    assert count == 1
    assert active_units(LinearEncoder(A)(x)[0], threshold=1e-4)[0] == 2


def test_kl_per_dimension_matches_torch_kl_divergence():
    generator = torch.Generator().manual_seed(4)
    mu = 2 * torch.randn(50, Z, generator=generator)
    log_var = torch.randn(50, Z, generator=generator)
    q = Normal(mu, (0.5 * log_var).exp())
    expected = kl_divergence(q, Normal(0.0, 1.0)).mean(0)
    assert torch.allclose(kl_per_dimension(mu, log_var), expected, atol=1e-5)


def test_posterior_moments_batches_agree_with_one_pass(x):
    encoder = LinearEncoder(torch.randn(D, Z, generator=torch.Generator().manual_seed(5)))
    mu_1, lv_1 = posterior_moments(encoder, x, batch_size=7)
    mu_2, lv_2 = posterior_moments(encoder, x, batch_size=N)
    assert torch.allclose(mu_1, mu_2, atol=1e-6) and torch.allclose(lv_1, lv_2)
    assert torch.allclose(mu_1, x @ encoder.A, atol=1e-6)


def test_collapse_warning_fires_for_a_collapsed_encoder_only(x):
    collapsed = ConstantEncoder(torch.zeros(Z), torch.full((Z,), -1e-3))
    mu, lv = posterior_moments(collapsed, x)
    rate = float(kl_per_dimension(mu, lv).sum())
    assert rate < MIN_RATE
    message = collapse_warning(rate, active_units(mu)[0])
    assert message is not None and "collapse" in message and "0 active" in message

    A = torch.eye(D, Z)
    mu, lv = posterior_moments(LinearEncoder(A), x)
    rate = float(kl_per_dimension(mu, lv).sum())
    assert rate > 1.0
    assert collapse_warning(rate, active_units(mu)[0]) is None
    # Either condition alone fires.
    assert "rate" in collapse_warning(0.01, Z)
    assert "active" in collapse_warning(5.0, 0)
    assert collapse_warning(5.0, 1, min_active=2) is not None


def test_diagnostics_refuse_shapes_they_cannot_use():
    with pytest.raises(ValueError, match="N >= 2"):
        active_units(torch.zeros(1, Z))
    with pytest.raises(ValueError, match="mu and log_var"):
        kl_per_dimension(torch.zeros(4, Z), torch.zeros(4, Z + 1))
    assert math.isfinite(float(kl_per_dimension(torch.zeros(4, Z), torch.zeros(4, Z)).sum()))


# --------------------------------------------------------------------------------------------
# Rate and distortion
# --------------------------------------------------------------------------------------------


def _linear_gaussian_problem(n: int = 40):
    """PPCA with orthogonal loadings, data and an imperfect linear guide q(z | x)."""
    generator = torch.Generator().manual_seed(11)
    W = torch.linalg.qr(torch.randn(5, 2, generator=generator))[0] * torch.tensor([2.0, 0.7])
    b = torch.randn(5, generator=generator)
    sigma = 0.5
    data = torch.randn(n, 5, generator=generator) * 1.5 + b
    A, c, scale = lg_guide.optimal_params(W, b, sigma)
    return W, b, sigma, data, 0.8 * A, c + 0.1, 1.3 * scale


def test_linear_gaussian_rate_and_distortion_are_closed_form():
    W, b, sigma, data, A, c, scale = _linear_gaussian_problem()
    lg_guide.set_params(A, c, scale)
    ledger = elbo_ledger(
        lg_model.model, lg_guide.guide, data, W, b, sigma, exact=False, num_particles=4000
    )
    point = rate_distortion(ledger, n_items=data.shape[0])
    # R = E_x KL(N(A x + c, diag(s^2)) || N(0, I)), closed form.
    mean = data @ A.T + c
    expected_rate = float(kl_divergence(Normal(mean, scale), Normal(0.0, 1.0)).sum(-1).mean())
    assert point.rate == pytest.approx(expected_rate, rel=1e-5)
    mu, log_var = posterior_moments(
        lambda x: (x @ A.T + c, (2 * scale.log()).expand(len(x), 2)), data
    )
    assert float(kl_per_dimension(mu, log_var).sum()) == pytest.approx(expected_rate, rel=1e-5)
    # D = E_x E_q[-log N(x; W z + b, sigma^2 I)] = D/2 log(2 pi sigma^2)
    #     + (|x - W m - b|^2 + sum_u s_u^2 |W_u|^2) / (2 sigma^2).
    residual = (data - mean @ W.T - b).square().sum(-1)
    trace = float((scale.square() * W.square().sum(0)).sum())
    expected_distortion = float(
        5 / 2 * math.log(2 * math.pi * sigma**2) + ((residual + trace) / (2 * sigma**2)).mean()
    )
    se = ledger.term("x").stderr / data.shape[0]
    assert point.distortion == pytest.approx(expected_distortion, abs=4 * se + 1e-4)
    assert point.elbo == pytest.approx(ledger.elbo / data.shape[0], abs=1e-4)
    assert point.objective(2.0) == pytest.approx(-(point.distortion + 2 * point.rate))


def test_rate_distortion_reads_histories_evaluations_and_json():
    rows = [
        {"epoch": 1, "step": 10, "beta": 0.5, "val_kl": 2.0, "val_reconstruction": -30.0},
        {"epoch": 2, "step": 20, "beta": 1.0, "val_kl": 3.0, "val_reconstruction": -25.0},
    ]
    points = rate_distortion(History(rows=rows))
    assert [(p.rate, p.distortion, p.epoch, p.step, p.beta) for p in points] == [
        (2.0, 30.0, 1, 10, 0.5),
        (3.0, 25.0, 2, 20, 1.0),
    ]
    assert points[1].elbo == -28.0
    assert rate_distortion(rows) == points
    assert rate_distortion({"rate": 1.5, "distortion": 20.0}) == RateDistortion(1.5, 20.0)
    assert rate_distortion({"kl": 1.5, "reconstruction": -20.0}) == RateDistortion(1.5, 20.0)

    class Result:  # an Evaluation's per-image terms
        kl, reconstruction = 4.0, -50.0

    assert rate_distortion(Result()).elbo == -54.0
    with pytest.raises(ValueError, match="no validation"):
        rate_distortion([{"epoch": 1, "val_kl": None, "val_reconstruction": None}])
    with pytest.raises(ValueError, match="rate"):
        rate_distortion({"elbo": -3.0})


# --------------------------------------------------------------------------------------------
# ELBO surgery
# --------------------------------------------------------------------------------------------


def test_surgery_of_a_collapsed_encoder_has_zero_mutual_information(x):
    c = torch.tensor([0.0, 0.5, -1.0])
    log_var = torch.tensor([0.0, -1.0, 0.7])
    mu, lv = posterior_moments(ConstantEncoder(c, log_var), x)
    surgery = elbo_surgery(mu, lv, num_samples=3)
    # q(z | x_n) = q(z) for every n: each term log q(z|x_n) - log q(z) is exactly 0 (up to
    # float64 rounding of log-densities of size ~10: 1e-9 is generous).
    assert surgery.mutual_info == pytest.approx(0.0, abs=1e-9)
    # Both KLs are then that of N(c, diag(e^lv)) to N(0, I), written out here.
    closed_form = float((0.5 * (c**2 + log_var.exp() - log_var - 1.0)).sum())
    assert surgery.avg_kl == pytest.approx(closed_form, rel=1e-6)
    assert surgery.marginal_kl == pytest.approx(closed_form, rel=1e-6)
    assert "I_q(x; z)" in str(surgery)


def _aggregate_posterior_reference(mu, scale, pad=8.0, points_per_sd=3):
    """Quadrature, independent of the library, for q(z | x_n) = N(mu_n, diag(scale^2)) and
    the aggregate posterior q_N(z) = (1/N) sum_n q(z | x_n) of these N rows (float64):

    (I, var, kl): I = (1/N) sum_n E_{q(z|x_n)}[t_n], t_n = log q(z|x_n) - log q_N(z), the
    mutual information of the finite set; var[n] = Var_{q(z|x_n)}(t_n); kl = KL(q_N || N(0, I)).

    Trapezoid rule on a product grid, ``points_per_sd`` nodes per smallest posterior s.d.,
    ``pad`` s.d. beyond the extreme means (mass outside < 1e-14). The integrands are smooth
    (analytic in a strip of width ~ s.d.), where the trapezoid rule converges geometrically:
    refining the grid to 8 nodes per s.d. and 11 s.d. changes I and kl by ~3e-14.
    """
    axes = []
    for u in range(mu.shape[1]):
        sd = float(scale[u])
        lo, hi = float(mu[:, u].min()) - pad * sd, float(mu[:, u].max()) + pad * sd
        nodes = math.ceil((hi - lo) * points_per_sd / sd) + 1
        axes.append(torch.linspace(lo, hi, nodes, dtype=torch.float64))
    grid = torch.cartesian_prod(*axes)  # (G, d)
    cell = math.prod(float(a[1] - a[0]) for a in axes)
    # log N(z; mu_n, diag(scale^2)) for every row n and node z: (N, G)
    log_q = -0.5 * (((grid - mu[:, None, :]) / scale) ** 2).sum(-1) - (
        scale.log().sum() + 0.5 * mu.shape[1] * math.log(2 * math.pi)
    )
    log_agg = torch.logsumexp(log_q, dim=0) - math.log(mu.shape[0])  # (G,)
    weight = log_q.exp() * cell  # quadrature weights of each q(z | x_n)
    assert float((weight.sum(1) - 1).abs().max()) < 1e-9  # the grid holds every q(z | x_n)
    t = log_q - log_agg
    mean_t = (weight * t).sum(1)
    var_t = (weight * t**2).sum(1) - mean_t**2
    log_prior = -0.5 * (grid**2).sum(-1) - 0.5 * mu.shape[1] * math.log(2 * math.pi)
    kl = float((log_agg.exp() * cell * (log_agg - log_prior)).sum())
    return float(mean_t.mean()), var_t, kl


def test_surgery_of_a_linear_gaussian_encoder_matches_independent_references():
    # The PPCA guide q(z | x) = N(A x + c, diag(s^2)) on N = 400 rows x ~ N(b, 1.5^2 I): each
    # term against a reference computed here, not from the library's formulas.
    _, b, _, _, A, c, scale = _linear_gaussian_problem()
    generator = torch.Generator().manual_seed(12)
    n, samples = 400, 50
    data = 1.5 * torch.randn(n, 5, generator=generator, dtype=torch.float64) + b.double()
    mu = data @ A.double().T + c.double()
    s = scale.double()
    surgery = elbo_surgery(mu, (2 * s.log()).expand_as(mu), num_samples=samples, seed=0)
    assert surgery.n_images == n and surgery.num_samples == samples

    # E_x KL(q(z|x) || p(z)): torch's Gaussian KL, rows averaged (exact to rounding).
    rate = float(kl_divergence(Normal(mu, s), Normal(0.0, 1.0)).sum(-1).mean())
    assert surgery.avg_kl == pytest.approx(rate, rel=1e-10)

    # I_q(x; z) and KL(q_N(z) || p(z)) of the finite set's aggregate posterior q_N, by
    # quadrature. The library averages t_n(z) over N S independent draws z ~ q(z | x_n), so
    # its standard deviation is sqrt(sum_n Var_n(t_n) / S) / N, Var_n by the same
    # quadrature: |error| < 4 s.d. fails with probability < 1e-4 (a mean of 20000 terms).
    mi, var_t, marginal = _aggregate_posterior_reference(mu, s)
    sd = math.sqrt(float(var_t.sum()) / samples) / n
    assert sd < 0.01  # a sharp test: I ~ 1.3 nats
    assert abs(surgery.mutual_info - mi) < 4 * sd, (surgery.mutual_info, mi, sd)
    # marginal KL = the exact avg_kl minus the estimate of I: the same error, sign reversed.
    assert abs(surgery.marginal_kl - marginal) < 4 * sd, (surgery.marginal_kl, marginal, sd)

    # Closed-form checks of the reference itself. q_G, the Gaussian with q_N's mean and
    # covariance (Cov(mu) + diag(s^2)), has the largest entropy of that covariance, so
    # I_N = I_G - KL(q_N || q_G) <= I_G = 0.5 log det Cov_G - sum log s; and the rate splits
    # exactly, rate = I_N + KL(q_N || p), as an identity of integrals.
    cov = torch.cov(mu.T, correction=0) + torch.diag(s**2)
    mi_gaussian = 0.5 * float(torch.logdet(cov)) - float(s.log().sum())
    assert mi <= mi_gaussian, (mi, mi_gaussian)  # here by 0.004 nats
    assert mi + marginal == pytest.approx(rate, abs=1e-9)


def test_surgery_of_a_perfect_code_reaches_log_n():
    # Far-apart, narrow codes: z identifies its image, so I_q(x; z) = log N (its maximum).
    n = 50
    mu = torch.arange(n, dtype=torch.float64)[:, None] * 10.0
    surgery = elbo_surgery(mu, torch.full_like(mu, -4.0))
    assert surgery.mutual_info == pytest.approx(math.log(n), abs=1e-6)
    assert surgery.mutual_info <= surgery.log_n + 1e-12
    with pytest.raises(ValueError, match="num_samples"):
        elbo_surgery(mu, mu, num_samples=0)


# --------------------------------------------------------------------------------------------
# The IWAE curve and the binary toy
# --------------------------------------------------------------------------------------------


class _Affine(nn.Module):
    def __init__(self, weight, bias, log_var=None):
        super().__init__()
        self.weight, self.bias, self.log_var = weight, bias, log_var

    def forward(self, x):
        out = x @ self.weight.T + self.bias
        if self.log_var is None:
            return out
        return out, self.log_var.expand(out.shape)


def test_iwae_curve_is_log_evidence_at_every_k_with_the_exact_posterior():
    # PPCA with orthogonal loadings has a diagonal posterior: with the exact guide every
    # importance weight equals p(x), so IWAE_K = ELBO = log p(x) for every K.
    W, b, sigma, data, *_ = _linear_gaussian_problem(n=8)
    A, c, scale = lg_guide.optimal_params(W, b, sigma)
    encoder = _Affine(A, c, 2 * scale.log())
    decoder = _Affine(W, b)
    curve = iwae_curve(
        encoder, decoder, data, (1, 3, 10), likelihood="gaussian", sigma=sigma, batch_size=3
    )
    log_px = float(lg_model.log_evidence(data, W, b, sigma).mean())
    assert curve.ks == (1, 3, 10) and curve.n_images == 8 and curve.num_samples == 10
    assert curve.elbo == pytest.approx(log_px, abs=1e-4)
    assert curve.iwae == pytest.approx([log_px] * 3, abs=1e-4)
    assert max(curve.gap_se) < 1e-4


def test_iwae_curve_starts_at_the_elbo_and_rises():
    # R = 20 curves with seeds 0..19 on the same 20 images: their spread is Monte Carlo error
    # alone, so each statement below is a t statistic with 19 d.o.f.; |t| < 5 fails with
    # probability < 1e-4 (8e-5).
    W, b, sigma, data, A, c, scale = _linear_gaussian_problem(n=20)
    encoder = _Affine(A, c, 2 * scale.log())  # an imperfect guide: a gap to close
    decoder = _Affine(W, b)
    repeats = 20
    curves = [
        iwae_curve(encoder, decoder, data, (1, 10, 100), likelihood="gaussian", sigma=sigma, seed=r)
        for r in range(repeats)
    ]
    for curve in curves:  # IWAE_1 averages the same log-weights as the ELBO
        assert curve.iwae[0] == pytest.approx(curve.elbo, abs=1e-9)
    values = torch.tensor([curve.iwae for curve in curves], dtype=torch.float64)  # (R, 3)

    def t_stat(v, target=0.0):
        return (float(v.mean()) - target) / (float(v.std()) / math.sqrt(repeats))

    # E[IWAE_1] = ELBO = mean_n log p(x_n) - KL(q(z|x_n) || p(z|x_n)), closed form.
    log_px = lg_model.log_evidence(data, W, b, sigma).double()
    mean = data @ A.T + c
    q = MultivariateNormal(mean, scale_tril=torch.diag_embed(scale.expand_as(mean)))
    kl = kl_divergence(q, lg_model.posterior(data, W, b, sigma)).double()
    assert abs(t_stat(values[:, 0], float((log_px - kl).mean()))) < 5
    # E[IWAE_1] < E[IWAE_10] < E[IWAE_100]: the paired rises (true sizes ~0.78 and ~0.064
    # nats, ~130 and ~30 s.e. at R = 20) must exceed 5 s.e.
    assert t_stat(values[:, 1] - values[:, 0]) > 5
    assert t_stat(values[:, 2] - values[:, 1]) > 5
    # ...and E[IWAE_100] <= log p(x) (its true gap ~0.008 nats): not above it by 5 s.e.
    # (s.e. ~0.005: an excess of ~0.03 nats or more is caught).
    assert t_stat(values[:, 2], float(log_px.mean())) < 5
    # The same seed, the same curve.
    again = iwae_curve(encoder, decoder, data, (1, 10, 100), likelihood="gaussian", sigma=sigma)
    assert again.iwae == curves[0].iwae


def test_toy_elbo_curve_touches_log_evidence_at_the_posterior():
    pyro.param("untouched", torch.tensor(3.0))
    qs = [0.1, 0.5, 0.8, 0.95]
    elbos, log_px = toy_elbo_curve(qs)
    assert log_px == pytest.approx(math.log(0.5), abs=1e-6)
    for q, elbo in zip(qs, elbos, strict=True):
        # ELBO = E_q[log p(x=1|z)] - KL(q || p(z)), p(z=1) = 0.5, p(x=1|z) = (0.2, 0.8).
        kl = q * math.log(q / 0.5) + (1 - q) * math.log((1 - q) / 0.5)
        assert elbo == pytest.approx(q * math.log(0.8) + (1 - q) * math.log(0.2) - kl, abs=1e-5)
    assert elbos[2] == pytest.approx(log_px, abs=1e-6)  # q = 0.8 is the posterior: gap 0
    assert all(e <= log_px + 1e-6 for e in elbos)
    assert list(pyro.get_param_store().keys()) == ["untouched"]
    with pytest.raises(ValueError, match="open interval"):
        toy_elbo_curve([0.0, 0.5])
