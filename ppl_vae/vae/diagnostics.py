"""Diagnostics of the ELBO: rate and distortion, the latent code, ELBO surgery, the IWAE curve.

- Rate R = E_x KL(q(z | x) || p(z)) and distortion D = -E_x E_q[log p(x | z)], nats per image:
  ELBO = -(D + R) and the beta-objective is -(D + beta R) (:func:`rate_distortion`).
- With q(z | x) = N(mu(x), diag(sigma^2(x))) and p(z) = N(0, I) the rate splits over latent
  dimensions (:func:`kl_per_dimension`), and a dimension whose mean code mu_u(x) does not vary
  with x carries no information about x (it is "inactive", Burda et al. 2015). A rate near zero
  with no active unit is posterior collapse: the decoder ignores z (:func:`collapse_warning`).
- ELBO surgery (Hoffman & Johnson 2016): E_x KL(q(z | x) || p(z)) = I_q(x; z) + KL(q(z) || p(z)),
  q(z) = (1/N) sum_n q(z | x_n) the aggregate posterior (:func:`elbo_surgery`).
- The IWAE bound against K, from 1 (the ELBO) up (:func:`iwae_curve`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ppl_vae.rng import forked_rng

__all__ = [
    "ACTIVE_THRESHOLD",
    "DEFAULT_KS",
    "MIN_ACTIVE",
    "MIN_RATE",
    "ElboSurgery",
    "IwaeCurve",
    "RateDistortion",
    "active_units",
    "collapse_warning",
    "elbo_surgery",
    "iwae_curve",
    "kl_per_dimension",
    "posterior_moments",
    "rate_distortion",
]

ACTIVE_THRESHOLD = 0.01
"""Burda et al. (2015): unit u is active when Cov_x(E_q[z_u | x]) exceeds this."""

MIN_RATE = 0.1
"""Default rate (mean KL(q(z | x) || p(z)) per image, nats) below which collapse is flagged:
0.1 nats is about 0.14 bits of information about each image, far below any useful code."""

MIN_ACTIVE = 1
"""Default number of active units below which collapse is flagged (i.e. none active)."""


def posterior_moments(
    encoder: nn.Module, images: Tensor, batch_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """The encoder's (mu, log_var) for every row of ``images`` (N, D): two (N, z) tensors.

    q(z | x_n) = N(mu_n, diag(exp(log_var_n))); computed without gradients, ``batch_size``
    images at a time, on the images' device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"images must be (N, D) with N >= 1, got shape {tuple(images.shape)}")
    mus, log_vars = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            mu, log_var = encoder(images[start : start + batch_size])  # (B, z) each
            mus.append(mu)
            log_vars.append(log_var)
    return torch.cat(mus), torch.cat(log_vars)


def kl_per_dimension(mu: Tensor, log_var: Tensor) -> Tensor:
    """Mean over data of KL(N(mu_u, sigma_u^2) || N(0, 1)) for each latent dimension u: (z,).

    KL = 0.5 (mu^2 + sigma^2 - log sigma^2 - 1); the entries sum to the mean rate per image.
    """
    if mu.shape != log_var.shape or mu.dim() != 2:
        raise ValueError(
            f"mu and log_var must both be (N, z), got {tuple(mu.shape)} and {tuple(log_var.shape)}"
        )
    q = torch.distributions.Normal(mu, (0.5 * log_var).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0))  # (N, z)
    return kl.mean(dim=0)


def active_units(mu: Tensor, threshold: float = ACTIVE_THRESHOLD) -> tuple[int, Tensor]:
    """(count, (z,) activities): A_u = Cov_x(E_q[z_u | x]), the sample variance over the data
    of the mean code mu_u(x) (unbiased, as ``numpy.cov``); unit u is active when A_u > threshold.
    """
    if mu.dim() != 2 or mu.shape[0] < 2:
        raise ValueError(f"mu must be (N, z) with N >= 2 images, got shape {tuple(mu.shape)}")
    activity = mu.var(dim=0, correction=1)  # (z,)
    return int((activity > threshold).sum()), activity


def collapse_warning(
    rate_per_image: float,
    active: int,
    *,
    min_rate: float = MIN_RATE,
    min_active: int = MIN_ACTIVE,
) -> str | None:
    """A message when the code looks collapsed, else ``None``.

    Fires when the rate (mean KL(q(z | x) || p(z)) per image, nats) is below ``min_rate``
    (default 0.1 nats) or fewer than ``min_active`` units are active (default 1: none active).
    """
    problems = []
    if rate_per_image < min_rate:
        problems.append(f"rate {rate_per_image:.4g} nats per image < {min_rate:g}")
    if active < min_active:
        problems.append(f"{active} active unit(s) < {min_active}")
    if not problems:
        return None
    return (
        "posterior collapse suspected: "
        + " and ".join(problems)
        + ". The latent code carries (almost) no information about x, so the decoder models "
        "the data on its own; try KL annealing (beta warm-up from 0), free bits, a weaker "
        "decoder, or more latent capacity."
    )


# --------------------------------------------------------------------------------------------
# Rate and distortion
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateDistortion:
    """One point of the rate-distortion plane, nats per image.

    R = E_x KL(q(z | x) || p(z)), D = -E_x E_q[log p(x | z)], so ELBO = -(D + R) and the
    beta-objective is -(D + beta R). ``epoch``, ``step`` and ``beta`` are set when the point
    comes from a training history (its validation numbers at the end of that epoch).
    """

    rate: float
    distortion: float
    epoch: int | None = None
    step: int | None = None
    beta: float | None = None

    @property
    def elbo(self) -> float:
        """ELBO = -(D + R)."""
        return -(self.distortion + self.rate)

    def objective(self, beta: float) -> float:
        """The beta-ELBO -(D + beta R)."""
        return -(self.distortion + beta * self.rate)


def _number(value: Any, what: str) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{what} is missing")
    return float(value)


def rate_distortion(source: Any, *, n_items: int = 1) -> RateDistortion | list[RateDistortion]:
    """Rate R = E_x KL(q(z | x) || p(z)) and distortion D = -E_x E_q[log p(x | z)] of ``source``.

    ``source`` is one of:

    - a training history (:class:`ppl_vae.training.loop.History`, or its rows as read from
      ``history.json``): one point per epoch, from ``val_kl`` and ``val_reconstruction``;
    - a mapping with ``rate`` and ``distortion`` (or ``kl`` and ``reconstruction``), such as
      ``evaluation.json``: one point;
    - an object with ``kl`` and ``reconstruction`` attributes: an
      :class:`~ppl_vae.runs.evaluate.Evaluation` (per image), or a
      :class:`~ppl_vae.elbo.ledger.Ledger`
      (totals over the data passed: give their number as ``n_items``): one point.
    """
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    if isinstance(source, Mapping):
        if "rate" in source and "distortion" in source:
            rate, distortion = source["rate"], source["distortion"]
        elif "kl" in source and "reconstruction" in source:
            rate, distortion = source["kl"], -_number(source["reconstruction"], "reconstruction")
        else:
            raise ValueError(
                "a mapping needs 'rate' and 'distortion' (or 'kl' and 'reconstruction'), got "
                f"keys {sorted(source)}"
            )
        return RateDistortion(
            _number(rate, "rate") / n_items, _number(distortion, "distortion") / n_items
        )
    if hasattr(source, "kl") and hasattr(source, "reconstruction"):
        return RateDistortion(float(source.kl) / n_items, -float(source.reconstruction) / n_items)
    rows = getattr(source, "rows", source)
    if isinstance(rows, Sequence) and not isinstance(rows, str | bytes):
        points = []
        for row in rows:
            if not isinstance(row, Mapping):
                raise ValueError(f"history rows must be mappings, got {type(row).__name__}")
            epoch = row.get("epoch")
            what = f"epoch {epoch}: val_kl / val_reconstruction (no validation set?)"
            rate = _number(row.get("val_kl"), what)
            distortion = -_number(row.get("val_reconstruction"), what)
            points.append(
                RateDistortion(
                    rate,
                    distortion,
                    epoch=None if epoch is None else int(epoch),
                    step=None if row.get("step") in (None, "") else int(row["step"]),
                    beta=None if row.get("beta") in (None, "") else float(row["beta"]),
                )
            )
        return points
    raise ValueError(
        f"cannot read a rate and a distortion from a {type(source).__name__}: pass a History, "
        "its rows, an Evaluation, a Ledger or a mapping"
    )


# --------------------------------------------------------------------------------------------
# ELBO surgery
# --------------------------------------------------------------------------------------------

_LOG_2PI = math.log(2 * math.pi)
_PAIR_BUDGET = 2**22  # (samples x images) log-densities held at once: 32 MiB in float64


@dataclass(frozen=True)
class ElboSurgery:
    """The average KL term split in two (Hoffman & Johnson 2016), nats per image:

        avg_kl = E_x KL(q(z | x) || p(z)) = I_q(x; z) + KL(q(z) || p(z)),

    q(z) = (1/N) sum_n q(z | x_n) the aggregate posterior. ``mutual_info`` is the Monte Carlo
    estimate of I_q(x; z) (standard error ``mutual_info_se`` across images), ``avg_kl`` closed
    form and ``marginal_kl`` = avg_kl - mutual_info. I_q(x; z) <= log N (``log_n``).
    """

    avg_kl: float
    mutual_info: float
    marginal_kl: float
    mutual_info_se: float
    n_images: int
    num_samples: int

    @property
    def log_n(self) -> float:
        """log N, the largest mutual information N images can carry."""
        return math.log(self.n_images)

    def __str__(self) -> str:
        return "\n".join(
            [
                f"ELBO surgery over {self.n_images} images ({self.num_samples} z per image), "
                "nats per image",
                f"  E_x KL(q(z|x) || p(z)) (closed form)  {self.avg_kl:10.4f}",
                f"  = I_q(x; z)                            {self.mutual_info:10.4f}"
                f"  ± {self.mutual_info_se:.4f}  (<= log N = {self.log_n:.4f})",
                f"  + KL(q(z) || p(z))                     {self.marginal_kl:10.4f}",
            ]
        )


def elbo_surgery(
    mu: Tensor,
    log_var: Tensor,
    *,
    num_samples: int = 1,
    seed: int | None = 0,
) -> ElboSurgery:
    """Split the rate E_x KL(q(z | x) || p(z)) into I_q(x; z) + KL(q(z) || p(z)).

    q(z | x_n) = N(mu_n, diag(exp(log_var_n))) for the N rows of ``mu`` and ``log_var``, p(z) =
    N(0, I), and q(z) = (1/N) sum_m q(z | x_m), the aggregate posterior of these N images.

    Estimator: draw ``num_samples`` z ~ q(z | x_n) for every n and average

        I_q(x; z) ~= (1/(N S)) sum_{n,s} [log q(z_ns | x_n) - log q(z_ns)],
        log q(z) = logsumexp_m log q(z | x_m) - log N,

    the sum over m running over ALL N images (in chunks, in float64), so log q(z) is exact
    for the aggregate posterior of the images passed and the estimate is unbiased for it (no
    minibatch estimator of log q(z) is used). Each term is <= log N, so the estimate is too,
    and it is exactly 0 when q(z | x) does not depend on x. KL(q(z) || p(z)) is then the
    closed-form rate minus this estimate. Passing a subset of a data set gives that subset's
    aggregate posterior: I_q is then capped at log N of the subset, an underestimate when the
    code carries more than log N nats. Cost: N^2 S z_dim multiply-adds.

    :param seed: seeds a private generator; ``None`` draws from torch's global one.
    """
    if mu.shape != log_var.shape or mu.dim() != 2 or mu.shape[0] < 1:
        raise ValueError(
            f"mu and log_var must both be (N, z) with N >= 1, got {tuple(mu.shape)} and "
            f"{tuple(log_var.shape)}"
        )
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    n, z_dim = mu.shape
    mu64, lv64 = mu.detach().double(), log_var.detach().double()
    precision = (-lv64).exp()  # (N, z)
    # log q(z | x_m) = -0.5 [z^2 . prec_m - 2 z . (mu_m prec_m) + mu_m^2 . prec_m + sum lv_m
    #                  + z log 2 pi]: two matrix products per chunk of z.
    weighted_mu = mu64 * precision  # (N, z)
    const = (mu64.square() * precision + lv64).sum(-1) + z_dim * _LOG_2PI  # (N,)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=mu.device).manual_seed(seed)
    eps = torch.randn(num_samples, n, z_dim, generator=generator, device=mu.device)
    z = (mu64 + (0.5 * lv64).exp() * eps.double()).reshape(-1, z_dim)  # (S N, z), row s*N + n
    own = torch.arange(n, device=mu.device).repeat(num_samples)  # the image each z came from
    chunk = max(1, _PAIR_BUDGET // n)
    terms = []
    for start in range(0, z.shape[0], chunk):
        zc = z[start : start + chunk]  # (B, z)
        log_q = -0.5 * (zc.square() @ precision.T - 2.0 * zc @ weighted_mu.T + const)  # (B, N)
        log_q_own = log_q.gather(1, own[start : start + chunk, None]).squeeze(1)  # (B,)
        terms.append(log_q_own - (torch.logsumexp(log_q, dim=1) - math.log(n)))
    per_image = torch.cat(terms).reshape(num_samples, n).mean(0)  # (N,)
    mutual_info = float(per_image.mean())
    se = float(per_image.std() / math.sqrt(n)) if n > 1 else math.nan
    avg_kl = float(kl_per_dimension(mu64, lv64).sum())
    return ElboSurgery(
        avg_kl=avg_kl,
        mutual_info=mutual_info,
        marginal_kl=avg_kl - mutual_info,
        mutual_info_se=se,
        n_images=int(n),
        num_samples=int(num_samples),
    )


# --------------------------------------------------------------------------------------------
# The IWAE bound against K
# --------------------------------------------------------------------------------------------

DEFAULT_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
"""The K values of :func:`iwae_curve` by default."""


@dataclass(frozen=True)
class IwaeCurve:
    """IWAE_K = E[log (1/K) sum_k w_k], w = p(x, z) / q(z | x), z_k ~ q(z | x), for each K in
    ``ks`` (means over ``n_images`` images, nats, with standard errors across images), and
    the ELBO = E_q[log w] estimated from the same ``num_samples`` draws per image.
    ``gap_se`` is the standard error of IWAE_K - ELBO from the per-image paired differences,
    which removes the image-to-image spread the two share."""

    ks: tuple[int, ...]
    iwae: tuple[float, ...]
    iwae_se: tuple[float, ...]
    gap_se: tuple[float, ...]
    elbo: float
    elbo_se: float
    n_images: int
    num_samples: int


def iwae_curve(
    encoder: nn.Module,
    decoder: nn.Module,
    images: Tensor,
    ks: Iterable[int] = DEFAULT_KS,
    *,
    likelihood: str = "bernoulli",
    sigma: float | None = None,
    seed: int | None = 0,
    chunk_size: int = 500,
    batch_size: int = 20,
) -> IwaeCurve:
    """The IWAE bound of a Gaussian VAE against the number of importance samples K.

    max(ks) log-weights log w = log p(x, z) - log q(z | x) are drawn per image; IWAE_K of an
    image is the mean over the max(ks) // K disjoint blocks of K weights of
    logsumexp(block) - log K (each block an unbiased draw of the K-sample bound, so the small
    K are averaged over many blocks), and the ELBO is the mean of all the log-weights.
    E[IWAE_1] = ELBO <= E[IWAE_K] <= E[IWAE_K'] <= log p(x) for K <= K' (Burda et al. 2015).

    :param seed: seeds torch for the draws (the caller's random state is restored); ``None``
        draws from the global state as it is.
    """
    from ppl_vae.vae.iwae import vae_log_weights

    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be integers >= 1, got {ks}")
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size and batch_size must be >= 1, got {chunk_size}, {batch_size}")
    if images.dim() != 2 or images.shape[0] == 0:
        raise ValueError(f"images must be (N, D) with N >= 1, got shape {tuple(images.shape)}")
    k_max = ks[-1]
    per_k: list[list[Tensor]] = [[] for _ in ks]
    elbo_parts: list[Tensor] = []
    seeded = forked_rng(images.device, seed) if seed is not None else contextlib.nullcontext()
    with seeded, torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size]  # (B, D)
            moments = encoder(x)
            z_dim = moments[0].shape[-1]
            blocks = []
            for first in range(0, k_max, chunk_size):
                k = min(chunk_size, k_max - first)
                eps = torch.randn(k, x.shape[0], z_dim, device=x.device, dtype=x.dtype)
                blocks.append(
                    vae_log_weights(
                        encoder,
                        decoder,
                        x,
                        eps,
                        likelihood=likelihood,
                        sigma=sigma,
                        moments=moments,
                    ).double()
                )
            log_w = torch.cat(blocks)  # (K_max, B)
            elbo_parts.append(log_w.mean(0).cpu())
            for i, k in enumerate(ks):
                m = k_max // k
                grouped = log_w[: m * k].reshape(m, k, -1)  # (blocks, K, B)
                per_k[i].append((torch.logsumexp(grouped, dim=1) - math.log(k)).mean(0).cpu())
    n = int(images.shape[0])

    def mean_se(values: Tensor) -> tuple[float, float]:
        se = float(values.std() / math.sqrt(n)) if n > 1 else math.nan
        return float(values.mean()), se

    elbo_per_image = torch.cat(elbo_parts)
    stats = [mean_se(torch.cat(parts)) for parts in per_k]
    gaps = [mean_se(torch.cat(parts) - elbo_per_image) for parts in per_k]
    elbo, elbo_se = mean_se(elbo_per_image)
    return IwaeCurve(
        ks=ks,
        iwae=tuple(s[0] for s in stats),
        iwae_se=tuple(s[1] for s in stats),
        gap_se=tuple(g[1] for g in gaps),
        elbo=elbo,
        elbo_se=elbo_se,
        n_images=n,
        num_samples=k_max,
    )
