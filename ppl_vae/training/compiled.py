"""The compiled training step (``TrainConfig.engine = "compiled"``): the loss
``elbo.differentiable_loss(model, guide, x, ...)`` and its gradients d loss / d theta, captured
once per batch shape as one graph of tensor operations and replayed without Pyro's Python.

Capture runs the pair once through Pyro's own ELBO under ``make_fx`` (PyTorch 2's tracer at
the dispatcher: every operation of the forward pass and of autograd's backward, parameters and
tensor arguments as the graph's inputs), then compiles the graph with inductor (with CUDA
graphs on a GPU). The graph draws its noise with the same operations, in the same order, from
the same generator as the eager step (``fallback_random``), so it draws what the default engine
draws; only inductor's fused arithmetic can move the last bits.

A step can be captured when its Python is a function of the batch's shapes and the non-tensor
keyword values (both key the cache of graphs) and never reads a tensor's value: a first pass
on fake tensors, which hold no values, finds such reads (``.item()``, ``if tensor:``) and the
step is then refused with the place that reads. What no check can see is Python state of the
pair's own (a counter it branches on, Python's or numpy's random numbers): as with Pyro's Jit
ELBOs, the graph replays what that state was at capture. Pyro's own two reads
(``warn_if_nan``'s check and ``torch_item``'s float copy of the loss) are lifted while
capturing: the loop's guard checks every step's loss for NaN, and the copy stays a tensor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import pyro
import pyro.infer.util
import pyro.util
import torch
from torch import Tensor

from ppl_vae.rng import forked_rng

__all__ = ["CaptureRefused", "CompiledStep"]

# Inductor's random numbers come from its own Philox stream; the eager kernels keep the
# default engine's draws.
_INDUCTOR_OPTIONS: dict[str, Any] = {"fallback_random": True}
_TORCH_DIR = os.path.dirname(torch.__file__)
MAX_GRAPHS = 8
"""Graphs kept per step (batch shapes x keyword values): a training run needs one or two; more
means a value that changes every step, which would recompile at every step."""


class CaptureRefused(Exception):
    """The step cannot be captured as a fixed graph; the message says why and where."""


@contextlib.contextmanager
def _pyro_without_host_reads() -> Iterator[None]:
    """Pyro's ``warn_if_nan`` and ``torch_item`` as tensor operations, in every module that
    imported them (Pyro's ELBOs, and any other)."""
    warn, item = pyro.util.warn_if_nan, pyro.infer.util.torch_item
    with contextlib.ExitStack() as stack:
        for module in list(sys.modules.values()):
            names = getattr(module, "__dict__", {})
            if names.get("warn_if_nan") is warn:
                stack.enter_context(mock.patch.object(module, "warn_if_nan", _unchecked))
            if names.get("torch_item") is item:
                stack.enter_context(mock.patch.object(module, "torch_item", _as_tensor))
        yield


def _unchecked(value: Any, *args: Any, **kwargs: Any) -> Any:
    return value


def _as_tensor(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


def _where(error: BaseException) -> str:
    """The innermost frame of ``error``'s traceback outside torch, as ``file:line: code``."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if _TORCH_DIR not in f.filename]
    if not frames:
        return "inside torch"
    frame = frames[-1]
    return f"{os.path.relpath(frame.filename)}:{frame.lineno}: {(frame.line or '').strip()}"


def _refuse_value_reads(
    loss_of: Callable[..., Tensor], tensors: Sequence[Tensor], params: Sequence[Tensor]
) -> None:
    """Run ``loss_of(*tensors)`` and its backward on fake tensors (shapes, no values): any
    Python that reads a value raises there; raise :class:`CaptureRefused` naming the place.
    The backward writes fake gradients into ``params``' ``.grad``: they are put back."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    grads = [p.grad for p in params]
    try:  # static shapes: the graphs are per shape
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            loss_of(*(mode.from_tensor(t) for t in tensors)).backward()
    except Exception as error:  # any failure: the step is not a fixed graph
        raise CaptureRefused(f"the step {_what(error)} at {_where(error)}") from None
    finally:
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad


def _what(error: Exception) -> str:
    """What a failure on fake tensors says about the step, in the user's terms."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
    )
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    if isinstance(error, DataDependentOutputException | GuardOnDataDependentSymNode):
        return "reads a tensor's value in Python, which a fixed graph cannot"
    if isinstance(error, DynamicOutputShapeException):
        return "makes a tensor whose shape depends on values (e.g. boolean indexing)"
    reason = (str(error).strip().splitlines() or [""])[0][:160]
    return f"failed on shape-only tensors ({type(error).__name__}: {reason})"


def _check_graph(graph: torch.fx.GraphModule) -> None:
    """Refuse graphs that still read values back or hold tensors from outside the step."""
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten._local_scalar_dense.default:
            raise CaptureRefused("the step reads a tensor's value back to Python (.item())")
        if node.op == "get_attr":
            # torch.tensor(...) inside the step is a constant copied fresh on each replay;
            # anything else is a tensor the step reads from outside (a buffer, a global),
            # which a replay would not see change.
            users = list(node.users)
            if not all(u.target is torch.ops.aten.lift_fresh_copy.default for u in users):
                raise CaptureRefused(
                    "the step reads a tensor that is neither a parameter in Pyro's param "
                    "store nor an argument (a module buffer or a global tensor)"
                )


class CompiledStep:
    """d loss / d params as compiled graphs, one per batch shape and keyword values.

    ``loss_of(x, **kwargs)`` is the step's differentiable loss; ``params`` the tensors the
    optimizer updates (the graphs read them as they are at each call).
    :meth:`__call__` returns ``(loss, grads)``, or raises :class:`CaptureRefused` on the
    first call for a shape that cannot be captured. With ``inductor = False`` the captured
    graphs are replayed as they are: bitwise the eager step (for checking a capture)."""

    inductor: bool = True

    def __init__(
        self, loss_of: Callable[..., Tensor], params: Sequence[Tensor], device: torch.device
    ) -> None:
        self.loss_of, self.params, self.device = loss_of, list(params), device
        self.graphs: dict[Any, Callable[..., Any]] = {}
        self._values: dict[str, set[Any]] = {}  # each keyword's values met so far
        self.setup_seconds = 0.0  # capturing and compiling, all shapes so far

    def __call__(self, x: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, list[Tensor | None]]:
        names = sorted(k for k, v in kwargs.items() if isinstance(v, Tensor))
        tensors = [x, *(kwargs[k] for k in names)]
        key = self._key(tensors, names, kwargs)
        captured = self.graphs.get(key)
        if captured is None:
            for name, value in key[2]:
                self._values.setdefault(name, set()).add(value)
            if len(self.graphs) >= MAX_GRAPHS:
                changing = sorted(k for k, values in self._values.items() if len(values) > 1)
                raise CaptureRefused(
                    f"the step needs a new graph at every call ({MAX_GRAPHS} so far): its "
                    f"shapes or the keyword values {changing} change from step to step; pass a "
                    "number that changes as a 0-d tensor"
                )
            started = time.perf_counter()
            try:
                captured = self.graphs[key] = self._capture(tensors, names, kwargs)
            finally:
                self.setup_seconds += time.perf_counter() - started
        graph, used = captured
        with torch.no_grad():
            loss, *grads = graph(*self._inputs(), *tensors)
        found = iter(grads)
        return loss, [next(found) if u else None for u in used]

    def _inputs(self) -> list[Tensor]:
        """The parameters without autograd, taken anew at each call: a restore may give a
        parameter new storage (``p.data = ...``), which a view made earlier would not see."""
        return [p.detach() for p in self.params]

    @staticmethod
    def _key(tensors: list[Tensor], names: list[str], kwargs: dict[str, Any]) -> Any:
        shapes = tuple((t.shape, t.dtype, t.device) for t in tensors)
        statics = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
        try:
            hash(statics)
        except TypeError:
            raise CaptureRefused(
                "a keyword argument of the step is neither a tensor nor hashable: "
                f"{sorted(k for k, v in statics)}"
            ) from None
        return tuple(names), shapes, statics

    def _capture(
        self, tensors: list[Tensor], names: list[str], kwargs: dict[str, Any]
    ) -> Callable[..., Any]:
        from torch.fx.experimental.proxy_tensor import make_fx

        statics = {k: v for k, v in kwargs.items() if k not in names}

        def loss_of(x: Tensor, *values: Tensor) -> Tensor:
            return self.loss_of(x, **statics, **dict(zip(names, values, strict=True)))

        count = len(self.params)

        def grads_of(*flat: Tensor) -> tuple[Tensor | None, ...]:
            loss = loss_of(*flat[count:])
            return loss.detach(), *torch.autograd.grad(loss, flat[:count], allow_unused=True)

        with _pyro_without_host_reads(), pyro.validation_enabled(False):
            _refuse_value_reads(loss_of, tensors, self.params)
            # The capture runs the step for real: off the main stream, which the replays draw.
            with forked_rng(self.device):
                probe = grads_of(*self.params, *tensors)
                used = [g is not None for g in probe[1:]]  # a parameter the loss never reads

                def step(*flat: Tensor) -> tuple[Tensor, ...]:
                    out = grads_of(*flat)
                    return (out[0], *(g for g, u in zip(out[1:], used, strict=True) if u))

                graph = make_fx(step, tracing_mode="real")(*self.params, *tensors)
        _check_graph(graph)
        if not self.inductor:
            return graph, used
        return self._compiled(graph, tensors), used

    def _compiled(self, graph: torch.fx.GraphModule, tensors: list[Tensor]) -> Callable[..., Any]:
        """The graph through inductor (``compile_fx``, torch.compile's backend, called on the
        captured graph: no Python bytecode to guard, so no guards to check at each replay);
        checked once against its plain replay, from the same random state, to float32
        rounding of the loss."""
        from torch._inductor import config
        from torch._inductor.compile_fx import compile_fx

        options = dict(_INDUCTOR_OPTIONS)
        if self.device.type == "cuda":
            options["triton.cudagraphs"] = True
        # A CUDA build of torch on a machine without CUDA logs that it looks for it.
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level, quiet.level = quiet.level, logging.ERROR
        try:
            with config.patch(options), torch.no_grad():
                compiled = compile_fx(graph, [*self._inputs(), *tensors])
        except Exception as error:  # no C++ compiler, an operation inductor lacks, ...
            reason = (str(error).strip().splitlines() or [""])[0][:160]
            raise CaptureRefused(
                f"inductor could not compile the captured step ({type(error).__name__}: {reason})"
            ) from None
        finally:
            quiet.setLevel(level)
        with torch.no_grad(), forked_rng(self.device):
            state = _rng_state(self.device)
            plain_loss = graph(*self._inputs(), *tensors)[0]
            _set_rng_state(self.device, state)
            fast_loss = compiled(*self._inputs(), *tensors)[0]
        scale = max(1.0, float(plain_loss.abs()))
        if not abs(float(fast_loss) - float(plain_loss)) <= 1e-5 * scale:
            raise CaptureRefused(
                f"the compiled graph's loss {float(fast_loss)!r} differs from its replay's "
                f"{float(plain_loss)!r}"
            )
        return compiled


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
