"""log p(x) on the linear-Gaussian pair, where it is closed-form: IWAE converges, gap = KL."""

import math

import pyro
import pytest
import torch

from ppl_vae import elbo_ledger, iwae_log_evidence
from ppl_vae.elbo import pareto_khat
from ppl_vae.guides import linear_gaussian as lg_guide
from ppl_vae.models import linear_gaussian as lg_model

D, Z, N, SIGMA = 5, 2, 200, 0.5


@pytest.fixture
def problem():
    generator = torch.Generator().manual_seed(1)
    W = torch.randn(D, Z, generator=generator)
    b = torch.randn(D, generator=generator)
    z = torch.randn(N, Z, generator=generator)
    x = z @ W.T + b + SIGMA * torch.randn(N, D, generator=generator)
    # A deliberately imperfect guide (the mean-field optimum, its scales doubled and its mean
    # map perturbed) so that the gap is large enough to watch it close.
    A, c, scale = lg_guide.optimal_params(W, b, SIGMA)
    A = A + 0.1 * torch.randn(A.shape, generator=generator)
    lg_guide.set_params(A, c, 2.0 * scale)
    return x, W, b


def _kl_to_posterior(x, W, b):
    """KL(q(z|x) || p(z|x)) in closed form, q the guide's diagonal Gaussian."""
    mean = x @ pyro.param("lg_A").T + pyro.param("lg_c")
    scale = pyro.param("lg_log_scale").exp().expand_as(mean)
    q = torch.distributions.MultivariateNormal(mean, scale_tril=torch.diag_embed(scale))
    return torch.distributions.kl_divergence(q, lg_model.posterior(x, W, b, SIGMA)).detach()


def test_posterior_formula_is_bayes_rule(problem):
    # log p(z|x) = log p(z) + log p(x|z) - log p(x) at arbitrary z.
    x, W, b = problem
    z = torch.randn(N, Z)
    log_joint = torch.distributions.Normal(0, 1).log_prob(z).sum(-1) + torch.distributions.Normal(
        z @ W.T + b, SIGMA
    ).log_prob(x).sum(-1)
    expected = log_joint - lg_model.log_evidence(x, W, b, SIGMA)
    actual = lg_model.posterior(x, W, b, SIGMA).log_prob(z)
    assert torch.allclose(actual, expected, atol=1e-4)


def test_gap_equals_kl_to_posterior_for_continuous_latents(problem):
    # gap = log p(x) - ELBO, both summed over N points; the ELBO estimate's s.e. comes from
    # 20000 i.i.d. particles, and |gap - KL| < 4 s.e. fails with p < 1e-4.
    x, W, b = problem
    ledger = elbo_ledger(
        lg_model.model, lg_guide.guide, x, W, b, SIGMA, num_particles=20000, analytic_kl=False
    )
    gap = float(lg_model.log_evidence(x, W, b, SIGMA).sum()) - ledger.elbo
    kl = float(_kl_to_posterior(x, W, b).sum())
    assert kl > 10.0
    assert abs(gap - kl) < 4 * ledger.elbo_stderr, (gap, kl, ledger.elbo_stderr)


def _chi2_to_posterior(x, W, b):
    """Var_q(w / p(x)) = E_q[(p(z|x) / q(z|x))^2] - 1 per row, closed form (float64).

    With p(z|x) = N(m1, S1), q = N(m2, S2), P_i = S_i^-1, P = 2 P1 - P2 (positive definite
    here: q is wider than the posterior) and h = 2 P1 m1 - P2 m2, the Gaussian integral
    int N(z; m1, S1)^2 / N(z; m2, S2) dz = |S2|^(1/2) / (|S1| |P|^(1/2))
    * exp(h^T P^-1 h / 2 - m1^T P1 m1 + m2^T P2 m2 / 2)
    (checked, when written, against 2e5-draw Monte Carlo estimates: agreement to ~1%).
    """
    post = lg_model.posterior(x.double(), W.double(), b.double(), SIGMA)
    m1, S1 = post.mean[..., None], post.covariance_matrix
    m2 = (x @ pyro.param("lg_A").T + pyro.param("lg_c")).detach().double()[..., None]
    s2 = pyro.param("lg_log_scale").detach().double().exp()
    P1, P2 = torch.linalg.inv(S1), torch.diag(s2**-2)
    P = 2 * P1 - P2
    assert bool((torch.linalg.eigvalsh(P) > 0).all())
    h = 2 * P1 @ m1 - P2 @ m2
    quad = (h.mT @ torch.linalg.solve(P, h) - 2 * m1.mT @ P1 @ m1 + m2.mT @ P2 @ m2) / 2
    log_e = s2.log().sum() - torch.logdet(S1) - 0.5 * torch.logdet(P) + quad.squeeze((-1, -2))
    return log_e.exp() - 1.0


def test_iwae_converges_to_the_exact_log_evidence(problem):
    x, W, b = problem
    exact = lg_model.log_evidence(x, W, b, SIGMA)
    errors = {}
    for k in (1, 10, 100, 1000):
        estimate = iwae_log_evidence(
            lg_model.model, lg_guide.guide, x, W, b, SIGMA, num_samples=k, chunk_size=250
        )
        assert estimate.per_item.shape == (N,)
        assert estimate.plates == ("data",)
        diff = exact - estimate.per_item  # >= 0 in expectation: IWAE is a lower bound
        # s.e. of the mean gap across the N independent rows (it also holds the rows' spread
        # of the true gap, so it overstates the Monte Carlo error: conservative).
        stderr = float(diff.std() / math.sqrt(N))
        # The bound holds on average over the N points (one-sided, 4 s.e.).
        assert float(diff.mean()) > -4 * stderr
        errors[k] = (float(diff.mean()), stderr)
    # K = 1 is the ELBO: E[log p(x) - log w] = KL(q || p(z|x)) exactly, per row; the mean
    # gap must equal the mean closed-form KL (|z| < 4 fails with probability < 1e-4).
    kl = float(_kl_to_posterior(x, W, b).mean())
    assert kl > 1.0
    assert abs(errors[1][0] - kl) < 4 * errors[1][1], (errors[1], kl)
    # The bias falls with K (Burda et al.: IWAE_K is non-decreasing in K in expectation):
    # each tenfold K shrinks the mean gap, beyond the noise of the two estimates.
    for small, large in ((1, 10), (10, 100), (100, 1000)):
        (gap_s, se_s), (gap_l, se_l) = errors[small], errors[large]
        assert gap_l < gap_s + 4 * math.hypot(se_s, se_l), errors
    # At K = 1000 the remaining bias is the delta method's Var_q(w / p) / (2K) (Maddison et
    # al. 2017), ~0.001 nats, with Var_q(w / p) closed form (the next terms are O(K^-2),
    # negligible against the s.e. of ~0.003); the mean gap must equal it within 4 s.e.
    # (~0.012 nats, where the old "1% of the ELBO's gap" had no basis): |z| < 4 fails with
    # probability < 1e-4.
    bias = float(_chi2_to_posterior(x, W, b).mean()) / (2 * 1000)
    assert abs(errors[1000][0] - bias) < 4 * errors[1000][1], (errors[1000], bias)


def test_iwae_streams_in_chunks_with_the_same_result():
    # Chunking changes memory, not the estimator. Recorded draws check this on the 1-D pair
    # (test_iwae_streamed_diagnostics_equal_those_of_all_weights_at_once); here on PPCA,
    # whose latent is a 2-D event: with orthogonal loadings the posterior is diagonal, so
    # the exact guide makes every weight p(x) whatever the draws, and any chunk size must
    # give log p(x) and ESS = K to rounding (float64 log w: ~1e-13). A chunk dropped or
    # counted twice moves the bound by log((K -+ r) / K), e.g. 0.02 nats for r = 2 of 100.
    generator = torch.Generator().manual_seed(2)
    W = torch.linalg.qr(torch.randn(D, Z, generator=generator, dtype=torch.float64))[0]
    W = W * torch.tensor([1.5, 0.6], dtype=torch.float64)
    b = torch.randn(D, generator=generator, dtype=torch.float64)
    x = torch.randn(20, D, generator=generator, dtype=torch.float64) + b
    lg_guide.set_params(*lg_guide.optimal_params(W, b, SIGMA))
    # The closed-form log p(x) = log N(x; b, W W^T + sigma^2 I), written here.
    cov = W @ W.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
    centred = x - b
    truth = -0.5 * (
        D * math.log(2 * math.pi)
        + torch.logdet(cov)
        + (centred * torch.linalg.solve(cov, centred.T).T).sum(-1)
    )
    for chunk_size in (100, 32, 7):
        estimate = iwae_log_evidence(
            lg_model.model, lg_guide.guide, x, W, b, SIGMA, num_samples=100, chunk_size=chunk_size
        )
        assert estimate.per_item.dtype == torch.float64
        assert torch.allclose(estimate.per_item, truth, rtol=0, atol=1e-10), chunk_size
        assert torch.allclose(
            estimate.ess_per_item, torch.full((20,), 100.0, dtype=torch.float64), rtol=1e-10
        ), chunk_size


def test_iwae_refuses_nonsense_sample_counts(problem):
    x, W, b = problem
    with pytest.raises(ValueError, match="num_samples"):
        iwae_log_evidence(lg_model.model, lg_guide.guide, x, W, b, SIGMA, num_samples=0)


# --- The VAE's IWAE without Pyro traces is the same estimator as through Pyro's traces.


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian"])
def test_vae_log_weights_match_pyro_traces(likelihood):
    from pyro import poutine

    from ppl_vae.vae import VAEConfig, build_vae, vae_log_weights

    vae = build_vae(
        VAEConfig(
            dataset="digits",
            likelihood=likelihood,
            z_dim=3,
            hidden=(16,),
            image_shape=(1, 4, 4),
            sigma=0.3 if likelihood == "gaussian" else None,
        )
    )
    x = torch.rand(5, 16)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    eps = torch.randn(7, 5, 3)
    fast = vae_log_weights(
        vae.encoder, vae.decoder, x, eps, likelihood=likelihood, sigma=vae.config.sigma
    )
    with torch.no_grad():  # Bernoulli: the rearranged sum over the decoder's linear head
        fast_no_grad = vae_log_weights(
            vae.encoder, vae.decoder, x, eps, likelihood=likelihood, sigma=vae.config.sigma
        )
    mu, log_var = vae.encoder(x)
    z = mu + (0.5 * log_var).exp() * eps  # (7, 5, 3)
    particles = pyro.plate("particles", 7, dim=-2)
    log_w = 0
    for fn, sign in ((vae.model, 1), (vae.guide, -1)):
        trace = poutine.trace(particles(poutine.condition(fn, data={"z": z}))).get_trace(x)
        trace.compute_log_prob()
        log_w = log_w + sign * sum(
            site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample"
        )
    assert fast.shape == (7, 5)
    # float32 sums of ~20 log-densities of magnitude ~10: agreement to 1e-4 nats (seen: 4e-6).
    assert torch.allclose(fast, log_w, rtol=0, atol=1e-4), (fast - log_w).abs().max()
    assert torch.allclose(fast_no_grad, log_w, rtol=0, atol=1e-4), (
        (fast_no_grad - log_w).abs().max()
    )
    assert fast.requires_grad and not fast_no_grad.requires_grad


def test_fast_and_generic_iwae_agree_within_noise():
    from ppl_vae.data import load
    from ppl_vae.runs import evaluate, vae_log_evidence
    from ppl_vae.vae import VAEConfig, build_vae

    data = load("digits", binarize="static")
    vae = build_vae(
        VAEConfig(dataset="digits", z_dim=4, hidden=(32,), image_shape=data.image_shape)
    )
    images = data.test.images[:60]
    trace_free = vae_log_evidence(vae.encoder, vae.decoder)
    results = [
        evaluate(
            vae.model, vae.guide, images, iwae_samples=50, progress=False, log_evidence=fast, seed=s
        )
        for fast, s in ((trace_free, 1), (None, 2))
    ]
    # Independent draws: the per-image difference of the two estimates has mean 0; test it
    # against 4 s.e. of that difference.
    diff = results[0].iwae_per_image - results[1].iwae_per_image
    stderr = float(diff.std() / math.sqrt(diff.numel()))
    assert abs(float(diff.mean())) < 4 * stderr, (float(diff.mean()), stderr)


# --- The bound on unscaled weights, with its s.e., ESS and k-hat, streamed.
#
# A 1-D linear Gaussian pair: z ~ N(0, 1), x | z ~ N(w z, s^2), so x ~ N(0, w^2 + s^2) and
# p(z | x) = N(w x / (w^2 + s^2), s^2 / (w^2 + s^2)); the guide q(z | x) = N(a x + c, t^2).

W1, S1, N1 = 1.5, 0.7, 40


def _pair_1d(x, a, c, t, subsample=None, subsample_size=None, scale=1.0, mask=True, record=None):
    """The model when ``record`` is None, else the guide (it appends its (z, rows) draws).

    ``mask`` (per row) masks the observation site of the model.
    """
    with pyro.plate("data", x.shape[0], subsample=subsample, subsample_size=subsample_size) as i:
        with pyro.poutine.scale(scale=scale):
            if record is None:
                z = pyro.sample("z", pyro.distributions.Normal(torch.zeros_like(x[i]), 1.0))
            else:
                z = pyro.sample("z", pyro.distributions.Normal(a * x[i] + c, t))
                if z.dim() == 2:  # (n, m): a chunk of n particles, not the structure check
                    record.append((z, i))
        if record is None:
            with pyro.poutine.mask(mask=mask):
                pyro.sample("x", pyro.distributions.Normal(W1 * z, S1), obs=x[i])


def _model_1d(x, a, c, t, record=None, **kwargs):
    _pair_1d(x, a, c, t, **kwargs)


def _guide_1d(x, a, c, t, record=None, **kwargs):
    _pair_1d(x, a, c, t, record=[] if record is None else record, **kwargs)


def _normal_log_density(v, mean, sd):
    return -0.5 * math.log(2 * math.pi) - math.log(sd) - 0.5 * ((v - mean) / sd) ** 2


def _data_1d():
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(N1, generator=generator, dtype=torch.float64)
    return W1 * z + S1 * torch.randn(N1, generator=generator, dtype=torch.float64)


def _exact_guide():
    var = W1**2 + S1**2
    return W1 / var, 0.0, S1 / math.sqrt(var)  # a, c, t of p(z | x)


def _imperfect_guide():
    a, _, t = _exact_guide()
    return 1.1 * a, 0.05, 1.3 * t  # wider than the posterior: bounded weights


@pytest.mark.parametrize("chunk_size", [200, 64, 7])
def test_iwae_streamed_diagnostics_equal_those_of_all_weights_at_once(chunk_size):
    # The draws each chunk made are recorded; from them, all K = 200 log-weights are rebuilt
    # in closed form here, and every streamed statistic must equal its all-at-once value.
    x = _data_1d()
    a, c, t = _imperfect_guide()
    record = []
    estimate = iwae_log_evidence(
        _model_1d, _guide_1d, x, a, c, t, record=record, num_samples=200, chunk_size=chunk_size
    )
    z = torch.cat([draw for draw, _ in record])  # (K, N)
    assert z.shape == (200, N1)
    log_w = (
        _normal_log_density(z, 0.0, 1.0)
        + _normal_log_density(x, W1 * z, S1)
        - _normal_log_density(z, a * x + c, t)
    )  # (K, N)
    peak = log_w.max(0).values
    w = (log_w - peak).exp()  # (K, N), max 1 per column
    bound = peak + w.mean(0).log()
    ess = w.sum(0) ** 2 / (w**2).sum(0)
    stderr = (w.var(0, correction=1) / (200 * w.mean(0) ** 2)).sqrt()
    assert estimate.per_item.shape == estimate.stderr_per_item.shape == (N1,)
    assert estimate.ess_per_item.shape == estimate.khat_per_item.shape == (N1,)
    assert torch.allclose(estimate.per_item, bound, rtol=0, atol=1e-10)
    assert torch.allclose(estimate.ess_per_item, ess, rtol=1e-10, atol=0)
    assert torch.allclose(estimate.stderr_per_item, stderr, rtol=1e-8, atol=0)
    # k-hat of all K weights at once (the non-streamed function) against the running top-M.
    # (log w rebuilt here differs from Pyro's by rounding, ~1e-15: k-hat by ~1e-13.)
    assert torch.allclose(estimate.khat_per_item, pareto_khat(log_w, dim=0), rtol=0, atol=1e-9)
    assert math.isclose(estimate.stderr, float(stderr.square().sum().sqrt()), rel_tol=1e-8)
    assert estimate.scale == 1.0 and estimate.full_data_total == estimate.total


@pytest.mark.parametrize("subsampling", ["indices", "random"])
def test_iwae_on_a_subsampled_plate_bounds_each_rows_log_evidence(subsampling):
    # Pyro scales every site of a subsampled plate by N / m = 4; the bound must be formed on
    # unscaled weights (a scaled log w is 4 log w: ~3 |log p(x)| ~ 5 nats per row off).
    # Per row, bound = log p(x) - gap with E[gap] ~ se^2 / 2 (second-order delta method) and
    # s.d. ~ se; rows are independent, so sum(log p(x) - bound) lies in
    # [-4 stderr, sum(se^2) + 4 stderr] but with probability < 1e-4.
    x = _data_1d()
    a, c, t = _imperfect_guide()
    m, num = 10, 500
    kwargs = (
        {"subsample": torch.tensor([3, 17, 0, 39, 8, 21, 30, 5, 12, 26])}
        if subsampling == "indices"
        else {"subsample_size": m}
    )
    record = []
    estimate = iwae_log_evidence(
        _model_1d, _guide_1d, x, a, c, t, record=record, num_samples=num, chunk_size=64, **kwargs
    )
    rows = record[0][1]
    # Every chunk weighs the same rows: a random subsample is drawn once, not once per chunk.
    assert all(torch.equal(i, rows) for _, i in record) and len(record) == 8
    truth = _normal_log_density(x[rows], 0.0, math.sqrt(W1**2 + S1**2))  # (m,)
    assert estimate.per_item.shape == (m,) and estimate.plates == ("data",)
    assert estimate.scale == N1 / m
    assert estimate.full_data_total == pytest.approx(N1 / m * estimate.total, rel=1e-12)
    gap = float((truth - estimate.per_item).sum())
    se2 = float(estimate.stderr_per_item.square().sum())
    assert -4 * estimate.stderr < gap < se2 + 4 * estimate.stderr, (gap, estimate.stderr, se2)
    assert not bool(estimate.unreliable.any()), estimate.khat_per_item


@pytest.mark.parametrize("where", ["model", "model and guide"])
def test_iwae_ignores_poutine_scale_on_the_latent_site(where):
    # poutine.scale weighs an objective's terms (beta-VAE), not the density: same seed, same
    # draws, so the same bound, s.e., ESS and k-hat as without it.
    x = _data_1d()
    a, c, t = _imperfect_guide()

    def scaled_model(*args, **kwargs):
        _model_1d(*args, scale=0.5, **kwargs)

    def scaled_guide(*args, **kwargs):
        _guide_1d(*args, scale=0.5 if where == "model and guide" else 1.0, **kwargs)

    results = []
    for model, guide in ((_model_1d, _guide_1d), (scaled_model, scaled_guide)):
        pyro.set_rng_seed(7)
        results.append(iwae_log_evidence(model, guide, x, a, c, t, num_samples=300, chunk_size=70))
    plain, scaled = results
    for name in ("per_item", "stderr_per_item", "ess_per_item", "khat_per_item"):
        assert torch.allclose(getattr(scaled, name), getattr(plain, name), rtol=0, atol=1e-10)
    assert scaled.scale == 1.0  # a user's scale is not a subsample factor


def test_iwae_applies_the_masks_of_the_sites():
    # A masked observation drops out of log w, leaving p(z) / q(z), whose mean under q is 1:
    # the masked rows' bound is log 1 = 0 less its gap (same band as above, around 0), where
    # ignoring the mask would leave it near log p(x) ~ -1.7 per row.
    x = _data_1d()
    a, c, t = _imperfect_guide()
    mask = torch.arange(N1) % 2 == 0  # even rows observed, odd rows masked
    estimate = iwae_log_evidence(
        _model_1d, _guide_1d, x, a, c, t, mask=mask, num_samples=400, chunk_size=150
    )
    for rows, truth in (
        (mask, _normal_log_density(x[mask], 0.0, math.sqrt(W1**2 + S1**2))),
        (~mask, torch.zeros(N1 // 2, dtype=torch.float64)),
    ):
        se = estimate.stderr_per_item[rows]
        stderr = float(se.square().sum().sqrt())
        gap = float((truth - estimate.per_item[rows]).sum())
        assert -4 * stderr < gap < float(se.square().sum()) + 4 * stderr, (gap, stderr)


def test_iwae_with_the_exact_posterior_has_constant_weights():
    # q = p(z | x): every weight is p(x) exactly, so ESS = K, s.e. = 0 and the bound is log p(x)
    # (float64 data: rounding of log w ~ 1e-15).
    x = _data_1d()
    estimate = iwae_log_evidence(
        _model_1d, _guide_1d, x, *_exact_guide(), num_samples=150, chunk_size=40
    )
    truth = _normal_log_density(x, 0.0, math.sqrt(W1**2 + S1**2))
    assert torch.allclose(estimate.per_item, truth, rtol=0, atol=1e-10)
    assert torch.allclose(estimate.ess_per_item, torch.full((N1,), 150.0, dtype=torch.float64))
    assert float(estimate.stderr_per_item.max()) < 1e-6
    assert not bool(estimate.unreliable.any())


def test_iwae_diagnostics_on_probabilistic_pca(problem):
    # Same band as for the subsampled pair: sum(log p(x) - bound) in [-4 stderr, sum(se^2) +
    # 4 stderr] over N = 200 independent rows, log p(x) closed form.
    x, W, b = problem
    estimate = iwae_log_evidence(
        lg_model.model, lg_guide.guide, x, W, b, SIGMA, num_samples=100, chunk_size=30
    )
    for name in ("stderr_per_item", "ess_per_item", "khat_per_item"):
        assert getattr(estimate, name).shape == (N,), name
    assert estimate.unreliable.shape == (N,) and estimate.unreliable.dtype == torch.bool
    assert bool(((estimate.ess_per_item >= 1) & (estimate.ess_per_item <= 100 + 1e-9)).all())
    assert estimate.max_khat == float(estimate.khat_per_item.max())
    gap = float((lg_model.log_evidence(x, W, b, SIGMA) - estimate.per_item).sum())
    se2 = float(estimate.stderr_per_item.square().sum())
    assert -4 * estimate.stderr < gap < se2 + 4 * estimate.stderr, (gap, estimate.stderr, se2)


def test_iwae_estimate_built_without_diagnostics_keeps_working():
    from ppl_vae.elbo import IWAEEstimate

    estimate = IWAEEstimate(per_item=torch.tensor([-1.0, -2.0]), num_samples=5, plates=("data",))
    assert estimate.total == -3.0 and estimate.scale == 1.0 and estimate.full_data_total == -3.0
    assert bool(estimate.khat_per_item.isnan().all()) and estimate.khat_per_item.shape == (2,)
    assert math.isnan(estimate.stderr) and math.isnan(estimate.max_khat)
    assert not bool(estimate.unreliable.any())
