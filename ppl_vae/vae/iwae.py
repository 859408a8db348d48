"""The IWAE bound of the Gaussian VAE without Pyro traces.

log p(x) >= E[log (1/K) sum_k p(x, z_k) / q(z_k | x)], z_k = mu(x) + sigma(x) eps_k: the same
bound as :func:`ppl_vae.elbo.evidence.iwae_log_evidence` on the VAE pair, but the encoder runs
once per image and each chunk of samples costs one decoder pass and closed-form Gaussian
log-densities, so the decoder's matrix products dominate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Distribution
from tqdm.auto import tqdm

from ppl_vae.elbo import bernoulli_log_prob, linear_bernoulli_log_prob
from ppl_vae.models.vae import observation
from ppl_vae.vae.networks import Decoder

__all__ = ["vae_iwae", "vae_log_weights"]


_LOG_2PI = math.log(2 * math.pi)


def _linear_head(decoder: nn.Module) -> bool:
    """Whether ``decoder(z)`` is ``decoder.head(decoder.body(z))`` with a linear head: the MLP
    decoder of :mod:`ppl_vae.vae.networks`, its forward not overridden."""
    return (
        isinstance(decoder, Decoder)
        and type(decoder).forward is Decoder.forward
        and type(decoder.head) is nn.Linear
    )


def vae_log_weights(
    encoder: nn.Module,
    decoder: nn.Module,
    x: Tensor,
    eps: Tensor,
    *,
    likelihood: str = "bernoulli",
    sigma: float | None = None,
    moments: tuple[Tensor, Tensor] | None = None,
    prior: Distribution | None = None,
) -> Tensor:
    """log w = log p(x | z) + log p(z) - log q(z | x) at z = mu(x) + sigma(x) eps.

    :param x: (B, D) images; :param eps: (K, B, z_dim) standard normal noise.
    :param moments: (mu, log_var) of q(z | x) when already computed (they are per image).
    :param prior: p(z) when learned (event shape (z_dim,), e.g. ``VAE.prior_distribution()``);
        ``None``: N(0, I).
    :returns: (K, B) log-weights.
    """
    mu, log_var = encoder(x) if moments is None else moments  # (B, z_dim) each
    z = torch.addcmul(mu, (0.5 * log_var).exp(), eps)  # (K, B, z_dim)
    if likelihood == "bernoulli" and not torch.is_grad_enabled() and _linear_head(decoder):
        head = decoder.head
        log_px = linear_bernoulli_log_prob(decoder.body(z), head.weight, head.bias, x)  # (K, B)
    elif likelihood == "bernoulli":
        log_px = bernoulli_log_prob(decoder(z), x).sum(-1)  # (K, B)
    else:
        # the model's own likelihood, not a copy
        log_px = observation(decoder, z, likelihood, sigma).log_prob(x)  # (K, B)
    # log q(z | x) = -eps^2/2 - sum(log sigma) - (z_dim/2) log 2 pi.
    neg_log_q = 0.5 * eps.square().sum(-1) + 0.5 * log_var.sum(-1)
    if prior is None:  # log N(z; 0, I): the 2 pi terms cancel
        return log_px + neg_log_q - 0.5 * z.square().sum(-1)
    return log_px + neg_log_q + 0.5 * z.shape[-1] * _LOG_2PI + prior.log_prob(z)


def vae_iwae(
    encoder: nn.Module,
    decoder: nn.Module,
    images: Tensor,
    *,
    likelihood: str = "bernoulli",
    sigma: float | None = None,
    num_samples: int = 5000,
    chunk_size: int = 100,
    batch_size: int = 20,
    progress: bool = False,
    prior: Distribution | None = None,
) -> Tensor:
    """The K-sample IWAE bound of the Gaussian VAE, per image ((N,) tensor, nats); ``prior``
    as in :func:`vae_log_weights`.

    Memory is one (chunk_size, batch_size, D) block at a time whatever K and N are: the
    default 2,000 decoder rows (6 MB at D = 784) keep the matrix products efficient on a CPU
    and reuse the same memory pass after pass; a GPU wants larger blocks. Draws come from
    torch's global generator (seed it for reproducible values).
    """
    if num_samples < 1 or chunk_size < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples, chunk_size and batch_size must be >= 1, got "
            f"{num_samples}, {chunk_size}, {batch_size}"
        )
    out = []
    starts = range(0, images.shape[0], batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=f"IWAE K={num_samples}", unit="batch", disable=not progress):
            x = images[start : start + batch_size]  # (B, D)
            moments = encoder(x)
            z_dim = moments[0].shape[-1]
            running = x.new_full((x.shape[0],), -math.inf)
            for first in range(0, num_samples, chunk_size):
                k = min(chunk_size, num_samples - first)
                eps = torch.randn(k, x.shape[0], z_dim, device=x.device, dtype=x.dtype)
                log_w = vae_log_weights(
                    encoder,
                    decoder,
                    x,
                    eps,
                    likelihood=likelihood,
                    sigma=sigma,
                    moments=moments,
                    prior=prior,
                )
                running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
            out.append(running - math.log(num_samples))
    return torch.cat(out)
