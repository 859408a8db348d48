"""log p(x): exact by enumeration for discrete models, and the importance-weighted (IWAE) bound.

Exact: with every latent site enumerated in the model and an empty guide, ``TraceEnum_ELBO``'s
loss is -log p(x) (sum over the configurations of z, contracted plate by plate).

IWAE (Burda et al. 2015): log p(x) >= E[log (1/K) sum_k p(x, z_k) / q(z_k | x)], z_k ~ q; the
bound is non-decreasing in K and tends to log p(x). It factorises over every plate that holds
all sites (e.g. the data plate of a VAE), giving one estimate per datapoint.

For the Gaussian VAE pair, :func:`vae_iwae` computes the same bound without building Pyro
traces: the encoder runs once per image, and each chunk of samples costs one decoder pass and
closed-form Gaussian log-densities, so the decoder's matrix products dominate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate
from torch import Tensor, nn
from tqdm.auto import tqdm

from ppl_vae.errors import NotEnumerableError
from ppl_vae.fastmath import bernoulli_log_prob, linear_bernoulli_log_prob
from ppl_vae.pair import inspect_pair, sum_except, vectorized_traces

__all__ = ["IWAEEstimate", "exact_log_evidence", "iwae_log_evidence", "vae_iwae", "vae_log_weights"]


def _empty_guide(*args, **kwargs) -> None:
    """A guide with no sites: every latent site of the model is then enumerated in the model."""


def exact_log_evidence(model: Callable, *args, **kwargs) -> float:
    """log p(x) of a model whose latent sites are all discrete, summed over its plates.

    :raises NotEnumerableError: when a latent site has no enumerable support.
    """
    trace = poutine.trace(model).get_trace(*args, **kwargs)
    nesting = 0
    for site in trace.nodes.values():
        if site["type"] != "sample" or poutine.util.site_is_subsample(site):
            continue
        nesting = max([nesting] + [-f.dim for f in site["cond_indep_stack"] if f.vectorized])
        if not site["is_observed"] and not site["fn"].has_enumerate_support:
            raise NotEnumerableError(
                f"exact log p(x) needs every latent site to be discrete, but site "
                f"'{site['name']}' is a {type(site['fn']).__name__}; use iwae_log_evidence."
            )
    elbo = TraceEnum_ELBO(max_plate_nesting=nesting)
    with torch.no_grad():
        return -float(elbo.loss(config_enumerate(model, "parallel"), _empty_guide, *args, **kwargs))


@dataclass(frozen=True)
class IWAEEstimate:
    """The IWAE lower bound on log p(x), in nats.

    ``per_item`` has one entry per element of the plates shared by every site (``plates``),
    or is a scalar when no plate holds every site; ``total`` is its sum.
    """

    per_item: torch.Tensor
    num_samples: int
    plates: tuple[str, ...]

    @property
    def total(self) -> float:
        """The bound for all the data passed: the sum of the per-item bounds."""
        return float(self.per_item.sum())


def iwae_log_evidence(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    chunk_size: int = 100,
    progress: bool = False,
    **kwargs,
) -> IWAEEstimate:
    """The K-sample importance-weighted bound on log p(x), streamed in chunks of samples.

    Memory is that of ``chunk_size`` particles at a time whatever K is: each chunk's
    log-weights are folded into a running log-sum-exp.
    """
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(
            f"num_samples and chunk_size must be >= 1, got {num_samples}, {chunk_size}"
        )
    structure = inspect_pair(model, guide, args, kwargs)
    sites = structure.latent + structure.observed
    shared = set.intersection(*(set(s.plates) for s in sites)) if sites else set()
    shared_plates = sorted(shared, key=lambda p: p[1])  # (name, dim, size), outermost first
    rank = structure.max_plate_nesting + 1
    keep = (-rank, *(dim for _, dim, _ in shared_plates))
    running = torch.tensor(-math.inf)
    chunks = range(0, num_samples, chunk_size)
    with torch.no_grad():
        for start in tqdm(chunks, desc="IWAE", unit="chunk", disable=not progress):
            n = min(chunk_size, num_samples - start)
            model_trace, guide_trace = vectorized_traces(
                model, guide, args, kwargs, n, structure.max_plate_nesting, plate_name="iwae"
            )
            # log w = log p(x, z) - log q(z | x), summed over everything but the particle
            # dim and the plates every site shares: shape (n, 1.., plate sizes..).
            log_w = sum(
                sign * sum_except(site["log_prob"], keep, rank)
                for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0))
                for site in trace.nodes.values()
                if site["type"] == "sample" and "log_prob" in site
            )
            chunk = torch.logsumexp(log_w, dim=0)
            running = torch.logaddexp(running, chunk)
    per_item = (running - math.log(num_samples)).squeeze()
    return IWAEEstimate(
        per_item=per_item, num_samples=num_samples, plates=tuple(p[0] for p in shared_plates)
    )


_LOG_2PI = math.log(2 * math.pi)


def _linear_head(decoder: nn.Module) -> bool:
    """Whether ``decoder(z)`` is ``decoder.head(decoder.body(z))`` with a linear head: the MLP
    decoder of :mod:`ppl_vae.networks`, its forward not overridden."""
    from ppl_vae.networks import Decoder

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
) -> Tensor:
    """log w = log p(x | z) + log N(z; 0, I) - log q(z | x) at z = mu(x) + sigma(x) eps.

    :param x: (B, D) images; :param eps: (K, B, z_dim) standard normal noise.
    :param moments: (mu, log_var) of q(z | x) when already computed (they are per image).
    :returns: (K, B) log-weights.
    """
    from ppl_vae.models.vae import observation  # the model's own likelihood, not a copy

    mu, log_var = encoder(x) if moments is None else moments  # (B, z_dim) each
    z = torch.addcmul(mu, (0.5 * log_var).exp(), eps)  # (K, B, z_dim)
    if likelihood == "bernoulli" and not torch.is_grad_enabled() and _linear_head(decoder):
        head = decoder.head
        log_px = linear_bernoulli_log_prob(decoder.body(z), head.weight, head.bias, x)  # (K, B)
    elif likelihood == "bernoulli":
        log_px = bernoulli_log_prob(decoder(z), x).sum(-1)  # (K, B)
    else:
        log_px = observation(decoder, z, likelihood, sigma).log_prob(x)  # (K, B)
    # log N(z; 0, I) - log N(z; mu, sigma^2) = -z^2/2 + eps^2/2 + sum(log sigma); 2 pi cancels.
    log_prior_ratio = 0.5 * (eps.square() - z.square()).sum(-1) + 0.5 * log_var.sum(-1)
    return log_px + log_prior_ratio


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
) -> Tensor:
    """The K-sample IWAE bound of the Gaussian VAE, per image ((N,) tensor, nats).

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
                    encoder, decoder, x, eps, likelihood=likelihood, sigma=sigma, moments=moments
                )
                running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
            out.append(running - math.log(num_samples))
    return torch.cat(out)
