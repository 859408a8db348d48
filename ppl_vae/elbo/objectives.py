"""The "sticking the landing" ELBO as a Pyro ELBO class, and the particles it shares with
the importance-weighted classes (:mod:`ppl_vae.elbo.importance_weighted`: IWAE, DReG).

:class:`STLTrace_ELBO`: the ELBO, with the "sticking the landing" gradient (Roeder et al.
2017): grad_phi [log p(x, z(phi)) - log q(z(phi); sg phi)], the reparameterised gradient less
the score term, zero at q = p(z | x).

Each of these classes draws its particles with Pyro's own machinery (``get_importance_trace``
under the ``num_particles_vectorized`` plate, :func:`_get_particles` here), so a seed gives the
draws ``Trace_ELBO`` makes with the same settings, and each has ``loss``,
``differentiable_loss`` and ``loss_and_grads``, so ``pyro.infer.SVI`` trains with it.

Score-term removal needs log q(sg z; phi): the guide replayed (``poutine.replay``) against a
copy of its own trace whose values are detached. The replay draws nothing, so the guide (and,
for DReG, the model) must be a deterministic function of its sample sites and parameters: no
dropout or other hidden randomness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, warn_if_nan
from torch import Tensor

from ppl_vae.errors import EstimatorError

__all__ = ["STLTrace_ELBO"]


class _Recorded:
    """``fn`` run under a trace of its own, kept in ``self.trace``.

    ``get_importance_trace`` prunes the subsample sites from the traces it returns; replaying
    against a pruned trace would draw new subsample indices, so replays use this full trace.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.trace: Trace | None = None

    def __call__(self, *args, **kwargs) -> Any:
        tracer = poutine.trace(self.fn)
        out = tracer(*args, **kwargs)
        self.trace = tracer.msngr.trace
        return out

    def replay_detached(self, args: tuple, kwargs: dict) -> Trace:
        """The trace of ``fn`` replayed against its recorded values, detached: log-densities
        at sg(z), with the parameters live. Subsample sites pruned, log_prob computed."""
        if self.trace is None:  # a programming error of this module, not of the user
            raise RuntimeError("replay_detached called before the recorded run")
        detached = self.trace.copy()  # shallow: replace the sample nodes, never mutate them
        for name, site in self.trace.nodes.items():
            if site["type"] == "sample" and torch.is_tensor(site["value"]):
                detached.nodes[name] = {**site, "value": site["value"].detach()}
        with poutine.block():  # private to the estimator: outer handlers see one run
            trace = poutine.trace(poutine.replay(self.fn, trace=detached)).get_trace(
                *args, **kwargs
            )
        trace = prune_subsample_sites(trace)
        trace.compute_log_prob()
        return trace


class _Particles(NamedTuple):
    """What ``_get_trace`` yields: Pyro's model and guide traces (pruned, log-densities and
    score parts computed) and the recorded model and guide, for the detached replays."""

    model_trace: Trace
    guide_trace: Trace
    model: _Recorded
    guide: _Recorded


def _sample_sites(trace: Trace) -> Iterable[dict]:
    return (site for site in trace.nodes.values() if site["type"] == "sample")


def _latent_sites(trace: Trace) -> Iterable[dict]:
    return (site for site in _sample_sites(trace) if not site["is_observed"])


def _require_reparameterized(guide_trace: Trace, estimator: str) -> None:
    for site in _latent_sites(guide_trace):
        if not site["fn"].has_rsample:
            family = site["fn"]
            while hasattr(family, "base_dist"):  # Independent/Expanded/Masked: name the family
                family = family.base_dist
            family = type(family).__name__
            raise EstimatorError(
                f"{estimator} needs every latent site of the guide to be reparameterised, but "
                f"site '{site['name']}' ({family}) has no rsample: its gradient would need a "
                "score-function term, which this estimator does not have. Use Trace_ELBO or "
                "TraceGraph_ELBO for this pair."
            )


def _get_particles(elbo: ELBO, model: Callable, guide: Callable, args, kwargs) -> _Particles:
    """Pyro's importance trace of (model, guide), with both also recorded unpruned."""
    if isinstance(poutine.unwrap(guide), Messenger):
        raise NotImplementedError(
            f"{type(elbo).__name__} replays the guide, which a GuideMessenger guide does not "
            "support; use a callable guide (e.g. AutoNormal rather than AutoNormalMessenger)"
        )
    model, guide = _Recorded(model), _Recorded(guide)
    model_trace, guide_trace = get_importance_trace(
        "flat", elbo.max_plate_nesting, model, guide, args, kwargs
    )
    if is_validation_enabled():
        check_if_enumerated(guide_trace)
    _require_reparameterized(guide_trace, type(elbo).__name__)
    return _Particles(model_trace, guide_trace, model, guide)


def _log_prob_sum(sites: Iterable[dict]) -> Tensor | float:
    """The sum of the sites' scaled, masked log-densities (0.0 for no site)."""
    return sum((site["log_prob_sum"] for site in sites), 0.0)


def _surrogate_backward(elbo: ELBO, surrogate_loss: Any, particles: _Particles) -> None:
    """Backward on ``surrogate_loss`` when the pair has parameters and it has a graph, as
    ``Trace_ELBO.loss_and_grads`` does."""
    trainable = any(
        site["type"] == "param"
        for trace in (particles.model_trace, particles.guide_trace)
        for site in trace.nodes.values()
    )
    if trainable and getattr(surrogate_loss, "requires_grad", False):
        surrogate_loss.backward(retain_graph=elbo.retain_graph)


class STLTrace_ELBO(ELBO):
    r"""The ELBO with the "sticking the landing" gradient (Roeder, Wu, Duvenaud 2017,
    arXiv:1703.09194).

    Value: the ELBO estimate of ``Trace_ELBO`` from the same draws. Gradient: the
    reparameterised one with the score term removed,

        grad_phi [log p(x, z(phi)) - log q(z(phi); sg(phi))],

    whose variance vanishes as q approaches p(z | x). Surrogate:
    log p(x, z) - log q(z; phi) + [log q(sg z; phi) - sg(log q(sg z; phi))], with
    log q(sg z; phi) from the guide replayed against its detached trace, so guides whose later
    sites depend on earlier samples, and ``pyro.module`` guides, are handled. Scales and
    masks apply as in ``Trace_ELBO``.

    The constructor is :class:`pyro.infer.ELBO`'s:

    :param num_particles: draws per estimate (default 1).
    :param max_plate_nesting: plates nested in the model; needed (or guessed by running the
        pair once) only with ``vectorize_particles=True``.
    :param vectorize_particles: draw the particles at once in Pyro's particle plate (same
        draws as ``Trace_ELBO(vectorize_particles=True)``) rather than one at a time.
    :param retain_graph: passed to ``backward`` in :meth:`loss_and_grads`.
    :raises EstimatorError: when a latent site of the guide has no ``rsample``.
    """

    def _get_trace(self, model, guide, args, kwargs) -> _Particles:
        return _get_particles(self, model, guide, args, kwargs)

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """-ELBO, estimated from ``num_particles`` draws, as ``Trace_ELBO.loss``.

        :returns: the loss, a float.
        """
        elbo = 0.0
        with torch.no_grad():
            for particles in self._get_traces(model, guide, args, kwargs):
                elbo_particle = torch_item(
                    _log_prob_sum(_sample_sites(particles.model_trace))
                ) - torch_item(_log_prob_sum(_sample_sites(particles.guide_trace)))
                elbo += elbo_particle / self.num_particles
        loss = -elbo
        warn_if_nan(loss, "loss")
        return loss

    def _surrogate_particle(
        self, particles: _Particles, args: tuple, kwargs: dict
    ) -> tuple[float, Tensor]:
        """(-ELBO, surrogate loss) of one draw (all ``num_particles`` draws when vectorised)."""
        log_p = _log_prob_sum(_sample_sites(particles.model_trace))
        log_q = _log_prob_sum(_sample_sites(particles.guide_trace))
        # log q(sg z; phi) - sg(...): value 0, gradient the score term d/dphi log q(z; phi)|z,
        # which cancels the score term inside -log q(z(phi); phi).
        replay = particles.guide.replay_detached(args, kwargs)
        latent = {site["name"] for site in _latent_sites(particles.guide_trace)}
        log_q_fixed_z = _log_prob_sum(s for s in _sample_sites(replay) if s["name"] in latent)
        score = log_q_fixed_z - torch_item(log_q_fixed_z) if latent else 0.0
        loss = -(torch_item(log_p) - torch_item(log_q))
        return loss, -(log_p - log_q + score)

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        """-ELBO, with the STL gradient.

        :returns: a scalar tensor: the value of :meth:`loss`, the gradient of the STL estimator.
        """
        loss, surrogate_loss = 0.0, 0.0
        for particles in self._get_traces(model, guide, args, kwargs):
            loss_particle, surrogate_particle = self._surrogate_particle(particles, args, kwargs)
            loss += loss_particle / self.num_particles
            surrogate_loss = surrogate_loss + surrogate_particle / self.num_particles
        warn_if_nan(surrogate_loss, "loss")
        return loss + (surrogate_loss - torch_item(surrogate_loss))

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """-ELBO; backward on the STL surrogate, one draw at a time as ``Trace_ELBO`` does.

        :returns: the loss, a float.
        """
        loss = 0.0
        for particles in self._get_traces(model, guide, args, kwargs):
            loss_particle, surrogate_particle = self._surrogate_particle(particles, args, kwargs)
            loss += loss_particle / self.num_particles
            _surrogate_backward(self, surrogate_particle / self.num_particles, particles)
        warn_if_nan(loss, "loss")
        return loss
