"""Latent-space diagnostics of a Gaussian VAE: per-dimension KL, active units, collapse.

With q(z | x) = N(mu(x), diag(sigma^2(x))) and p(z) = N(0, I), the rate (the KL term of the
ELBO) splits over latent dimensions, and a dimension whose mean code mu_u(x) does not vary
with x carries no information about x (it is "inactive", Burda et al. 2015). A rate near zero
with no active unit is posterior collapse: the decoder ignores z.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "ACTIVE_THRESHOLD",
    "MIN_ACTIVE",
    "MIN_RATE",
    "active_units",
    "collapse_warning",
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
    kl = 0.5 * (mu.square() + log_var.exp() - log_var - 1.0)  # (N, z)
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
