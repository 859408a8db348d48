"""Pyro's ELBO objects by name, with the Jit mean-field ELBO made to trace once.

All four estimate the same objective, -ELBO = -E_q[log p(x, z) - log q(z)], from samples of the
guide; the "meanfield" ones replace E_q[log q(z) - log p(z)] by the closed-form KL where
``torch.distributions.kl_divergence`` has the pair, and the "jit" ones compile the trace of
model and guide once with ``torch.jit.trace`` and replay it afterwards.

Two of Pyro 1.9.2's Jit ELBOs go wrong in ``differentiable_loss``, the call a training loop
with its own optimiser makes (``SVI.step`` goes through ``loss_and_grads``, which is right):

- ``JitTraceMeanField_ELBO`` looks for its compiled function under one attribute name and
  stores it under another, so it traces model and guide anew on every call: slower than no
  Jit at all, and its memory grows with every step. :class:`PatchedJitTraceMeanField_ELBO`
  keeps the compiled function.
- ``JitTrace_ELBO`` returns ``loss + (surrogate - surrogate.detach())`` with a ``loss`` that is
  itself differentiable, so every reparameterised gradient comes out twice as large as
  ``Trace_ELBO``'s. :class:`PatchedJitTrace_ELBO` detaches it, as ``Trace_ELBO`` does.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

from pyro.infer import (
    ELBO,
    JitTrace_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceMeanField_ELBO,
)
from pyro.infer.util import torch_item
from pyro.util import warn_if_nan
from torch import Tensor

__all__ = ["ELBOS", "PatchedJitTraceMeanField_ELBO", "PatchedJitTrace_ELBO", "elbo_by_name"]

ELBOS = ("meanfield", "trace", "enum", "jit-meanfield", "jit-trace")
"""Names accepted by :func:`elbo_by_name`: TraceMeanField_ELBO (analytic KL), Trace_ELBO,
TraceEnum_ELBO (sums out the guide's sites marked for enumeration, e.g. M2's label), and
the Jit variants of the first two. The Jit ones are the fastest on a CPU
(benchmarks/README.md) but rest on ``torch.jit.trace``, which torch 2.14 deprecates; they
need a model of fixed structure and refuse beta schedules in ``fit``."""


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """torch 2.14 warns that ``torch.jit.trace`` is deprecated each time it compiles; the
    choice of a Jit ELBO is the user's, made knowing (see :data:`ELBOS`), so say it once there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.*", category=FutureWarning)
        yield


class PatchedJitTraceMeanField_ELBO(JitTraceMeanField_ELBO):
    """``JitTraceMeanField_ELBO`` that traces on its first call only.

    Like every Jit ELBO it keeps the model and guide of its first call (a call with another
    pair raises ``ValueError``) and compiles once per distinct set of keyword values; tensors
    must be positional arguments and, for a given keyword set, keep their shapes.
    """

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        compiled = getattr(self, "_differentiable_loss", None)
        if compiled is None:
            self._pair = (model, guide)
            with _quiet_tracing():
                return super().differentiable_loss(model, guide, *args, **kwargs)
        if model is not self._pair[0] or guide is not self._pair[1]:
            raise ValueError(
                "this Jit ELBO was compiled for another model/guide pair: use one ELBO object "
                "per pair"
            )
        kwargs["_pyro_model_id"] = id(model)  # the compiled function expects and drops them
        kwargs["_pyro_guide_id"] = id(guide)
        with _quiet_tracing():  # a new keyword value compiles again
            return compiled(*args, **kwargs)


class PatchedJitTrace_ELBO(JitTrace_ELBO):
    """``JitTrace_ELBO`` whose ``differentiable_loss`` has ``Trace_ELBO``'s gradient.

    The value is the -ELBO estimate; the gradient is that of the surrogate loss only (the
    reparameterised path plus the score-function terms), as ``loss_and_grads`` backpropagates.
    """

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        with _quiet_tracing():
            loss, surrogate_loss = self.loss_and_surrogate_loss(model, guide, *args, **kwargs)
        warn_if_nan(torch_item(loss), "loss")
        return loss.detach() + (surrogate_loss - surrogate_loss.detach())


def elbo_by_name(
    name: str, *, num_particles: int = 1, max_plate_nesting: float = float("inf")
) -> ELBO:
    """A fresh ELBO object for ``name`` (one of :data:`ELBOS`); particles vectorised when
    ``num_particles > 1``."""
    kwargs = {
        "num_particles": num_particles,
        "vectorize_particles": num_particles > 1,
        "max_plate_nesting": max_plate_nesting,
    }
    if name == "meanfield":
        return TraceMeanField_ELBO(**kwargs)
    if name == "trace":
        return Trace_ELBO(**kwargs)
    if name == "enum":
        return TraceEnum_ELBO(**kwargs)
    # Tracing warns about Python values baked into the graph (plate sizes, shapes): the caller
    # keeps one ELBO object per batch shape, which makes them constants indeed.
    if name == "jit-meanfield":
        return PatchedJitTraceMeanField_ELBO(ignore_jit_warnings=True, **kwargs)
    if name == "jit-trace":
        return PatchedJitTrace_ELBO(ignore_jit_warnings=True, **kwargs)
    raise ValueError(f"unknown elbo {name!r}; choose one of {ELBOS}")
