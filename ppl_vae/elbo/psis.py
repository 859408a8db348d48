"""How reliable is an importance-sampled estimate: effective sample size, standard error, k-hat.

With weights w_k = p(x, z_k) / q(z_k), z_k ~ q, k = 1..K, the estimate of p(x) is the mean of
the w_k, and its logarithm is the IWAE bound. Three diagnostics, all from log-weights:

- ESS = (sum_k w_k)^2 / sum_k w_k^2, between 1 (one weight dominates) and K (equal weights).
- The delta-method standard error of log((1/K) sum_k w_k): sqrt((K / ESS - 1) / (K - 1)).
- The Pareto shape k-hat of the weights' upper tail (Vehtari, Simpson, Gelman, Yao, Gabry,
  "Pareto smoothed importance sampling", 2015/2024): weights whose tail falls off like
  w^(-1/k) have finite variance only for k < 1/2 and a finite mean only for k < 1, so a large
  k-hat says the standard error (which assumes a finite variance) is not to be trusted.

Every result is float64 (the weights' ratios span many orders of magnitude); for streamed
computations, :func:`ess_from_log_sums`, :func:`stderr_from_ess` and
:func:`pareto_khat_from_largest` take running summaries instead of all K log-weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "KHAT_GOOD",
    "KHAT_UNRELIABLE",
    "MIN_TAIL",
    "effective_sample_size",
    "ess_from_log_sums",
    "log_mean_exp_stderr",
    "pareto_khat",
    "pareto_khat_from_largest",
    "pareto_tail_size",
    "stderr_from_ess",
]

KHAT_GOOD = 0.5
"""k-hat below this: the weights have a finite variance, the central limit theorem holds and
the standard error means what it says."""

KHAT_UNRELIABLE = 0.7
"""k-hat above this: the weights' variance may be infinite (it is for k > 1/2) and the
pre-asymptotic convergence too slow for any practical K, so the estimate and its standard error
are not to be trusted (the threshold the ``loo`` package flags; between 0.5 and 0.7 the estimate
is usable but converges slowly)."""

MIN_TAIL = 5
"""The fewest (distinct, positive) tail exceedances a k-hat is fitted to; with fewer, k-hat is
NaN. The tail size M reaches it at K = 21 samples."""

_PRIOR_WEIGHT = 10.0  # PSIS's weakly informative prior on k: worth 10 observations at k = 0.5.
_PRIOR_MEAN = 0.5
_BLOCK = 1 << 20  # elements of the (items, grid points, tail) block of the fit: 8 MB


def pareto_tail_size(num_samples: int) -> int:
    """M = min(ceil(K / 5), ceil(3 sqrt(K))): how many of the K largest weights k-hat is fitted to.

    Exact in integer arithmetic (a float sqrt could round ceil(3 sqrt(K)) the wrong way).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    fifth = -(-num_samples // 5)
    root = math.isqrt(9 * num_samples)  # floor(sqrt(9 K)) = floor(3 sqrt(K))
    root += root * root < 9 * num_samples  # ... and up to the ceiling unless 9 K is a square
    return min(fifth, root)


def _move_to_front(tensor: Tensor, dim: int) -> Tensor:
    return tensor.double().movedim(dim, 0)


def ess_from_log_sums(log_sum_w: Tensor, log_sum_w2: Tensor) -> Tensor:
    """ESS = (sum w)^2 / sum w^2 = exp(2 log sum w - log sum w^2), from the two log-sums.

    NaN where every weight is 0 (both log-sums -inf).
    """
    return torch.exp(2 * log_sum_w.double() - log_sum_w2.double())


def effective_sample_size(log_weights: Tensor, dim: int = 0) -> Tensor:
    """ESS = (sum_k w_k)^2 / sum_k w_k^2 along ``dim``, from log w (log-sum-exp: no overflow).

    1 <= ESS <= K; the result has ``dim`` removed. NaN where every weight is 0.
    """
    lw = _move_to_front(log_weights, dim)  # (K, ...)
    return ess_from_log_sums(torch.logsumexp(lw, 0), torch.logsumexp(2 * lw, 0))


def stderr_from_ess(ess: Tensor, num_samples: int) -> Tensor:
    """The delta-method s.e. of log((1/K) sum w) given the ESS: sqrt((K / ESS - 1) / (K - 1)).

    NaN when K = 1 (no variance to estimate). K / ESS - 1 >= 0 holds exactly; rounding that
    makes it slightly negative is clamped to 0.
    """
    ess = ess.double()
    if num_samples < 2:
        return torch.full_like(ess, math.nan)
    return ((num_samples / ess - 1).clamp(min=0) / (num_samples - 1)).sqrt()


def log_mean_exp_stderr(log_weights: Tensor, dim: int = 0) -> Tensor:
    """The standard error of log((1/K) sum_k w_k) along ``dim``, by the delta method.

    With m = (1/K) sum w and s^2 = (1/(K-1)) sum (w - m)^2 (the unbiased sample variance),
    se(log m) ~= se(m) / m = sqrt(s^2 / (K m^2)); as sum (w - m)^2 = sum w^2 - K m^2 and
    K sum w^2 / (sum w)^2 = K / ESS, this is sqrt((K / ESS - 1) / (K - 1)). It assumes the
    weights have a finite variance: check :func:`pareto_khat` (< :data:`KHAT_UNRELIABLE`).
    NaN when K = 1.
    """
    return stderr_from_ess(effective_sample_size(log_weights, dim), log_weights.shape[dim])


def _gpd_shape(exceedances: Tensor) -> Tensor:
    """The Zhang & Stephens (2009) empirical-Bayes estimate of a generalised Pareto shape.

    GPD: P(X > x) = (1 + k x / sigma)^(-1/k). With theta = -k / sigma (their parameterisation),
    for fixed theta the MLE of k is k(theta) = mean log(1 - theta x) and the profile
    log-likelihood is n (log(-theta / k(theta)) - k(theta) - 1). theta-hat is the posterior mean
    of theta over the grid theta_j = 1/x_(n) + (1 - sqrt(m / (j - 1/2))) / (3 x*), j = 1..m,
    m = 20 + floor(sqrt(n)), x* the first quartile, x_(n) the largest; k-hat = k(theta-hat).

    :param exceedances: (B, n) non-negative exceedances, sorted descending along the last dim,
        with a positive largest value and first quartile.
    :returns: (B,) shape estimates k-hat (the standard sign: k > 0 is a heavy tail).
    """
    n = exceedances.shape[-1]
    largest = exceedances[:, 0]  # (B,)
    quartile = exceedances[:, n - math.floor(n / 4 + 0.5)]  # ascending rank floor(n/4 + 1/2)
    m = 20 + math.isqrt(n)
    j = torch.arange(1, m + 1, dtype=exceedances.dtype, device=exceedances.device)
    theta = 1 / largest[:, None] + (1 - (m / (j - 0.5)).sqrt()) / (3 * quartile[:, None])
    # theta_j < 1 / x_(n) for every j (B, m), so 1 - theta x > 0 on the whole sample. Grid
    # points go in blocks of at most _BLOCK (B, block, n) elements: bounded memory for many
    # items, few calls for few.
    block = max(1, _BLOCK // max(1, exceedances.numel()))
    mean_x = exceedances.mean(-1, keepdim=True)  # (B, 1)
    log_lik = torch.empty_like(theta)
    for start in range(0, m, block):
        th = theta[:, start : start + block]  # (B, b)
        k = (exceedances[:, None, :] * -th[:, :, None]).log1p_().mean(-1)  # (B, b): k(theta)
        # At theta = 0, -theta / k -> 1 / mean(x): the exponential limit.
        ratio = torch.where(th == 0, 1 / mean_x, -th / k)
        log_lik[:, start : start + block] = n * (ratio.log() - k - 1)
    weights = torch.softmax(log_lik, dim=-1)  # the posterior over the grid
    theta_hat = (weights * theta).sum(-1, keepdim=True)  # (B, 1)
    return torch.log1p(-theta_hat * exceedances).mean(-1)


def pareto_khat_from_largest(largest_log_weights: Tensor, dim: int = 0) -> Tensor:
    """k-hat from the M + 1 largest log-weights along ``dim`` (any order), M = their count - 1.

    What :func:`pareto_khat` computes after its top-(M + 1) selection, for callers that keep a
    running top-(M + 1) of a stream (M = :func:`pareto_tail_size` of the whole K). The weights
    are normalised by their maximum (k is scale-invariant): x_i = w_(i) - w_(M+1), i = 1..M, is
    fitted by :func:`_gpd_shape`, then shrunk as in PSIS, k = (M k-hat + 10 * 0.5) / (M + 10).

    Conventions: k = -inf where all M + 1 weights are equal (a flat top: no tail at all);
    NaN where M < :data:`MIN_TAIL`, where fewer than :data:`MIN_TAIL` distinct exceedances are
    positive, where over a quarter of them are 0 (ties at the threshold), or where the largest
    log-weight is not finite (every weight 0, an infinite weight, or NaN).
    """
    top = largest_log_weights.double().movedim(dim, -1)  # (..., M + 1)
    batch_shape = top.shape[:-1]
    top = top.reshape(-1, top.shape[-1]).sort(dim=-1, descending=True).values  # (B, M + 1)
    n = top.shape[-1] - 1
    khat = torch.full(top.shape[:1], math.nan, dtype=top.dtype, device=top.device)  # (B,)
    if n < MIN_TAIL or top.shape[0] == 0:
        return khat.reshape(batch_shape)
    finite = torch.isfinite(top[:, 0])
    w = torch.exp(top - torch.where(finite, top[:, 0], 0.0)[:, None])  # w / max w, column 0: 1
    x = w[:, :-1] - w[:, -1:]  # (B, M) exceedances, descending, the last one >= 0
    flat = finite & (x[:, 0] == 0)  # on a flat top w_(1) == w_(M+1): every exceedance is 0
    khat[flat] = -math.inf
    distinct = (x[:, :-1] > x[:, 1:]).sum(-1) + (x[:, -1] > 0)  # distinct positive values
    quartile = x[:, n - math.floor(n / 4 + 0.5)]
    fit = finite & (distinct >= MIN_TAIL) & (quartile > 0)
    if bool(fit.any()):
        k = _gpd_shape(x[fit] if not bool(fit.all()) else x)
        khat[fit] = (n * k + _PRIOR_WEIGHT * _PRIOR_MEAN) / (n + _PRIOR_WEIGHT)
    return khat.reshape(batch_shape)


def pareto_khat(log_weights: Tensor, dim: int = 0) -> Tensor:
    """The Pareto shape k-hat of the upper tail of the weights exp(log_weights) along ``dim``.

    Of K weights the M = min(ceil(K/5), ceil(3 sqrt(K))) largest, above the threshold u = the
    (M + 1)-th largest, are fitted by a generalised Pareto distribution, P(w - u > x | w > u)
    = (1 + k x / sigma)^(-1/k) (Zhang & Stephens 2009, with PSIS's prior pulling k towards 0.5
    with the weight of 10 observations). k < :data:`KHAT_GOOD`: reliable; k >
    :data:`KHAT_UNRELIABLE`: the estimate's variance may be infinite.

    NaN for K < 21 (M < :data:`MIN_TAIL`) and for the other degenerate tails of
    :func:`pareto_khat_from_largest`; -inf where the M + 1 largest weights are all equal (e.g.
    constant weights: q is the target). Vectorised over the other dims, which remain.
    """
    num_samples = log_weights.shape[dim]
    keep = min(pareto_tail_size(num_samples) + 1, num_samples) if num_samples else 0
    # topk along a contiguous last dim is the fast layout; float32 input stays float32 here
    # (selection is exact), the fit is float64.
    lw = log_weights.movedim(dim, -1).contiguous()  # (..., K)
    return pareto_khat_from_largest(torch.topk(lw, keep, dim=-1).values, dim=-1)
