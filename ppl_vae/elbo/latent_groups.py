"""The latent sites of a discrete pair, grouped for the brute-force posterior of
:mod:`ppl_vae.elbo.posterior`: the globals, and one group per factor plate.

A latent site is *global* (in no vectorised plate) or *local* to its outermost vectorised
plate P. A group's configuration index c = u * M + m is mixed-radix over its sites' elements,
the guide sites' digits u before the model-only ones' m, so a group of sites with supports
k_s and e_s elements each (per element of P) has prod_s k_s^e_s configurations. Here: the
sites found by one trace of guide and model, the groups and why a factorised table cannot be
built, and the value tensors that put configuration c in row c of a group's enumeration dim
(vectorised) or element i in configuration digits[i] (plain trace). The names are private to
the posterior table.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ppl_vae.errors import ModelGuideMismatchError, NotEnumerableError

__all__: list[str] = []

_PARTICLES = "num_particles_vectorized"
_CAUSES = (
    "Likely causes: a poutine.scale (a beta / KL weight) or a subsampling scale on a latent "
    "site, a mask (poutine.mask, .mask()), an unnormalised guide distribution. Pass the pair "
    "with its latent sites' scales and masks removed."
)


class _Latent(NamedTuple):
    name: str
    support: torch.Tensor  # (k, *event_shape)
    batch_shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    in_guide: bool
    plate: tuple[str, int] | None  # (name, dim) of the outermost vectorised plate


@dataclass(frozen=True)
class _Group:
    """The globals (plate None) or one factor plate's local latents, and their enumeration dim.
    Configuration index = u * M + m: the guide sites' digits u before the model-only ones' m."""

    plate: str | None
    dim: int | None
    size: int
    enum_dim: int
    sites: tuple[_Latent, ...]
    counts: tuple[int, ...]  # elements of each site per element of the plate

    def configs(self, in_guide: bool) -> int:
        pairs = zip(self.sites, self.counts, strict=True)
        return math.prod(s.support.shape[0] ** c for s, c in pairs if s.in_guide == in_guide)

    @property
    def total(self) -> int:
        return self.configs(True) * self.configs(False)


def _names(sites) -> str:
    return ", ".join(f"'{getattr(s, 'name', s)}'" for s in sites)


def _power(sites, counts) -> str:
    """prod k^count as powers, e.g. '3 x 2^40'."""
    powers: Counter[int] = Counter()
    for s, c in zip(sites, counts, strict=True):
        powers[s.support.shape[0]] += c
    return " x ".join(f"{k}^{e}" if e > 1 else f"{k}" for k, e in sorted(powers.items())[::-1])


def _samples(trace) -> dict[str, dict]:
    nodes = trace.nodes.items()
    return {n: s for n, s in nodes if s["type"] == "sample" and not site_is_subsample(s)}


def _outermost(site: dict) -> tuple[str, int] | None:
    frames = [f for f in site["cond_indep_stack"] if f.vectorized and f.name != _PARTICLES]
    return (frames[0].name, frames[0].dim) if frames else None


def _family(fn) -> str:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return type(fn).__name__


def _latent(guide_site: dict | None, model_site: dict) -> _Latent:
    site = guide_site or model_site
    fn, name = site["fn"], site["name"]
    for s, side in ((guide_site, "guide"), (model_site, "model")):
        scale, mask = torch.as_tensor(s["scale"] if s else 1.0), s and s["mask"]
        masked = mask is not None and not bool(torch.as_tensor(mask).all())
        if bool((scale != 1).any()) or masked:
            what = "a mask" if masked else f"scale {scale.flatten()[0]:g}"
            raise NotEnumerableError(
                f"latent site '{name}' carries {what} in the {side}: its density is not "
                f"normalised, so the table's KL would not be KL(q || p(z | x)). {_CAUSES}"
            )
    support = fn.enumerate_support(expand=False)
    support = support.reshape(support.shape[0], *fn.event_shape)
    other = model_site["fn"]
    if guide_site is not None and not (
        other.has_enumerate_support
        and torch.equal(other.enumerate_support(expand=False).flatten(), support.flatten())
    ):
        raise ModelGuideMismatchError(
            f"site '{name}' has another support in the model ({_family(other)}) than in the "
            f"guide ({_family(fn)}); the posterior table needs the same values in both."
        )
    batch, event = tuple(fn.batch_shape), tuple(fn.event_shape)
    return _Latent(name, support, batch, event, guide_site is not None, _outermost(site))


def _inspect(model, guide, args, kwargs) -> tuple[list[_Latent], int, int]:
    """Latent sites (guide's, then model-only), the pair's batch rank, its widest site."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        replayed = poutine.replay(model, trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    guide_sites, model_sites = _samples(guide_trace), _samples(model_trace)
    latents = []
    for name, site in guide_sites.items():
        other = model_sites.get(name)
        if site["is_observed"] or other is None or other["is_observed"]:
            where = "guide" if site["is_observed"] else "model" if other else "guide only"
            raise ModelGuideMismatchError(
                f"guide site '{name}' is not a latent site of the model (observed in the {where})"
            )
        if site["infer"].get("is_auxiliary") or not site["fn"].has_enumerate_support:
            raise NotEnumerableError(
                "the brute-force posterior needs every latent site of the guide to be discrete "
                f"and enumerable, but site '{name}' is a {_family(site['fn'])}. Use a sampled "
                "estimate (exact=False) or the IWAE estimate of log p(x) instead."
            )
        latents.append(_latent(site, other))
    for name, site in model_sites.items():
        if not site["is_observed"] and name not in guide_sites:
            if not site["fn"].has_enumerate_support:
                raise ModelGuideMismatchError(
                    f"the model's latent site '{name}' is a {_family(site['fn'])} the guide "
                    f"lacks; only discrete sites can be summed out: add '{name}' to the guide."
                )
            latents.append(_latent(None, site))
    every = [*guide_sites.values(), *model_sites.values()]
    dims = [-f.dim for s in every for f in s["cond_indep_stack"] if f.vectorized]
    rank = max([*dims, *(len(s["fn"].batch_shape) for s in every), 0])
    return latents, rank, max([math.prod(s["fn"].batch_shape) for s in every] + [1])


def _digits(group: _Group) -> dict[str, torch.Tensor]:
    """(C, count) mixed-radix digits of every configuration index, per site."""
    index, stride, out = torch.arange(group.total), 1, {}
    for site, count in reversed(list(zip(group.sites, group.counts, strict=True))):
        k, cols = site.support.shape[0], []
        for _ in range(count):
            cols.append(index // stride % k)
            stride *= k
        out[site.name] = torch.stack(cols, -1) if cols else index.new_zeros(len(index), 0)
    return out


def _grid_value(site: _Latent, digits: torch.Tensor, group: _Group, rank: int) -> torch.Tensor:
    """Configuration c in row c of the group's enumeration dim, the same for every element."""
    batch, event = list(site.batch_shape), list(site.event_shape)
    chosen = site.support[digits]  # (C, count, *event)
    if group.dim is not None:
        pos = len(batch) + group.dim
        chosen = chosen.reshape(-1, *batch[:pos], 1, *batch[pos + 1 :], *event)
        chosen = chosen.expand(-1, *batch, *event)
    return chosen.reshape(-1, *[1] * (-group.enum_dim - 1 - len(batch)), *batch, *event)


def _plain_value(site: _Latent, digits: torch.Tensor, group: _Group) -> torch.Tensor:
    """Element i of the plate in the configuration of digits[i] (globals: digits[0])."""
    batch, event = list(site.batch_shape), list(site.event_shape)
    chosen = site.support[digits]  # (N, count, *event)
    if group.dim is None:
        return chosen.reshape([*batch, *event])
    pos = len(batch) + group.dim
    return chosen.reshape(-1, *batch[:pos], *batch[pos + 1 :], *event).movedim(0, pos)


def _factor_groups(latents, rank: int, widest: int, cap: int, max_elements: int):
    """The globals and one group per factor plate; why the factorised table cannot be built."""
    by_plate: dict[tuple[str, int] | None, list[_Latent]] = {}
    for s in latents:
        by_plate.setdefault(s.plate, []).append(s)
    glob = tuple(by_plate.pop(None, []))
    if not by_plate:
        return [], [f"the latent sites {_names(latents)} are in no plate"]
    groups = [
        _Group(None, None, 1, -(rank + 1), glob, tuple(math.prod(s.batch_shape) for s in glob))
    ]
    for n, ((plate, dim), sites) in enumerate(by_plate.items()):
        size = sites[0].batch_shape[dim]
        counts = tuple(math.prod(s.batch_shape) // size for s in sites)
        groups.append(_Group(plate, dim, size, -(rank + 2 + n), tuple(sites), counts))
    G, reasons = groups[0].total, []
    marginal = [s for s in glob if not s.in_guide]
    if marginal and any(g.configs(True) > 1 for g in groups[1:]):
        local = [s for g in groups[1:] for s in g.sites if s.in_guide]
        reasons.append(
            f"the model-only global sites {_names(marginal)}, summed out, couple the local "
            f"guide sites {_names(local)} of every element: the posterior does not factorise"
        )
    # The cap bounds the truly joint parts only: the global configurations, and the local
    # configurations of one element; the elements themselves are free (bounded by memory).
    joint = [("global", glob, groups[0].counts, G)] * (G > cap) + [
        (f"per element of '{g.plate}'", g.sites, g.counts, g.total)
        for g in groups[1:]
        if g.total > cap
    ]
    for where, sites, counts, total in joint:
        reasons.append(
            f"the sites {_names(sites)} take {_power(sites, counts)} = {total} joint "
            f"configurations {where}, over the cap {cap}"
        )
    if G * math.prod(g.total for g in groups[1:]) * widest > max_elements:
        reasons.append(f"its vectorised log-probabilities exceed max_elements {max_elements}")
    return groups, reasons
