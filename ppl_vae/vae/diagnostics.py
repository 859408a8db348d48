"""Diagnostics of the latent code of a Gaussian VAE from its posterior moments: KL per
dimension, active units, the collapse warning, ELBO surgery.

- With q(z | x) = N(mu(x), diag(sigma^2(x))) and p(z) = N(0, I) the rate R = E_x KL(q(z | x) ||
  p(z)) splits over latent dimensions (:func:`kl_per_dimension`), and a dimension whose mean
  code mu_u(x) does not vary with x carries no information about x (it is "inactive", Burda et
  al. 2015). A rate near zero with no active unit is posterior collapse: the decoder ignores z
  (:func:`collapse_warning`).
- ELBO surgery (Hoffman & Johnson 2016): E_x KL(q(z | x) || p(z)) = I_q(x; z) + KL(q(z) || p(z)),
  q(z) = (1/N) sum_n q(z | x_n) the aggregate posterior (:func:`elbo_surgery`).

Rate and distortion as points of a plane are in :mod:`ppl_vae.vae.rd_plane`, the IWAE bound
against K in :mod:`ppl_vae.vae.iwae_by_k`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ACTIVE_THRESHOLD",
    "MIN_ACTIVE",
    "MIN_RATE",
    "ElboSurgery",
    "active_units",
    "collapse_warning",
    "elbo_surgery",
    "kl_per_dimension",
    "posterior_moments",
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
    form for p(z) = N(0, I) (sampled from the same draws for a learned prior: ``sampled_kl``,
    s.e. ``marginal_kl_se``) and ``marginal_kl`` = avg_kl - mutual_info. I_q(x; z) <= log N
    (``log_n``).
    """

    avg_kl: float
    mutual_info: float
    marginal_kl: float
    mutual_info_se: float
    n_images: int
    num_samples: int
    sampled_kl: bool = False
    marginal_kl_se: float | None = None

    @property
    def log_n(self) -> float:
        """log N, the largest mutual information N images can carry."""
        return math.log(self.n_images)

    def __str__(self) -> str:
        how = "sampled" if self.sampled_kl else "closed form"
        marginal_se = "" if self.marginal_kl_se is None else f"  ± {self.marginal_kl_se:.4f}"
        return "\n".join(
            [
                f"ELBO surgery over {self.n_images} images ({self.num_samples} z per image), "
                "nats per image",
                f"  E_x KL(q(z|x) || p(z)) ({how:<11})  {self.avg_kl:10.4f}",
                f"  = I_q(x; z)                            {self.mutual_info:10.4f}"
                f"  ± {self.mutual_info_se:.4f}  (<= log N = {self.log_n:.4f})",
                f"  + KL(q(z) || p(z))                     {self.marginal_kl:10.4f}{marginal_se}",
            ]
        )


def elbo_surgery(
    mu: Tensor,
    log_var: Tensor,
    *,
    num_samples: int = 1,
    seed: int | None = 0,
    prior: torch.distributions.Distribution | None = None,
) -> ElboSurgery:
    """Split the rate E_x KL(q(z | x) || p(z)) into I_q(x; z) + KL(q(z) || p(z)).

    q(z | x_n) = N(mu_n, diag(exp(log_var_n))) for the N rows of ``mu`` and ``log_var``, p(z) =
    N(0, I) or ``prior`` (a learned prior, event shape (z,)), and q(z) = (1/N) sum_m
    q(z | x_m), the aggregate posterior of these N images.

    Estimator: draw ``num_samples`` z ~ q(z | x_n) for every n and average

        I_q(x; z) ~= (1/(N S)) sum_{n,s} [log q(z_ns | x_n) - log q(z_ns)],
        log q(z) = logsumexp_m log q(z | x_m) - log N,

    the sum over m running over ALL N images (in chunks, in float64), so log q(z) is exact
    for the aggregate posterior of the images passed and the estimate is unbiased for it (no
    minibatch estimator of log q(z) is used). Each term is <= log N, so the estimate is too,
    and it is exactly 0 when q(z | x) does not depend on x. KL(q(z) || p(z)) is then the
    closed-form rate minus this estimate; with a learned ``prior``, KL(q(z) || p(z)) is the
    mean of log q(z_ns) - log p(z_ns) over the same draws (its s.e. across images) and the rate
    their sum. Passing a subset of a data set gives that subset's
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
    terms, marginal_terms = [], []
    for start in range(0, z.shape[0], chunk):
        zc = z[start : start + chunk]  # (B, z)
        log_q = -0.5 * (zc.square() @ precision.T - 2.0 * zc @ weighted_mu.T + const)  # (B, N)
        log_q_own = log_q.gather(1, own[start : start + chunk, None]).squeeze(1)  # (B,)
        log_q_marginal = torch.logsumexp(log_q, dim=1) - math.log(n)
        terms.append(log_q_own - log_q_marginal)
        if prior is not None:
            log_p = prior.log_prob(zc.to(mu.dtype)).double()  # (B,)
            marginal_terms.append(log_q_marginal - log_p)
    per_image = torch.cat(terms).reshape(num_samples, n).mean(0)  # (N,)
    mutual_info = float(per_image.mean())
    se = float(per_image.std() / math.sqrt(n)) if n > 1 else math.nan
    if prior is None:
        avg_kl = float(kl_per_dimension(mu64, lv64).sum())
        marginal_kl, marginal_se = avg_kl - mutual_info, None
    else:
        marginal = torch.cat(marginal_terms).reshape(num_samples, n).mean(0)  # (N,)
        marginal_kl = float(marginal.mean())
        marginal_se = float(marginal.std() / math.sqrt(n)) if n > 1 else math.nan
        avg_kl = mutual_info + marginal_kl
    return ElboSurgery(
        avg_kl=avg_kl,
        mutual_info=mutual_info,
        marginal_kl=marginal_kl,
        mutual_info_se=se,
        n_images=int(n),
        num_samples=int(num_samples),
        sampled_kl=prior is not None,
        marginal_kl_se=marginal_se,
    )
