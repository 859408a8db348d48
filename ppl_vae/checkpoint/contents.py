"""What a checkpoint holds, between the live objects of a run and a JSON body plus named
tensors (the file itself is :mod:`ppl_vae.checkpoint.format`):

- Pyro's param store: each parameter's *unconstrained* value ``u`` and its constraint ``c``,
  by name; the value ``pyro.param`` returns is ``transform_to(c)(u)``;
- the networks (``modules``): entries of their ``state_dict`` that the param store does not
  already hold (buffers, frozen weights), so a network's weights are stored once;
- the optimizer's and the learning-rate scheduler's state dicts, and the optimizer's
  parameters by param-store name, in order;
- counters (step, epoch, ...), as plain JSON, and the digest of the run's configuration
  (the configuration itself is the run's ``config.json``);
- a trainer's own state (``state``: plain JSON and tensors);
- the random states of torch (CPU and CUDA), numpy and Python's ``random``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.params import param_with_module_name
from torch import Tensor, nn

from ppl_vae.checkpoint.codec import cpu_copy, decode_tagged, encode_tagged, plain_json
from ppl_vae.checkpoint.constraint_names import constraint_from_name, constraint_name
from ppl_vae.errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "checkpoint_from_contents",
    "collect_contents",
    "optimizer_param_names",
]

FORMAT_VERSION = 2
"""Version of the layout written by :func:`~ppl_vae.checkpoint.format.save_checkpoint`: 2
holds the digest of the run's configuration (``config_digest``) where 1 held a copy of the
configuration; version-1 files still load, without it."""


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """What :func:`load_checkpoint` read; put it back with :func:`restore`.

    ``params`` are unconstrained param-store values (CPU tensors) by name, ``constraints``
    their constraint names. ``modules`` maps each saved network to the tensors of its
    ``state_dict`` that are not param-store entries; :meth:`module_state_dict` assembles a
    full state dict. ``optimizer`` and ``scheduler`` are state dicts as torch returns them.
    ``rng`` has ``"torch"`` (uint8 tensor), ``"cuda"`` (list of uint8 tensors), ``"numpy"``
    (a tuple for ``np.random.set_state``) and ``"python"`` (a tuple for
    ``random.setstate``), or is ``None`` when not saved. ``state`` is the trainer's own
    state as saved (plain JSON values and tensors). ``config_digest`` is the digest of the
    configuration the run was written with (``None`` when not given, and in version-1 files).
    """

    path: Path
    params: dict[str, Tensor]
    constraints: dict[str, str]
    modules: dict[str, dict[str, Tensor]]
    module_keys: dict[str, dict[str, str]]  # module -> state-dict key -> param name or ""
    optimizer: dict[str, Any] | None
    optimizer_params: list[str | None] | None
    scheduler: dict[str, Any] | None
    counters: dict[str, Any] = field(default_factory=dict)
    config_digest: str | None = None
    rng: dict[str, Any] | None = None
    version: int = FORMAT_VERSION
    has_param_store: bool = True
    state: dict[str, Any] = field(default_factory=dict)

    def constrained(self, name: str) -> Tensor:
        """The constrained value of a stored parameter (as ``pyro.param(name)`` returns it)."""
        unconstrained = self.params[name]
        transform = torch.distributions.transform_to(constraint_from_name(self.constraints[name]))
        return transform(unconstrained)

    def module_state_dict(self, name: str) -> dict[str, Tensor]:
        """The full ``state_dict`` of a saved network, from its param-store entries and the
        entries saved with it."""
        if name not in self.module_keys:
            raise CheckpointError(
                f"{self.path} holds no network named {name!r}; it holds "
                f"{sorted(self.module_keys) or 'none'}"
            )
        out: dict[str, Tensor] = {}
        for key, param_name in self.module_keys[name].items():
            out[key] = self.params[param_name] if param_name else self.modules[name][key]
        return out


# --------------------------------------------------------------------------------------------
# Live objects -> body and tensors
# --------------------------------------------------------------------------------------------


def optimizer_param_names(
    optimizer: torch.optim.Optimizer, modules: Mapping[str, nn.Module]
) -> list[str | None]:
    """The param-store name of each of the optimizer's parameters, in its order (``None`` for
    one that is neither in the store nor a network's), so a restore can check that it is
    given an optimizer over the same parameters."""
    by_id = {id(t): name for name, t in pyro.get_param_store().named_parameters()}
    for module_name, module in modules.items():
        for key, p in module.named_parameters():
            by_id.setdefault(id(p), param_with_module_name(module_name, key))
    return [by_id.get(id(p)) for group in optimizer.param_groups for p in group["params"]]


def collect_contents(
    *,
    modules: Mapping[str, nn.Module],
    param_store: bool,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    counters: Mapping[str, Any],
    config_digest: str | None,
    rng: bool,
    state: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The JSON body and the tensors (CPU copies, by key) of a checkpoint of the live run;
    the arguments are those of :func:`~ppl_vae.checkpoint.format.save_checkpoint`.

    :raises CheckpointError: when a value cannot be stored.
    """
    tensors: dict[str, Tensor] = {}
    body: dict[str, Any] = {"version": FORMAT_VERSION}
    store_state = pyro.get_param_store().get_state()  # {"params": unconstrained, ...}
    params: list[str] = []
    constraint_names: dict[str, str] = {}
    if param_store:
        for name, value in store_state["params"].items():
            constraint_names[name] = constraint_name(store_state["constraints"][name])
            tensors[f"param/{name}"] = cpu_copy(value)
            params.append(name)
    body["param_store"] = bool(param_store)
    body["params"] = params
    body["constraints"] = constraint_names
    stored = {name: store_state["params"][name] for name in params}
    body["modules"] = _module_entries(modules, stored, tensors)
    if optimizer is not None:
        body["optimizer_params"] = optimizer_param_names(optimizer, modules)
        body["optimizer"] = encode_tagged(optimizer.state_dict(), "optim", tensors)
    if scheduler is not None:
        body["scheduler"] = encode_tagged(scheduler.state_dict(), "sched", tensors)
    body["counters"] = plain_json(dict(counters), "counters")
    if config_digest is not None and not isinstance(config_digest, str):
        raise CheckpointError(f"config_digest must be text, got {type(config_digest).__name__}")
    body["config_digest"] = config_digest
    if rng:
        body["rng"] = _rng_state(tensors)
    if state is not None:
        body["state"] = encode_tagged(dict(state), "state", tensors)
    return body, tensors


def _module_entries(
    modules: Mapping[str, nn.Module], stored: Mapping[str, Tensor], tensors: dict[str, Tensor]
) -> dict[str, dict[str, str]]:
    """Each network's state-dict keys -> the param-store name holding that very tensor, or
    ``""`` for an entry stored with the network (under ``module/<network>/<key>``)."""
    module_keys: dict[str, dict[str, str]] = {}
    for module_name, module in modules.items():
        keys: dict[str, str] = {}
        for key, value in module.state_dict(keep_vars=True).items():
            full = param_with_module_name(module_name, key)
            if full in stored and stored[full] is value:
                keys[key] = full
            else:
                tensors[f"module/{module_name}/{key}"] = cpu_copy(value)
                keys[key] = ""
        module_keys[module_name] = keys
    return module_keys


def _rng_state(tensors: dict[str, Tensor]) -> dict[str, Any]:
    tensors["rng/torch"] = torch.get_rng_state()
    n_cuda = 0
    # Only when CUDA is already in use: asking for its states would otherwise initialise it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state.cpu()
            n_cuda += 1
    # The legacy global state is the one pyro.set_rng_seed seeds, so it is the one to keep.
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    tensors["rng/numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    return {
        "cuda_devices": n_cuda,
        "numpy": {
            "algorithm": algorithm,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


# --------------------------------------------------------------------------------------------
# Body and tensors -> Checkpoint
# --------------------------------------------------------------------------------------------


def checkpoint_from_contents(
    path: Path, body: dict[str, Any], tensors: dict[str, Tensor]
) -> Checkpoint:
    """The :class:`Checkpoint` a body and its tensors describe, checked: a newer version, a
    missing tensor or an unknown constraint name is refused now, not at restore time.

    :raises CheckpointError: for those; a malformed body raises ``KeyError``, ``TypeError``,
        ... which :func:`~ppl_vae.checkpoint.format.load_checkpoint` reports.
    """
    version = body["version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this "
            f"ppl-vae reads up to version {FORMAT_VERSION}: upgrade ppl-vae"
        )

    def tensor(key: str) -> Tensor:
        if key not in tensors:
            raise CheckpointError(f"checkpoint {path} is corrupt: tensor {key!r} is missing")
        return tensors[key]

    params = {name: tensor(f"param/{name}") for name in body["params"]}
    names = {name: str(body["constraints"][name]) for name in params}
    for name in names.values():
        constraint_from_name(name)  # refuse unknown names now, not at restore time
    modules, module_keys = _networks(path, body["modules"], params, tensor)
    where = f"checkpoint {path}"
    optimizer = decode_tagged(body["optimizer"], tensors, where) if "optimizer" in body else None
    scheduler = decode_tagged(body["scheduler"], tensors, where) if "scheduler" in body else None
    rng = _read_rng(body["rng"], tensor) if "rng" in body else None
    state = decode_tagged(body["state"], tensors, where) if "state" in body else {}
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: its trainer state is not a dict")
    return Checkpoint(
        path=path,
        params=params,
        constraints=names,
        modules=modules,
        module_keys=module_keys,
        optimizer=optimizer,
        optimizer_params=body.get("optimizer_params"),
        scheduler=scheduler,
        counters=dict(body["counters"]),
        config_digest=_config_digest(path, body, version),
        rng=rng,
        version=version,
        has_param_store=bool(body.get("param_store", True)),
        state=state,
    )


def _config_digest(path: Path, body: dict[str, Any], version: int) -> str | None:
    """The configuration's digest a body holds (version 1 held the configuration instead)."""
    if version < 2:
        return None
    digest = body["config_digest"]
    if digest is not None and not isinstance(digest, str):
        raise CheckpointError(f"checkpoint {path} is corrupt: its configuration digest is not text")
    return digest


def _networks(
    path: Path,
    saved: Mapping[str, Mapping[str, str]],
    params: Mapping[str, Tensor],
    tensor: Callable[[str], Tensor],
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, str]]]:
    """Each network's entries stored with it, and its state-dict keys -> param-store name or
    ``""``; a param-store name it refers to must be among ``params``."""
    modules: dict[str, dict[str, Tensor]] = {}
    module_keys: dict[str, dict[str, str]] = {}
    for module_name, keys in saved.items():
        module_keys[module_name] = dict(keys)
        modules[module_name] = {}
        for key, param_name in keys.items():
            if not param_name:
                modules[module_name][key] = tensor(f"module/{module_name}/{key}")
            elif param_name not in params:
                raise CheckpointError(
                    f"checkpoint {path} is corrupt: network "
                    f"{module_name!r} refers to missing param "
                    f"{param_name!r}"
                )
    return modules, module_keys


def _read_rng(saved: Mapping[str, Any], tensor: Callable[[str], Tensor]) -> dict[str, Any]:
    """The random states in the forms their setters take (see :attr:`Checkpoint.rng`)."""
    np_meta = saved["numpy"]
    keys = tensor("rng/numpy_keys").numpy().astype(np.uint32)
    py = saved["python"]
    return {
        "torch": tensor("rng/torch"),
        "cuda": [tensor(f"rng/cuda/{i}") for i in range(int(saved["cuda_devices"]))],
        "numpy": (
            str(np_meta["algorithm"]),
            keys,
            int(np_meta["pos"]),
            int(np_meta["has_gauss"]),
            float(np_meta["cached_gaussian"]),
        ),
        "python": (int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss_next"]),
    }
