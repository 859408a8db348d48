"""The amortised Gaussian guide of the VAE: q(z | x) = N(mu(x), diag(exp(log_var(x)))).

Pairs with ``ppl_vae.models.vae.model``: bind the encoder with ``functools.partial`` and call
both with the same step-time arguments ``(x, beta=..., check_data=...)``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae.elbo import kl_scale
from ppl_vae.models.vae import check_data as _check

__all__ = ["guide"]


def guide(
    x: torch.Tensor,
    *,
    encoder: nn.Module,
    z_dim: int | None = None,
    beta: float = 1.0,
    check_data: bool = True,
) -> None:
    """q(z | x) = N(z; mu(x), diag(exp(log_var(x)))), one z per row of ``x``, scaled by beta.

    :param x: data, ``(N, x_dim)`` float.
    :param encoder: x -> (mu, log_var); registered as ``pyro.module("encoder", ...)``.
    :param z_dim: when given, checked against the encoder's output.
    :param beta: the model's KL weight; scaling the guide's "z" by the same beta makes beta
        multiply exactly the KL term of the ELBO.
    :param check_data: check shape, dtype and finiteness of ``x`` (the guide runs before the
        model in SVI, so NaN data must be caught here); ``False`` skips the checks.
    :raises DataError: when ``x`` has the wrong shape or dtype or contains NaN/inf.
    """
    if check_data:
        _check(x, x_dim=getattr(encoder, "x_dim", None))
    pyro.module("encoder", encoder)
    mu, log_var = encoder(x)  # (N, z_dim) each
    if z_dim is not None and mu.shape[-1] != z_dim:
        raise ValueError(f"the encoder returns z of size {mu.shape[-1]}, but z_dim={z_dim}")
    with pyro.plate("data", x.shape[0]):
        with kl_scale(beta):
            pyro.sample("z", dist.Normal(mu, torch.exp(0.5 * log_var)).to_event(1))
