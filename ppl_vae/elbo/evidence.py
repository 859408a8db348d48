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
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.poutine.messenger import Messenger
from torch import Tensor
from tqdm.auto import tqdm

from ppl_vae.elbo.pair import frames_subsample_factor, inspect_pair, sum_except, vectorized_traces
from ppl_vae.elbo.psis import (
    KHAT_UNRELIABLE,
    ess_from_log_sums,
    pareto_khat_from_largest,
    pareto_tail_size,
    stderr_from_ess,
)
from ppl_vae.errors import NotEnumerableError

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
    """The IWAE lower bound on log p(x), in nats, with how far to trust it.

    ``per_item`` has one entry per element of the plates shared by every site (``plates``),
    or is a scalar when no plate holds every site; ``total`` is its sum. Each item's bound is
    log((1/K) sum_k w_k) on unscaled weights: subsampling and ``poutine.scale`` change neither.

    Per item, shaped like ``per_item`` (float64, from all K weights; NaN when not given):
    ``stderr_per_item`` the delta-method s.e. of the bound
    (:func:`ppl_vae.elbo.psis.stderr_from_ess`),
    ``ess_per_item`` the effective sample size of the weights, and ``khat_per_item`` their Pareto
    k-hat (:func:`ppl_vae.elbo.psis.pareto_khat`): where it exceeds ``KHAT_UNRELIABLE`` (0.7) the
    weights' variance may be infinite and the s.e. understates the error.

    ``scale`` is the subsample factor of the shared plates: the product of full size / subsample
    size over them (1.0 when nothing is subsampled).
    """

    per_item: torch.Tensor
    num_samples: int
    plates: tuple[str, ...]
    scale: float = 1.0
    stderr_per_item: torch.Tensor | None = None
    ess_per_item: torch.Tensor | None = None
    khat_per_item: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Estimates built without diagnostics (as before they existed) get NaN ones.
        for name in ("stderr_per_item", "ess_per_item", "khat_per_item"):
            if getattr(self, name) is None:
                nan = torch.full_like(self.per_item, math.nan, dtype=torch.float64)
                object.__setattr__(self, name, nan)

    @property
    def total(self) -> float:
        """The bound for all the data passed: the sum of the per-item bounds."""
        return float(self.per_item.sum())

    @property
    def full_data_total(self) -> float:
        """``scale * total``: for a minibatch drawn uniformly from the full data, an unbiased
        estimate of the full-data bound, sum over all N items, when every latent is local to the
        subsampled plates (a global latent outside them breaks the per-item factorisation)."""
        return self.scale * self.total

    @property
    def stderr(self) -> float:
        """The s.e. of ``total``: sqrt(sum of the squared per-item s.e.), items independent."""
        return float(self.stderr_per_item.square().sum().sqrt())

    @property
    def unreliable(self) -> torch.Tensor:
        """Per item, whether k-hat > ``KHAT_UNRELIABLE``: its bound and s.e. are not to be
        trusted (False where k-hat is NaN, i.e. not computed or K too small)."""
        return self.khat_per_item > KHAT_UNRELIABLE

    @property
    def max_khat(self) -> float:
        """The largest per-item k-hat, NaN ignored (NaN when none was computed)."""
        known = self.khat_per_item[~self.khat_per_item.isnan()]
        return float(known.max()) if known.numel() else math.nan


class _PinSubsamples(Messenger):
    """Draws each subsample index set once and reuses it in every later run.

    ``pyro.plate(name, N, subsample_size=m)`` draws fresh indices each time a model or guide
    runs; every chunk of particles must weigh the same items, so the first chunk's indices
    (the guide's, then the model's own plates) are replayed in the rest.
    """

    def __init__(self, skip: str) -> None:
        super().__init__()
        self.skip = skip  # the particle plate: its size changes with the chunk
        self.values: dict[str, Tensor] = {}

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if name in self.values and name != self.skip and poutine.util.site_is_subsample(msg):
            msg["value"] = self.values[name]
            msg["done"] = True

    def _pyro_post_sample(self, msg) -> None:
        name = msg["name"]
        if name not in self.values and name != self.skip and poutine.util.site_is_subsample(msg):
            self.values[name] = msg["value"]


def _subsample_factor(trace, plate_names: set[str]) -> float:
    """prod over the named plates of full_size / size (``size`` is the subsample's)."""
    frames = {
        frame.name: frame
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.name in plate_names
    }
    return frames_subsample_factor(frames.values())


def _log_weights(model_trace, guide_trace, keep: tuple[int, ...], rank: int) -> Tensor:
    """log w = log p(x, z) - log q(z | x) from masked, unscaled log-densities, summed over
    everything but the particle dim and the plates every site shares: (n, 1.., plate sizes..)."""
    return sum(
        sign
        * sum_except(scale_and_mask(site["unscaled_log_prob"], mask=site.get("mask")), keep, rank)
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0))
        for site in trace.nodes.values()
        if site["type"] == "sample" and "unscaled_log_prob" in site
    )


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

    Per item of the shared plates, bound = log((1/K) sum_k w_k), log w_k = log p(x, z_k) -
    log q(z_k | x) on each site's masked but unscaled log-density: a subsampled plate's N / m
    and ``poutine.scale`` weigh an objective's terms, not the density, and a scaled log w would
    not bound log p(x). A random subsample (``subsample_size=m``) is drawn once and kept for all
    K samples; its factor N / m is ``scale`` of the result.

    Memory is that of ``chunk_size`` particles at a time whatever K is: per item, running
    log-sum-exps of log w (the bound) and of 2 log w (ESS and s.e.) and a running top-(M + 1)
    of log w (k-hat, M = :func:`ppl_vae.elbo.psis.pareto_tail_size` of K), all in float64; the
    result is that of all K weights at once, whatever ``chunk_size``.
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
    particles = "iwae"  # the particle plate's name
    pin = _PinSubsamples(skip=particles)
    pinned_model, pinned_guide = pin(model), pin(guide)
    tail = min(pareto_tail_size(num_samples) + 1, num_samples)
    log_sum_w = log_sum_w2 = torch.tensor(-math.inf, dtype=torch.float64)
    top: Tensor | None = None  # (<= tail, 1.., plate sizes..): the largest log w so far
    dtype, scale = torch.get_default_dtype(), 1.0
    chunks = range(0, num_samples, chunk_size)
    with torch.no_grad():
        for start in tqdm(chunks, desc="IWAE", unit="chunk", disable=not progress):
            n = min(chunk_size, num_samples - start)
            model_trace, guide_trace = vectorized_traces(
                pinned_model,
                pinned_guide,
                args,
                kwargs,
                n,
                structure.max_plate_nesting,
                plate_name=particles,
            )
            if start == 0:
                scale = _subsample_factor(model_trace, {name for name, _, _ in shared_plates})
            log_w = _log_weights(model_trace, guide_trace, keep, rank)
            if start == 0:
                dtype = torch.promote_types(log_w.dtype, dtype)
            log_w = log_w.double()
            log_sum_w = torch.logaddexp(log_sum_w, torch.logsumexp(log_w, dim=0))
            log_sum_w2 = torch.logaddexp(log_sum_w2, torch.logsumexp(2 * log_w, dim=0))
            pool = log_w if top is None else torch.cat([top, log_w])
            top = torch.topk(pool, min(tail, pool.shape[0]), dim=0).values
    ess = ess_from_log_sums(log_sum_w, log_sum_w2)
    return IWAEEstimate(
        per_item=(log_sum_w - math.log(num_samples)).to(dtype).squeeze(),
        num_samples=num_samples,
        plates=tuple(p[0] for p in shared_plates),
        scale=scale,
        stderr_per_item=stderr_from_ess(ess, num_samples).squeeze(),
        ess_per_item=ess.squeeze(),
        khat_per_item=pareto_khat_from_largest(top, dim=0).squeeze(),
    )
