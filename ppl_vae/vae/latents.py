"""Walks in the latent space of a Gaussian VAE: straight lines between two images' codes.

z(t) = (1 - t) mu(x_a) + t mu(x_b), t in [0, 1], with mu(x) the posterior mean E_q[z | x],
each point decoded to its mean image E[x | z(t)].
"""

from __future__ import annotations

import torch
from torch import nn

from ppl_vae.models.vae import observation

__all__ = ["interpolate"]


def interpolate(
    encoder: nn.Module,
    decoder: nn.Module,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    *,
    steps: int = 10,
    likelihood: str = "bernoulli",
    sigma: float | None = None,
) -> torch.Tensor:
    """Decoded means E[x | z] along the straight line z(t) = (1 - t) mu(x_a) + t mu(x_b),
    t = 0, 1/(steps-1), ..., 1, for each pair of rows of ``x_a`` and ``x_b`` (P, D):
    shape (P, steps, D). ``likelihood`` and ``sigma`` as in :func:`ppl_vae.models.vae.model`."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    x_a, x_b = torch.atleast_2d(x_a), torch.atleast_2d(x_b)
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a and x_b must have one shape, got {x_a.shape} and {x_b.shape}")
    with torch.no_grad():
        mu_a, _ = encoder(x_a)  # (P, z)
        mu_b, _ = encoder(x_b)
        t = torch.linspace(0, 1, steps, device=mu_a.device, dtype=mu_a.dtype)[None, :, None]
        z = (1 - t) * mu_a[:, None] + t * mu_b[:, None]  # (P, steps, z)
        return observation(decoder, z, likelihood, sigma).mean  # (P, steps, D)
