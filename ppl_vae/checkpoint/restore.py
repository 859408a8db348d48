"""Putting a loaded checkpoint back: networks, Pyro's param store, optimizer, scheduler and
random states, so training carries on exactly where it stopped.

The param store is made to hold exactly the checkpoint's entries, ``store[name] = u`` with
constraint ``c`` (so ``pyro.param(name) == transform_to(c)(u)``), reusing the live tensors
where it can, so an optimizer built over them stays valid; the optimizer's state is matched
to its parameters by param-store name, in the saved order.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyro
import torch
from pyro.distributions import constraints
from pyro.params import param_with_module_name
from torch import Tensor, nn

from ppl_vae.checkpoint.constraint_names import constraint_from_name
from ppl_vae.checkpoint.contents import Checkpoint, optimizer_param_names
from ppl_vae.errors import CheckpointError

__all__ = ["restore", "restore_optimizer", "restore_rng"]


def restore(
    checkpoint: Checkpoint,
    *,
    modules: Mapping[str, nn.Module] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    rng: bool = True,
    device: str | torch.device | None = None,
) -> None:
    """Put a checkpoint back: networks, param store, optimizer, scheduler, random states.

    Networks are loaded in place (their ``nn.Parameter`` objects stay the same), and the
    param store is made to hold exactly the checkpoint's parameters: a network's weights are
    entered as the network's own tensors, other parameters are copied in place when the store
    already has them with the same shape and dtype (so an optimizer built over them stays
    valid) and created on ``device`` (default: CPU) otherwise; names the checkpoint lacks are
    removed. A checkpoint saved with ``param_store=False`` leaves the param store alone.

    :param modules: every network the checkpoint was saved with, by the same name (others
        whose weights are param-store entries ``name$$$key`` may be given too).
    :param optimizer: built over the same parameters, in the same order, as the saved one.
    :raises CheckpointError: for a saved network not passed, a network whose shapes do not
        match, or an optimizer over different parameters.
    """
    if rng and checkpoint.rng is None:  # refused before anything is changed
        raise CheckpointError(
            f"checkpoint {checkpoint.path} holds no random states; pass rng=False to "
            "restore without them"
        )
    modules = dict(modules or {})
    missing = sorted(set(checkpoint.module_keys) - set(modules))
    if missing:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} holds the networks {missing}: pass them to restore "
            f"(modules={{name: network}}), or their weights would not reach the networks"
        )
    live = _load_networks(checkpoint, modules)
    if checkpoint.has_param_store:
        _restore_store(checkpoint, live, device)
    if optimizer is not None or scheduler is not None:
        restore_optimizer(checkpoint, optimizer, scheduler=scheduler, modules=modules)
    if rng:
        restore_rng(checkpoint)


def _load_networks(checkpoint: Checkpoint, modules: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """Load each network in place; return its parameters by param-store name, the tensors
    the store is to hold for them.

    A network saved with the checkpoint gets its full state dict (strictly); another one
    gets the param-store entries under its name, all of its parameters required.
    """
    live: dict[str, Tensor] = {}
    for module_name, module in modules.items():
        if module_name in checkpoint.module_keys:
            state = checkpoint.module_state_dict(module_name)
            strict = True
        else:
            prefix = param_with_module_name(module_name, "")
            state = {
                n[len(prefix) :]: t for n, t in checkpoint.params.items() if n.startswith(prefix)
            }
            absent = [k for k, _ in module.named_parameters() if k not in state]
            if absent:
                raise CheckpointError(
                    f"checkpoint {checkpoint.path} has no weights for network {module_name!r} "
                    f"(missing {absent[:3]}{'...' if len(absent) > 3 else ''})"
                )
            strict = False
        try:
            module.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} does not fit network {module_name!r}: {exc}"
            ) from None
        for key, p in module.named_parameters():
            live[param_with_module_name(module_name, key)] = p
    return live


def _restore_store(
    checkpoint: Checkpoint, live: Mapping[str, Tensor], device: str | torch.device | None
) -> None:
    """Make the param store hold exactly the checkpoint's parameters (see :func:`restore`)."""
    store = pyro.get_param_store()
    for name in list(store.keys()):
        if name not in checkpoint.params:
            del store[name]
    current = dict(store.named_parameters())
    new_params: dict[str, Tensor] = {}
    new_constraints: dict[str, constraints.Constraint] = {}
    for name, value in checkpoint.params.items():
        constraint = constraint_from_name(checkpoint.constraints[name])
        if name in live:
            tensor = live[name]
        else:
            old = current.get(name)
            if old is not None and old.shape == value.shape and old.dtype == value.dtype:
                with torch.no_grad():
                    old.copy_(value)
                tensor = old
            else:
                target = device if device is not None else "cpu"
                tensor = value.detach().to(target).clone().requires_grad_(True)
        if name in current and current[name] is not tensor:
            del store[name]
        new_params[name] = tensor
        new_constraints[name] = constraint
    store.set_state({"params": new_params, "constraints": new_constraints})


def restore_optimizer(
    checkpoint: Checkpoint,
    optimizer: torch.optim.Optimizer | None,
    *,
    scheduler: Any = None,
    modules: Mapping[str, nn.Module] | None = None,
) -> None:
    """Load the optimizer's (and scheduler's) state, after :func:`restore` has put the
    parameters back and the optimizer has been built over them, in the saved order (for a
    new process: ``restore(ckpt, modules=...)``, build the optimizer, then this).

    :raises CheckpointError: when the checkpoint holds no such state, or the optimizer is
        over other parameters than the saved one.
    """
    if optimizer is not None:
        _load_optimizer(checkpoint, optimizer, modules or {})
    if scheduler is not None:
        if checkpoint.scheduler is None:
            raise CheckpointError(f"checkpoint {checkpoint.path} holds no scheduler state")
        scheduler.load_state_dict(checkpoint.scheduler)


def _as_tuples(saved: Any, live: Any) -> Any:
    """Give ``saved`` (param groups after JSON) the tuple types of ``live`` (e.g. betas)."""
    if isinstance(live, tuple) and isinstance(saved, list | tuple):
        return tuple(saved)
    return saved


def _load_optimizer(
    checkpoint: Checkpoint, optimizer: torch.optim.Optimizer, modules: Mapping[str, nn.Module]
) -> None:
    if checkpoint.optimizer is None:
        raise CheckpointError(f"checkpoint {checkpoint.path} holds no optimizer state")
    names = optimizer_param_names(optimizer, modules)
    if names != checkpoint.optimizer_params:
        raise CheckpointError(
            f"the optimizer's parameters do not match those saved in {checkpoint.path}: build "
            "it over the restored param store's parameters, in the saved order "
            f"({len(checkpoint.optimizer_params or [])} saved, {len(names)} given)"
        )
    state = dict(checkpoint.optimizer)
    groups = []
    for saved, current in zip(state["param_groups"], optimizer.param_groups, strict=False):
        groups.append({k: _as_tuples(v, current.get(k)) for k, v in saved.items()})
    state["param_groups"] = groups
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"the optimizer state in {checkpoint.path} does not fit this optimizer: {exc}"
        ) from None


def restore_rng(checkpoint: Checkpoint) -> None:
    """Put back the random states saved in ``checkpoint`` (torch CPU, CUDA where present,
    numpy, Python), the last thing before training continues.

    :raises CheckpointError: when it holds none, or they are damaged.
    """
    if checkpoint.rng is None:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} holds no random states; pass "
            "rng=False to restore without them"
        )
    try:
        torch.set_rng_state(checkpoint.rng["torch"])
        cuda = checkpoint.rng["cuda"]
        # A run saved on GPUs may be resumed on a CPU-only machine: its CUDA states are then
        # unused; on fewer GPUs, those of the missing devices are.
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
        np.random.set_state(checkpoint.rng["numpy"])  # noqa: NPY002
        random.setstate(checkpoint.rng["python"])
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} holds random states that cannot be restored "
            f"({type(exc).__name__}: {exc}); it is damaged"
        ) from None
