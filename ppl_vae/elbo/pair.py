"""The structure of a model/guide pair: its sites, its plates, and vectorised traces of it.

Everything that inspects a pair before computing with it lives here, so that a pair that
does not line up fails once, early, with a message that says how to fix it. The checks do not
depend on Pyro's global validation flag: plates and supports are compared here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import pyro
import torch
from pyro import poutine
from pyro.infer.enum import get_importance_trace
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace

from ppl_vae.errors import ModelGuideMismatchError, NotEnumerableError, PairExecutionError
from ppl_vae.rng import forked_rng

__all__ = [
    "PARTICLE_PLATE",
    "BoundPair",
    "PairStructure",
    "SiteInfo",
    "bind_pair",
    "frames_subsample_factor",
    "inspect_pair",
    "subsample_factor",
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
    subsample_factor: float = 1.0  # prod over its plates of full size / subsample size


@dataclass(frozen=True)
class PairStructure:
    """Latent sites (in guide order), observed sites (in model order), and plate nesting.

    ``model_enumerated`` holds the discrete latent sites of the model that the guide leaves
    out: they are summed out in the model (``TraceEnum_ELBO``), not sampled.
    """

    latent: tuple[SiteInfo, ...]
    observed: tuple[SiteInfo, ...]
    max_plate_nesting: int
    model_enumerated: tuple[SiteInfo, ...] = ()

    @property
    def enumerable_latent(self) -> tuple[SiteInfo, ...]:
        """The guide's discrete sites: enumerated where an estimator can sum over them."""
        return tuple(site for site in self.latent if site.enumerable)

    @property
    def sampled_latent(self) -> tuple[SiteInfo, ...]:
        """The guide's sites that no estimator can sum over: they are always sampled."""
        return tuple(site for site in self.latent if not site.enumerable)

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


def subsample_factor(site: dict) -> float:
    """N / m for each subsampled plate around ``site``, multiplied: the scale Pyro adds."""
    return frames_subsample_factor(site["cond_indep_stack"])


def frames_subsample_factor(frames: Iterable[CondIndepStackFrame]) -> float:
    """prod over ``frames`` of full size / subsample size (1 for a plate not subsampled)."""
    factor = 1.0
    for frame in frames:
        if frame.full_size is not None and frame.size not in (None, 0, -1):
            factor *= float(frame.full_size) / float(frame.size)
    return factor


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
        subsample_factor=subsample_factor(site),
    )


def _sample_sites(trace: Trace) -> list[dict]:
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not poutine.util.site_is_subsample(site)
    ]


def _run(fn: Callable, role: str, args: tuple, kwargs: dict[str, Any]) -> Trace:
    """Trace ``fn``; an exception of the user's code becomes one typed error naming it."""
    try:
        return poutine.trace(fn).get_trace(*args, **kwargs)
    except (IndexError, RuntimeError, TypeError, KeyError, AttributeError) as error:
        raise PairExecutionError(
            f"the {role} raised {type(error).__name__}: {error}. Check that its arguments "
            "are the model's arguments and that the guide's values lie in the model's supports."
        ) from error


def inspect_pair(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict[str, Any],
    *,
    allow_model_enumeration: bool = False,
) -> PairStructure:
    """Run the guide once, replay the model against it, and check that the two line up.

    :param allow_model_enumeration: accept discrete latent sites of the model that the guide
        leaves out (they are then summed out in the model by the estimators that can).
    :raises ModelGuideMismatchError: for a guide site the model lacks, an observed site in the
        guide, a latent site of the model that the guide does not cover, a site whose plates
        differ between model and guide, or a guide value outside the model's support.
    """
    with poutine.block():
        guide_trace = _run(guide, "guide", args, kwargs)
        model_trace = _run(poutine.replay(model, trace=guide_trace), "model", args, kwargs)
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
        _check_site_matches(site, model_sites[site["name"]])
    guide_names = {site["name"] for site in guide_sites}
    uncovered = [
        site
        for name, site in model_sites.items()
        if not site["is_observed"] and name not in guide_names
    ]
    not_enumerable = [s["name"] for s in uncovered if not s["fn"].has_enumerate_support]
    if uncovered and (not allow_model_enumeration or not_enumerable):
        names = not_enumerable if allow_model_enumeration else [s["name"] for s in uncovered]
        hint = "" if allow_model_enumeration else " (or, for discrete sites, enumerate them)"
        raise ModelGuideMismatchError(
            f"the model's latent site(s) {names} have no guide site; add a pyro.sample "
            f"with the same name to the guide{hint}."
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
    return PairStructure(
        latent=latent,
        observed=observed,
        max_plate_nesting=nesting,
        model_enumerated=tuple(_site_info(site) for site in uncovered),
    )


def _check_site_matches(guide_site: dict, model_site: dict) -> None:
    """Same plates in model and guide, and the guide's values inside the model's support.

    Pyro checks plates only with validation on; a guide that forgets a plate would otherwise
    broadcast its draw across the data and give a plausible, wrong number.
    """
    name = guide_site["name"]
    in_guide = sorted(p[0] for p in _plates(guide_site))
    in_model = sorted(p[0] for p in _plates(model_site))
    if in_guide != in_model:
        raise ModelGuideMismatchError(
            f"site '{name}' is inside plates {in_model} in the model but {in_guide} in the "
            "guide; put the guide's pyro.sample inside the same pyro.plate(...) contexts."
        )
    model_fn, guide_fn = model_site["fn"], guide_site["fn"]
    if tuple(guide_fn.batch_shape) != tuple(model_fn.batch_shape):
        raise ModelGuideMismatchError(
            f"site '{name}' has batch shape {tuple(model_fn.batch_shape)} in the model but "
            f"{tuple(guide_fn.batch_shape)} in the guide; give the guide's distribution the "
            "model's shape (e.g. .expand(...) or .to_event(...))."
        )
    if getattr(guide_fn, "has_enumerate_support", False):
        values = guide_fn.enumerate_support(expand=False)
    else:
        values = guide_site["value"]
    try:
        inside = model_fn.support.check(values)
    except (RuntimeError, NotImplementedError):  # a support that cannot check these shapes
        return
    if not bool(inside.all()):
        outside = values[~inside.expand_as(values)] if inside.shape == values.shape else values
        shown = sorted({float(v) for v in outside.reshape(-1)[:5].tolist()})
        raise ModelGuideMismatchError(
            f"the guide's site '{name}' takes values {shown} outside the model's support "
            f"({model_fn.support}); give the guide the model's support (e.g. the same number "
            "of categories)."
        )


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


class _PinScales(Messenger):
    """Outermost handler that rewrites each sample site's scale after the pair's own handlers.

    ``strip_subsample`` divides out the N/m that a subsampled plate multiplies in (minibatch
    quantities); ``unit_latent`` sets every latent site's scale to 1 (the beta = 1 pair: a
    KL weight applied with ``poutine.scale`` is removed, from model and guide alike).
    """

    def __init__(self, *, strip_subsample: bool, unit_latent: bool):
        super().__init__()
        self.strip_subsample = strip_subsample
        self.unit_latent = unit_latent

    def _process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or poutine.util.site_is_subsample(msg):
            return
        if self.unit_latent and not msg["is_observed"]:
            msg["scale"] = 1.0
        elif self.strip_subsample:
            factor = subsample_factor(msg)
            if factor != 1.0:
                msg["scale"] = msg["scale"] / factor


ScaleMode = Literal["as_written", "minibatch", "true"]


@dataclass(frozen=True)
class BoundPair:
    """A model/guide pair bound to its data once: arguments, structure, fixed subsample.

    Every estimator of one report runs ``model_fn(mode)`` / ``guide_fn(mode)``, which replay
    the subsample indices drawn at binding: they all see the same minibatch by construction.
    Modes: ``"as_written"`` keeps every scale (Pyro's full-data objective), ``"minibatch"``
    removes the subsampling factor N/m (the beta-objective on the minibatch), ``"true"`` also
    sets the latent sites' scales to 1 (the ELBO at beta = 1, log p(x), the posterior).
    """

    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict[str, Any]
    structure: PairStructure
    subsample: Trace  # the subsample sites only, replayed into model and guide
    latent_scales: dict[str, float | None]  # user scale (beta) per latent site; None: varies
    cast_float64: bool = False

    @property
    def subsampled(self) -> dict[str, tuple[int, int]]:
        """{plate: (m, N)} for each subsampled plate."""
        out = {}
        for site in self.structure.latent + self.structure.observed:
            for name, _, size in site.plates:
                factor = site.subsample_factor
                if factor != 1.0 and name not in out:
                    out[name] = (size, round(size * factor))
        return out

    def model_fn(self, mode: ScaleMode = "true") -> Callable:
        """The model with the fixed subsample and the scales of ``mode``."""
        return self._wrap(self.model, mode)

    def guide_fn(self, mode: ScaleMode = "true") -> Callable:
        """The guide with the fixed subsample and the scales of ``mode``."""
        return self._wrap(self.guide, mode)

    def _wrap(self, fn: Callable, mode: ScaleMode) -> Callable:
        fixed = poutine.replay(fn, trace=self.subsample)
        if mode == "as_written":
            return fixed
        pin = _PinScales(strip_subsample=True, unit_latent=mode == "true")
        return pin(fixed)


def bind_pair(model: Callable, guide: Callable, args: tuple, kwargs: dict[str, Any]) -> BoundPair:
    """Bind ``(model, guide)`` to ``args``: draw the subsample indices once, read the structure.

    float64 tensors in the arguments are cast to float32, the parameters' dtype: Pyro's
    enumeration cannot mix the two (the report says so). Binding runs the pair under a forked
    random stream, so the estimators that follow draw what they would have drawn without it.
    """
    with forked_rng():
        return _bind(model, guide, args, kwargs)


def _bind(model: Callable, guide: Callable, args: tuple, kwargs: dict[str, Any]) -> BoundPair:
    cast = any(_is_float64(a) for a in (*args, *kwargs.values()))
    if cast:
        args = tuple(_as_float32(a) for a in args)
        kwargs = {k: _as_float32(v) for k, v in kwargs.items()}
    with poutine.block():
        guide_trace = _run(guide, "guide", args, kwargs)
        model_trace = _run(poutine.replay(model, trace=guide_trace), "model", args, kwargs)
    subsample = Trace()
    for trace in (guide_trace, model_trace):
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and poutine.util.site_is_subsample(site):
                if name not in subsample.nodes:
                    subsample.add_node(name, **site)
    fixed_model = poutine.replay(model, trace=subsample)
    fixed_guide = poutine.replay(guide, trace=subsample)
    structure = inspect_pair(fixed_model, fixed_guide, args, kwargs, allow_model_enumeration=True)
    scales: dict[str, float | None] = {}
    with poutine.block():
        trace = poutine.trace(fixed_guide).get_trace(*args, **kwargs)
    for site in structure.latent:
        node = trace.nodes[site.name]
        scale = node["scale"]
        if isinstance(scale, torch.Tensor):
            flat = scale.reshape(-1)
            scale = float(flat[0]) if bool((flat == flat[0]).all()) else None
        scales[site.name] = None if scale is None else scale / site.subsample_factor
    return BoundPair(model, guide, args, kwargs, structure, subsample, scales, cast)


def _is_float64(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float64


def _as_float32(value: Any) -> Any:
    return value.float() if _is_float64(value) else value
