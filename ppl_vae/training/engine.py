"""The training step: ``elbo.differentiable_loss`` of a minibatch, backward, and ONE fused
``torch.optim.Adam`` over every parameter of Pyro's param store (with its learning-rate
schedule), the forward pass optionally under ``torch.autocast``.

With ``TrainConfig.engine = "compiled"`` the loss and its gradients come from graphs captured
once per batch shape (:class:`~ppl_vae.training.compiled.CompiledStep`) after a first eager
step (the one that runs Pyro's argument checks); a pair that cannot be captured trains eagerly.

Each step descends the gradient of a Monte Carlo estimate of -L_beta(x), L_beta =
E_q[log p(x | z)] - beta * KL(q || p); Adam's update is that of ``pyro.optim.Adam`` (one
torch Adam per parameter, torch's defaults), fused into one kernel.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from torch import Tensor

from ppl_vae.data import binarize
from ppl_vae.elbo import FreeBits, elbo_by_name, objective_elbo
from ppl_vae.errors import ArgumentError, EngineFallbackWarning
from ppl_vae.rng import forked_rng
from ppl_vae.training.compiled import CaptureRefused, CompiledStep
from ppl_vae.training.config import TrainConfig
from ppl_vae.training.distributed import DATA_PLATE, Shard, ShardMessenger

__all__ = ["Engine", "make_elbo"]

_SHARD = "_rank_rows"  # the step keyword carrying a rank's Shard (consumed, never the pair's)


def make_elbo(config: TrainConfig) -> ELBO:
    """A fresh Pyro ELBO object for ``config.objective``: the class ``config.elbo`` names
    (:func:`ppl_vae.elbo.pyro_elbos.elbo_by_name`) for ``"elbo"``, else the importance-weighted
    one (:func:`ppl_vae.elbo.importance_weighted.objective_elbo`)."""
    if config.objective != "elbo":
        return objective_elbo(config.objective, max_plate_nesting=config.max_plate_nesting)
    return elbo_by_name(
        config.elbo,
        num_particles=config.num_particles,
        max_plate_nesting=config.max_plate_nesting,
    )


def _register_params(model: Callable, guide: Callable, x: Tensor, kwargs: dict) -> None:
    """Run the guide, and the model against it, once, so every ``pyro.param`` and
    ``pyro.module`` has entered the param store (the optimizer needs them all up front)."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(x, **kwargs)
        poutine.replay(model, trace=guide_trace)(x, **kwargs)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Any:
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.epochs, eta_min=config.lr_min
        )
    if config.lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_gamma)
    return None


class Engine:
    """``elbo.differentiable_loss`` and one fused Adam over the whole param store.

    With ``config.free_bits`` > 0 it trains the free-bits objective: ``model`` and ``guide``
    wrapped by :class:`~ppl_vae.elbo.FreeBits` (the pair given stays the plain one, for
    validation and the divergence diagnosis). A Jit ELBO gets one ELBO object per batch
    shape: each compiles once, for its shape, so the last, smaller batch of an epoch is
    trained on like the others instead of being replayed through a trace made for another
    size. ``beta_varies``: beta changes from step to step (a schedule); the compiled engine
    then takes it as a tensor, an input of its graphs rather than a constant in them."""

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        config: TrainConfig,
        x0: Tensor,
        kwargs: dict[str, Any],
        device: torch.device,
        binary: bool,
        beta_varies: bool = False,
    ) -> None:
        if config.free_bits > 0:  # the training objective only
            free_bits = FreeBits(config.free_bits)
            model, guide = free_bits.model(model), free_bits.guide(guide)
        self.model, self.guide, self.config = model, guide, config
        self.jit = config.elbo.startswith("jit")
        self.autocast = config.precision != "float32"
        self.device = torch.device(device)
        self.elbo = make_elbo(config)
        self.elbos: dict[torch.Size, ELBO] = {}
        # Registering the params draws from the guide: do it off the main stream, so a run
        # draws what a plain pyro.infer.SVI loop (which registers them within its first step)
        # draws from the same seed.
        with forked_rng(device):
            _register_params(model, guide, binarize(x0) if binary else x0, kwargs)
        store = pyro.get_param_store()
        self.names = list(store.keys())
        self.params = [p for _, p in store.named_parameters()]
        # Pyro's Adam wraps torch's per parameter with torch's defaults: the same update,
        # here as one fused kernel over every parameter (~0.5 ms a step less than foreach at
        # 0.65 M parameters on one CPU core; benchmarks/README.md).
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, fused=True)
        self.scheduler = _scheduler(self.optimizer, config)
        self.compiled: CompiledStep | None = None
        if config.engine == "compiled":
            self.compiled = CompiledStep(self._loss, self.params, self.device)
        self.beta_varies = beta_varies
        self.stepped = False  # the first step runs eagerly, with Pyro's argument checks

    def _loss(self, x: Tensor, **kwargs: Any) -> Tensor:
        model, guide = self.model, self.guide
        shard = kwargs.pop(_SHARD, None)
        if shard is not None:  # this rank's rows of a global batch
            sharded = ShardMessenger(shard, draw_global=True)
            model, guide = ShardMessenger(shard, draw_global=False)(model), sharded(guide)
        if self.autocast:  # the forward pass only; backward runs each op in its forward dtype
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.elbo.differentiable_loss(model, guide, x, **kwargs)
        else:
            loss = self.elbo.differentiable_loss(model, guide, x, **kwargs)
        if shard is not None and sharded.data_sites == 0:
            raise ArgumentError(
                f"distributed training splits the rows of the plate named {DATA_PLATE!r}, and "
                "the guide has no site in it: name the pair's data plate "
                f"pyro.plate({DATA_PLATE!r}, ...)"
            )
        return loss

    def backward(self, x: Tensor, kwargs: dict[str, Any], shard: Shard | None = None) -> Tensor:
        """The step's loss, its gradients in ``.grad``; :meth:`update` applies them. With
        ``shard``, ``x`` is this rank's rows of a global batch (the shard keys the compiled
        graphs, as the other non-tensor arguments do)."""
        if shard is not None:
            kwargs = {**kwargs, _SHARD: shard}
        if self.compiled is not None and self.stepped:
            loss = self._compiled_backward(self.compiled, x, kwargs)
            if loss is not None:
                return loss
        self.stepped = True
        elbo = self.elbo
        if self.jit:
            elbo = self.elbos.get(x.shape)
            if elbo is None:
                elbo = self.elbos[x.shape] = make_elbo(self.config)
                # Compiling runs model and guide twice more (Pyro's parameter capture, then
                # torch.jit.trace): do it off the main random stream, so that a Jit run draws
                # what the plain ELBO draws, and a resumed run what the uninterrupted one did.
                with forked_rng(self.device):
                    elbo.differentiable_loss(self.model, self.guide, x, **kwargs)
            loss = elbo.differentiable_loss(self.model, self.guide, x, **kwargs)
        else:
            loss = self._loss(x, **kwargs)
        loss.backward()
        return loss.detach()

    def _compiled_backward(
        self, compiled: CompiledStep, x: Tensor, kwargs: dict[str, Any]
    ) -> Tensor | None:
        """The compiled step's loss, its gradients in ``.grad``; ``None`` (and eager from
        now on, after a warning) when the step cannot be captured."""
        if self.beta_varies and "beta" in kwargs:
            beta = torch.tensor(kwargs["beta"], dtype=x.dtype, device=x.device)
            kwargs = {**kwargs, "beta": beta}
        try:
            loss, grads = compiled(x, kwargs)
        except CaptureRefused as refused:
            warnings.warn(
                f"engine='compiled': {refused}; training with the eager engine",
                EngineFallbackWarning,
                stacklevel=2,
            )
            self.compiled = None
            return None
        for param, grad in zip(self.params, grads, strict=True):
            param.grad = grad
        return loss

    def update(self, skip: Tensor | None = None) -> None:
        """Apply the gradients of the last :meth:`backward`, unless ``skip`` (a 0-d float32
        tensor on the device, 0 or 1) is 1: the fused kernel reads it there as
        ``found_inf``, as ``torch.amp.GradScaler`` sets it, and leaves the parameters,
        Adam's moments and its step count as they were, without the host waiting for it."""
        if skip is None:
            self.optimizer.step()
        else:
            self.optimizer.found_inf = skip
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)

    def discard(self) -> None:
        """Drop the gradients of the last :meth:`backward` unapplied."""
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        """The learning rate of the epoch in progress."""
        return float(self.optimizer.param_groups[0]["lr"])

    def end_epoch(self) -> None:
        """Step the schedule (the next epoch's rate); refuse parameters created late."""
        known = set(self.names)
        new = [name for name in pyro.get_param_store().keys() if name not in known]
        if new:
            raise RuntimeError(
                f"parameters {new[:5]} entered the param store after the first step; training "
                "optimises only those present at the start: create every parameter on the "
                "first call"
            )
        if self.scheduler is not None:
            self.scheduler.step()
