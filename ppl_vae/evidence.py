"""log p(x): exact by enumeration for discrete models, and the importance-weighted (IWAE) bound.

Exact: with every latent site enumerated in the model and an empty guide, ``TraceEnum_ELBO``'s
loss is -log p(x) (sum over the configurations of z, contracted plate by plate).

IWAE (Burda et al. 2015): log p(x) >= E[log (1/K) sum_k p(x, z_k) / q(z_k | x)], z_k ~ q; the
bound is non-decreasing in K and tends to log p(x). It factorises over every plate that holds
all sites (e.g. the data plate of a VAE), giving one estimate per datapoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate
from tqdm.auto import tqdm

from ppl_vae.errors import NotEnumerableError
from ppl_vae.pair import inspect_pair, sum_except, vectorized_traces

__all__ = ["IWAEEstimate", "exact_log_evidence", "iwae_log_evidence"]


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
