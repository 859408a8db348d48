"""The structure of a model/guide pair: its sites, its plates, and vectorised traces of it.

Everything that inspects a pair before computing with it lives here, so that a pair that
does not line up fails once, early, with a message that says how to fix it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer.enum import get_importance_trace
from pyro.poutine.trace_struct import Trace

from ppl_vae.errors import ModelGuideMismatchError, NotEnumerableError

__all__ = [
    "PARTICLE_PLATE",
    "PairStructure",
    "SiteInfo",
    "inspect_pair",
    "sum_except",
    "vectorized_traces",
]

PARTICLE_PLATE = "num_particles_vectorized"
"""The name Pyro's ELBOs give the particle plate; reusing it keeps our draws identical to
``Trace_ELBO(num_particles=N, vectorize_particles=True)`` under the same seed."""


@dataclass(frozen=True)
class SiteInfo:
    """One sample site as the pair sees it."""

    name: str
    distribution: str
    observed: bool
    enumerable: bool
    batch_shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    plates: tuple[tuple[str, int, int], ...]  # (name, dim, size) of each enclosing plate


@dataclass(frozen=True)
class PairStructure:
    """Latent sites (in guide order), observed sites (in model order), and plate nesting."""

    latent: tuple[SiteInfo, ...]
    observed: tuple[SiteInfo, ...]
    max_plate_nesting: int

    @property
    def enumerable(self) -> bool:
        """True when every latent site of the guide is discrete with an enumerable support."""
        return all(site.enumerable for site in self.latent)

    def require_enumerable(self, what: str) -> None:
        """Raise :class:`NotEnumerableError` naming the first site that blocks ``what``."""
        for site in self.latent:
            if not site.enumerable:
                raise NotEnumerableError(
                    f"{what} needs every latent site of the guide to be discrete and enumerable, "
                    f"but site '{site.name}' is a {site.distribution}. Use the sampled estimate "
                    "(exact=False) or the IWAE estimate of log p(x) instead."
                )


def _plates(site: dict) -> tuple[tuple[str, int, int], ...]:
    return tuple(
        (frame.name, frame.dim, frame.size)
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.name != PARTICLE_PLATE
    )


def _distribution_name(fn: Any) -> str:
    # Independent/Masked/Expanded wrappers hide the family a user wrote; show that family.
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return type(fn).__name__


def _site_info(site: dict) -> SiteInfo:
    fn = site["fn"]
    return SiteInfo(
        name=site["name"],
        distribution=_distribution_name(fn),
        observed=bool(site["is_observed"]),
        enumerable=bool(getattr(fn, "has_enumerate_support", False)),
        batch_shape=tuple(fn.batch_shape),
        event_shape=tuple(fn.event_shape),
        plates=_plates(site),
    )


def _sample_sites(trace: Trace) -> list[dict]:
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not poutine.util.site_is_subsample(site)
    ]


def inspect_pair(
    model: Callable, guide: Callable, args: tuple, kwargs: dict[str, Any]
) -> PairStructure:
    """Run the guide once, replay the model against it, and check that the two line up.

    :raises ModelGuideMismatchError: for a guide site the model lacks, an observed site in the
        guide, or a latent site of the model that the guide does not cover.
    """
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    guide_sites = _sample_sites(guide_trace)
    model_sites = {site["name"]: site for site in _sample_sites(model_trace)}
    for site in guide_sites:
        if site["is_observed"]:
            raise ModelGuideMismatchError(
                f"site '{site['name']}' is observed in the guide; observations belong in the "
                "model only: remove obs= from the guide's pyro.sample."
            )
        if site["infer"].get("is_auxiliary"):
            continue
        if site["name"] not in model_sites:
            known = sorted(model_sites)
            raise ModelGuideMismatchError(
                f"the guide samples site '{site['name']}', which the model lacks "
                f"(the model's sample sites are {known}); rename it to match a model site."
            )
        if model_sites[site["name"]]["is_observed"]:
            raise ModelGuideMismatchError(
                f"the guide samples site '{site['name']}', which the model observes; "
                "a guide covers latent sites only: remove it from the guide."
            )
    guide_names = {site["name"] for site in guide_sites}
    uncovered = [
        name
        for name, site in model_sites.items()
        if not site["is_observed"] and name not in guide_names
    ]
    if uncovered:
        raise ModelGuideMismatchError(
            f"the model's latent site(s) {uncovered} have no guide site; add a pyro.sample "
            "with the same name to the guide."
        )
    latent = tuple(
        _site_info(site) for site in guide_sites if not site["infer"].get("is_auxiliary")
    )
    observed = tuple(_site_info(site) for site in model_sites.values() if site["is_observed"])
    nesting = max(
        (
            -frame.dim
            for site in guide_sites + list(model_sites.values())
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        ),
        default=0,
    )
    return PairStructure(latent=latent, observed=observed, max_plate_nesting=nesting)


def vectorized_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict[str, Any],
    num_particles: int,
    max_plate_nesting: int,
    *,
    plate_name: str = PARTICLE_PLATE,
) -> tuple[Trace, Trace]:
    """Guide and model traces with ``num_particles`` draws in a plate left of every other plate.

    The particle plate sits at dim ``-(max_plate_nesting + 1)``, as in Pyro's own vectorised
    ELBOs; log-probabilities are computed (model) and score parts too (guide).
    """
    particles = pyro.plate(plate_name, num_particles, dim=-(max_plate_nesting + 1))
    return get_importance_trace(
        "flat", max_plate_nesting + 1, particles(model), particles(guide), args, kwargs
    )


def sum_except(tensor: torch.Tensor, dims: tuple[int, ...], rank: int) -> torch.Tensor:
    """Sum ``tensor``, right-aligned in ``rank`` dims, over every dim not in ``dims`` (negative
    dims), keeping the kept dims in place: the result has shape of rank ``rank``."""
    tensor = tensor.reshape((1,) * (rank - tensor.dim()) + tuple(tensor.shape))
    drop = [d for d in range(-rank, 0) if d not in dims]
    return tensor.sum(dim=drop, keepdim=True) if drop else tensor
