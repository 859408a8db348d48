"""An amortised linear Gaussian guide for probabilistic PCA.

q(z | x) = N(A x + c, diag(s^2)): the mean is linear in x, the scales shared across data, as in
the exact posterior, which differs only in having a full covariance S.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ppl_vae.elbo import kl_scale

__all__ = ["guide", "optimal_params", "set_params"]


def guide(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, sigma: float, beta: float = 1.0
) -> None:
    """q(z | x) = N(A x + c, diag(exp(log_scale))^2); params ``lg_A``, ``lg_c``, ``lg_log_scale``.

    Takes the model's arguments, as Pyro requires; ``W`` only sets the latent size.
    """
    z_dim, x_dim = W.shape[1], W.shape[0]
    A = pyro.param("lg_A", lambda: x.new_zeros(z_dim, x_dim))
    c = pyro.param("lg_c", lambda: x.new_zeros(z_dim))
    log_scale = pyro.param("lg_log_scale", lambda: x.new_zeros(z_dim))
    with pyro.plate("data", x.shape[0]):
        with kl_scale(beta):
            pyro.sample("z", dist.Normal(x @ A.T + c, log_scale.exp()).to_event(1))


def set_params(A: torch.Tensor, c: torch.Tensor, scale: torch.Tensor) -> None:
    """Write the guide's parameters into Pyro's param store."""
    store = pyro.get_param_store()
    for name, value in (("lg_A", A), ("lg_c", c), ("lg_log_scale", scale.log())):
        if name in store:
            del store[name]
        pyro.param(name, value.detach().clone())


def optimal_params(
    W: torch.Tensor, b: torch.Tensor, sigma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, c, scale) minimising KL(q || p(z | x)) for every x: the exact posterior mean and
    scales 1 / sqrt(diag(precision)) (the mean-field optimum of the reverse KL)."""
    precision = torch.eye(W.shape[1], dtype=W.dtype) + W.T @ W / sigma**2
    A = torch.linalg.inv(precision) @ W.T / sigma**2  # (d, D)
    return A, -A @ b, precision.diagonal().rsqrt()
