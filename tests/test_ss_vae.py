"""The semi-supervised VAE (M2): its ELBO against closed forms written here, branch by branch.

The oracle pair is linear-Gaussian given the label: q(z | x, y) = N(A x + c_y, diag(s^2)),
p(z) = N(0, I), p(x | y, z) = N(W z + b_y, sigma^2 I), q(y | x) = softmax(V x + d), C classes.
Then, per image and class (all closed forms, computed below in float64):

    E_q[log p(x | y, z)] = sum_d -log(sqrt(2 pi) sigma)
                           - ((x - W m - b_y)_d^2 + (W^2 s^2)_d) / (2 sigma^2)
    KL_z(y) = 1/2 sum_j (s_j^2 + m_j^2 - 1 - log s_j^2)
    L(x, y) = E_q[log p(x | y, z)] - log C - KL_z(y)
    U(x) = sum_y q(y | x) L(x, y) + H(q(y | x))
    log p(x) = log sum_y (1/C) N(x; b_y, W W^T + sigma^2 I)

Stochastic estimates are compared through their own standard error over 30 independent
repeats: |mean - exact| / s.e. is a t statistic with 29 degrees of freedom, above 4 with
probability 4e-4 per comparison when the estimator is right.
"""

from __future__ import annotations

import functools
import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from torch import nn

from ppl_vae.elbo import check_pair, enumerated_site_terms
from ppl_vae.guides import ss_vae as ss_guide
from ppl_vae.models import ss_vae as ss_model
from ppl_vae.vae import M2, M2Config, VAEConfig, m2_iwae

C, D, Z, N = 3, 4, 2, 5
SIGMA = 0.7
REPEATS = 30
TOL = 4.0


class LinearClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_classes = C
        self.x_dim = D
        self.lin = nn.Linear(D, C)

    def forward(self, x):
        return self.lin(x)


class LinearEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.x_dim, self.z_dim, self.num_classes = D, Z, C
        self.a = nn.Parameter(torch.randn(Z, D) * 0.5)
        self.c = nn.Parameter(torch.randn(C, Z))
        self.log_var = nn.Parameter(torch.randn(Z) * 0.3 - 0.5)

    def forward(self, x, y):
        mu = x @ self.a.T + self.c[y]  # (..., Z)
        return mu, self.log_var.expand(mu.shape)


class LinearDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.x_dim, self.z_dim, self.num_classes = D, Z, C
        self.log_sigma = None
        self.w = nn.Parameter(torch.randn(D, Z))
        self.b = nn.Parameter(torch.randn(C, D))

    def forward(self, z, y):
        return z @ self.w.T + self.b[y]  # (..., D)


@pytest.fixture
def nets():
    pyro.clear_param_store()
    torch.manual_seed(0)
    return LinearClassifier(), LinearEncoder(), LinearDecoder()


def _pair(nets, alpha=0.0):
    clf, enc, dec = nets
    model = functools.partial(
        ss_model.model,
        decoder=dec,
        likelihood="gaussian",
        sigma=SIGMA,
        classifier=clf,
        alpha=alpha,
    )
    guide = functools.partial(ss_guide.guide, encoder=enc, classifier=clf)
    return model, guide


def _closed_form(nets, x):
    """Per image and class (N, C), float64: E log p(x|y,z), KL_z(y), L(x, y); and q(y|x)."""
    clf, enc, dec = (m.double() for m in nets)
    x = x.double()
    with torch.no_grad():
        q_y = torch.softmax(clf(x), -1)  # (N, C)
        ys = torch.arange(C)
        m = (x @ enc.a.T)[:, None, :] + enc.c[ys][None]  # (N, C, Z)
        s2 = enc.log_var.exp()  # (Z,)
        mean_x = m @ dec.w.T + dec.b[ys][None]  # (N, C, D)
        var_term = (dec.w**2 @ s2)[None, None, :]  # (1, 1, D)
        recon = (
            -0.5 * math.log(2 * math.pi * SIGMA**2)
            - ((x[:, None, :] - mean_x) ** 2 + var_term) / (2 * SIGMA**2)
        ).sum(-1)
        kl_z = 0.5 * (s2 + m**2 - 1 - s2.log()).sum(-1)
        elbo_y = recon - math.log(C) - kl_z
    for net in nets:
        net.float()
    return recon, kl_z, elbo_y, q_y


def _data():
    torch.manual_seed(1)
    return torch.randn(N, D)


def _within(samples: torch.Tensor, exact: torch.Tensor) -> None:
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(samples.shape[0])
    z = (mean - exact) / se.clamp_min(1e-12)
    assert bool((z.abs() < TOL).all()), f"z-scores {z.tolist()} (mean {mean}, exact {exact})"


def test_unlabelled_elbo_is_the_sum_over_classes(nets):
    """TraceEnum_ELBO sums the label out: its loss estimates -sum_i U(x_i)."""
    model, guide = _pair(nets)
    x = _data()
    _, _, elbo_y, q_y = _closed_form(nets, x)
    exact = ((q_y * elbo_y).sum(-1) - (q_y * q_y.log()).sum(-1)).sum()
    elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=50, vectorize_particles=True)
    draws = torch.tensor([-elbo.loss(model, guide, x) for _ in range(REPEATS)], dtype=torch.float64)
    _within(draws[:, None], exact.reshape(1))


def test_labelled_elbo_with_weight_and_classification_term(nets):
    """Labelled rows: w * [L(x, y) + alpha log q(y | x)] each, y observed (nothing summed)."""
    alpha, weight = 2.5, 0.4
    model, guide = _pair(nets, alpha=alpha)
    x = _data()
    y = torch.tensor([0, 2, 1, 1, 0])
    _, _, elbo_y, q_y = _closed_form(nets, x)
    rows = torch.arange(N)
    exact = (weight * (elbo_y[rows, y] + alpha * q_y[rows, y].log())).sum()
    elbo = Trace_ELBO(max_plate_nesting=1, num_particles=50, vectorize_particles=True)
    draws = torch.tensor(
        [-elbo.loss(model, guide, x, y=y, labelled_weight=weight) for _ in range(REPEATS)],
        dtype=torch.float64,
    )
    _within(draws[:, None], exact.reshape(1))


def test_mixed_batch_is_the_sum_of_its_branches(nets):
    """A batch with labels where known (-1 elsewhere) = labelled part + unlabelled part."""
    model, guide = _pair(nets, alpha=1.0)
    x = _data()
    y = torch.tensor([-1, 2, -1, 1, -1])
    _, _, elbo_y, q_y = _closed_form(nets, x)
    known = y >= 0
    rows = torch.arange(N)[known]
    labelled = (elbo_y[rows, y[known]] + q_y[rows, y[known]].log()).sum()
    q_u, e_u = q_y[~known], elbo_y[~known]
    unlabelled = ((q_u * e_u).sum(-1) - (q_u * q_u.log()).sum(-1)).sum()
    elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=50, vectorize_particles=True)
    draws = torch.tensor(
        [-elbo.loss(model, guide, x, y=y) for _ in range(REPEATS)], dtype=torch.float64
    )
    _within(draws[:, None], (labelled + unlabelled).reshape(1))


def test_per_image_terms_sum_the_label_out(nets):
    """enumerated_site_terms: the KL per image is exact (analytic KL of z given each y, the
    label's KL summed); the reconstruction is unbiased per image."""
    model, guide = _pair(nets)
    x = _data()
    recon, kl_z, _, q_y = _closed_form(nets, x)
    kl_exact = (q_y * kl_z).sum(-1) + (q_y * (q_y.log() + math.log(C))).sum(-1)
    recon_exact = (q_y * recon).sum(-1)
    recon_draws, kl_draws = [], []
    for _ in range(REPEATS):
        terms = enumerated_site_terms(model, guide, x, keep_plates=("data",))
        assert terms["y"][1] == "exact" and terms["z"][1] == "analytic"
        recon_draws.append(terms["x"][2][0])
        kl_draws.append(terms["y"][2][0] + terms["z"][2][0])
    for kl in kl_draws:
        torch.testing.assert_close(kl.double(), kl_exact, rtol=1e-5, atol=1e-5)
    _within(torch.stack(recon_draws).double(), recon_exact)


def _m2(nets) -> M2:
    clf, enc, dec = nets
    config = VAEConfig(likelihood="gaussian", sigma=SIGMA, image_shape=(1, 1, D), z_dim=Z)
    return M2(config, M2Config(labels=C), clf, enc, dec, lambda *a, **k: None, None, 0.0)


def _log_evidence(dec: LinearDecoder, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log sum_y (1/C) N(x; b_y, W W^T + sigma^2 I), (N,) float64."""
    with torch.no_grad():
        w = dec.w.double()
        cov = w @ w.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
        per_class = torch.stack(
            [
                torch.distributions.MultivariateNormal(dec.b[c].double(), cov).log_prob(x.double())
                for c in range(C)
            ]
        )  # (C, N)
        return torch.logsumexp(per_class - math.log(C), 0)


def test_iwae_is_the_evidence_at_the_true_posterior(nets):
    """With q(z | x, y) = p(z | x, y) every importance weight is p(x | y): the bound is
    log p(x) for any K (a check with no sampling noise). W's columns are orthogonal, so the
    posterior covariance (I + W^T W / sigma^2)^-1 is diagonal, as the guide's is."""
    _, enc, dec = nets
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(D, Z))
        dec.w.copy_(q * torch.tensor([1.5, 0.6]))
        s2 = 1 / (1 + (dec.w**2).sum(0) / SIGMA**2)  # (Z,) posterior variances
        gain = s2[:, None] * dec.w.T / SIGMA**2  # (Z, D): mean = gain (x - b_y)
        enc.a.copy_(gain)
        enc.c.copy_(-(dec.b @ gain.T))
        enc.log_var.copy_(s2.log())
    x = _data()
    for k in (1, 7):
        torch.testing.assert_close(
            m2_iwae(_m2(nets), x, num_samples=k).double(), _log_evidence(dec, x), rtol=0, atol=1e-4
        )


def test_iwae_bound_tightens_with_k(nets):
    """A poor guide: the bound stays below log p(x) (within 4 s.e.) and rises with K."""
    x = _data()
    log_px = _log_evidence(nets[2], x)
    torch.manual_seed(2)
    m2 = _m2(nets)
    small = torch.stack([m2_iwae(m2, x, num_samples=2) for _ in range(REPEATS)]).double()
    big = torch.stack(
        [m2_iwae(m2, x, num_samples=2000, chunk_size=500) for _ in range(REPEATS)]
    ).double()
    gap_big = log_px - big.mean(0)
    se_big = big.std(0) / math.sqrt(REPEATS)
    assert bool((gap_big > -TOL * se_big).all()), "IWAE above log p(x): not a bound"
    # Rises with K: summed over the images, K = 2000 beats K = 2 by more than 4 s.e. of the
    # paired difference of the repeats' totals.
    rise = big.sum(1) - small.sum(1)  # (REPEATS,)
    z = rise.mean() / (rise.std() / math.sqrt(REPEATS))
    assert float(z) > TOL, f"no clear rise with K: z = {float(z):.2f}"


def test_check_pair_on_a_small_m2(nets):
    """check_pair: exact over y, sampled over z; the enumerated ELBO against the closed form
    (within 4 of its s.e. from 25 repeats: a t statistic with 24 degrees of freedom, above 4
    with probability 5e-4), the sampled one against it, and every gradient."""
    model, guide = _pair(nets)
    x = _data()
    _, _, elbo_y, q_y = _closed_form(nets, x)
    exact = float(((q_y * elbo_y).sum(-1) - (q_y * q_y.log()).sum(-1)).sum())
    pyro.set_rng_seed(4)
    report = check_pair(model, guide, x, num_particles=2000, gradients=True)
    assert "enumerated over ['y'], sampled over ['z']" in report.ledger.method
    assert abs(report.exact_elbo - exact) < TOL * report.exact_elbo_stderr
    assert abs(report.z_score) < TOL
    assert report.gradients and all(g.passed for g in report.gradients), [
        str(g) for g in report.gradients
    ]
    # The IWAE stand-in for log p(x) is below the exact evidence of this linear-Gaussian M2.
    assert report.log_evidence < float(_log_evidence(nets[2], x).sum()) + TOL * (
        report.log_evidence_stderr
    )


def test_per_image_terms_of_a_labelled_batch(nets):
    """Every row labelled: nothing to sum out, and the terms are the labelled branch's (KL of
    z exact in closed form at the observed class)."""
    model, guide = _pair(nets)
    x = _data()
    y = torch.tensor([0, 2, 1, 1, 0])
    _, kl_z, _, _ = _closed_form(nets, x)
    structure_free = enumerated_site_terms(model, guide, x, y=y, keep_plates=("labelled",))
    kind, method, kl = structure_free["z_labelled"]
    assert (kind, method) == ("kl", "analytic")
    torch.testing.assert_close(kl[0].double(), kl_z[torch.arange(N), y], rtol=1e-5, atol=1e-5)
