"""Probabilistic PCA: the continuous latent-variable model whose evidence is closed-form.

z ~ N(0, I_d); x | z ~ N(W z + b, sigma^2 I_D). Marginally x ~ N(b, W W^T + sigma^2 I_D), and
the posterior is p(z | x) = N(S W^T (x - b) / sigma^2, S) with S = (I_d + W^T W / sigma^2)^-1.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ppl_vae.elbo import kl_scale

__all__ = ["log_evidence", "model", "posterior"]


def model(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, sigma: float, beta: float = 1.0
) -> None:
    """p(x, z) = N(z; 0, I) N(x; W z + b, sigma^2 I) for each row of ``x`` (shape (N, D)).

    :param W: loadings, shape (D, d); :param b: offset, shape (D,); :param sigma: noise s.d.
    """
    z_dim = W.shape[1]
    with pyro.plate("data", x.shape[0]):
        with kl_scale(beta):
            z = pyro.sample("z", dist.Normal(x.new_zeros(z_dim), 1.0).to_event(1))  # (.., N, d)
        pyro.sample("x", dist.Normal(z @ W.T + b, sigma).to_event(1), obs=x)


def log_evidence(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    """log p(x) = log N(x; b, W W^T + sigma^2 I), one value per row of ``x``."""
    cov = W @ W.T + sigma**2 * torch.eye(W.shape[0], dtype=W.dtype)
    return torch.distributions.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)


def posterior(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, sigma: float
) -> torch.distributions.MultivariateNormal:
    """p(z | x) = N(S W^T (x - b) / sigma^2, S), S = (I + W^T W / sigma^2)^-1; batch shape (N,)."""
    precision = torch.eye(W.shape[1], dtype=W.dtype) + W.T @ W / sigma**2
    cov = torch.linalg.inv(precision)
    mean = (x - b) @ W @ cov / sigma**2  # (N, d); cov is symmetric
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
