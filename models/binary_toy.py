"""The binary toy: the smallest latent-variable model with an exact ELBO.

z ~ Bernoulli(prior); x | z ~ Bernoulli(decoder[z]). With prior 0.5 and decoder (0.2, 0.8),
p(x=1) = 0.5 and the true posterior p(z=1 | x=1) = 0.8, p(z=1 | x=0) = 0.2.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ppl_vae.elbo import kl_scale
from ppl_vae.errors import DataError

__all__ = ["DECODER", "PRIOR", "as_data", "model", "true_posterior"]

PRIOR = 0.5
"""p(z = 1)."""
DECODER = (0.2, 0.8)
"""(p(x = 1 | z = 0), p(x = 1 | z = 1))."""


def as_data(x: torch.Tensor | float | list) -> torch.Tensor:
    """Return ``x`` as a 1-D float tensor of 0/1 values (one entry per observation)."""
    x = torch.as_tensor(x, dtype=torch.get_default_dtype()).reshape(-1)
    if not torch.isin(x, x.new_tensor([0.0, 1.0])).all():
        raise DataError(f"binary toy data must be 0 or 1, got values {x.unique().tolist()}")
    return x


def model(
    x: torch.Tensor,
    prior: float = PRIOR,
    decoder: tuple[float, float] = DECODER,
    beta: float = 1.0,
) -> None:
    """p(x, z) = Bernoulli(z; prior) Bernoulli(x; decoder[z]), one z per observation.

    :param x: observations, a scalar or a 1-D tensor of 0/1 values (a batch under ``plate``).
    :param beta: scale on the latent site (the KL weight of a beta-ELBO).
    """
    x = as_data(x)
    table = x.new_tensor(decoder)
    with pyro.plate("data", x.shape[0]):
        with kl_scale(beta):
            z = pyro.sample("z", dist.Bernoulli(x.new_tensor(prior)))
        # Indexing (not torch.where) keeps the enumeration dims of z: shape (2, 1) when enumerated.
        pyro.sample("x", dist.Bernoulli(table[z.long()]), obs=x)


def true_posterior(
    x: torch.Tensor | float, prior: float = PRIOR, decoder: tuple[float, float] = DECODER
) -> torch.Tensor:
    """p(z = 1 | x) by Bayes' rule, elementwise over ``x``."""
    x = as_data(x)
    p1 = torch.tensor(decoder[1]) ** x * (1 - torch.tensor(decoder[1])) ** (1 - x) * prior
    p0 = torch.tensor(decoder[0]) ** x * (1 - torch.tensor(decoder[0])) ** (1 - x) * (1 - prior)
    return p1 / (p0 + p1)
