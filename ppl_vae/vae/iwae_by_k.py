"""The IWAE bound of a Gaussian VAE against the number of importance samples K, from K = 1
(the ELBO) up (Burda et al. 2015):

    IWAE_K = E[log (1/K) sum_k w_k],  w = p(x, z) / q(z | x),  z_k ~ q(z | x),

with E[IWAE_1] = ELBO <= E[IWAE_K] <= E[IWAE_K'] <= log p(x) for K <= K'. Every K is read off
one set of max(K) log-weights per image, drawn by :func:`ppl_vae.vae.iwae.vae_log_weights`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from ppl_vae.rng import forked_rng
from ppl_vae.vae.iwae import vae_log_weights

__all__ = ["DEFAULT_KS", "IwaeCurve", "iwae_curve"]

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


def _log_weights(
    encoder: nn.Module,
    decoder: nn.Module,
    x: Tensor,
    k_max: int,
    chunk_size: int,
    likelihood: str,
    sigma: float | None,
    prior: Distribution | None,
) -> Tensor:
    """(k_max, B) log-weights of the images ``x`` (B, D) in float64, ``chunk_size`` draws of
    eps at a time; the encoder runs once."""
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
                prior=prior,
            ).double()
        )
    return torch.cat(blocks)


def _mean_se(values: Tensor) -> tuple[float, float]:
    """Mean over images and its standard error (NaN for one image)."""
    n = values.numel()
    se = float(values.std() / math.sqrt(n)) if n > 1 else math.nan
    return float(values.mean()), se


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
    prior: nn.Module | None = None,
) -> IwaeCurve:
    """The IWAE bound of a Gaussian VAE against the number of importance samples K.

    max(ks) log-weights log w = log p(x, z) - log q(z | x) are drawn per image; IWAE_K of an
    image is the mean over the max(ks) // K disjoint blocks of K weights of
    logsumexp(block) - log K (each block an unbiased draw of the K-sample bound, so the small
    K are averaged over many blocks), and the ELBO is the mean of all the log-weights.
    E[IWAE_1] = ELBO <= E[IWAE_K] <= E[IWAE_K'] <= log p(x) for K <= K' (Burda et al. 2015).

    :param seed: seeds torch for the draws (the caller's random state is restored); ``None``
        draws from the global state as it is.
    :param prior: a learned prior module (``VAE.prior``); ``None``: N(0, I).
    """
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
        p_z = None if prior is None else prior.distribution(encoder)
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size]  # (B, D)
            log_w = _log_weights(encoder, decoder, x, k_max, chunk_size, likelihood, sigma, p_z)
            elbo_parts.append(log_w.mean(0).cpu())
            for i, k in enumerate(ks):
                m = k_max // k
                grouped = log_w[: m * k].reshape(m, k, -1)  # (blocks, K, B)
                per_k[i].append((torch.logsumexp(grouped, dim=1) - math.log(k)).mean(0).cpu())
    elbo_per_image = torch.cat(elbo_parts)
    stats = [_mean_se(torch.cat(parts)) for parts in per_k]
    gaps = [_mean_se(torch.cat(parts) - elbo_per_image) for parts in per_k]
    elbo, elbo_se = _mean_se(elbo_per_image)
    return IwaeCurve(
        ks=ks,
        iwae=tuple(s[0] for s in stats),
        iwae_se=tuple(s[1] for s in stats),
        gap_se=tuple(g[1] for g in gaps),
        elbo=elbo,
        elbo_se=elbo_se,
        n_images=int(images.shape[0]),
        num_samples=k_max,
    )
