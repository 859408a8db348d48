"""Checkpoints: one safetensors file, written atomically, read without unpickling anything.

A checkpoint holds what is needed to carry on training exactly where it stopped:

- Pyro's param store: each parameter's *unconstrained* value and its constraint, by name
  (``"positive"``, ``"unit_interval"``, ``"interval(0.0, 2.0)"``, ...);
- the networks (``modules``): entries of their ``state_dict`` that the param store does not
  already hold (buffers, frozen weights), so a network's weights are stored once;
- the optimizer's and the learning-rate scheduler's state dicts;
- counters (step, epoch, ...) and the run's configuration, as plain JSON;
- a trainer's own state (``state``: plain JSON and tensors, e.g. a data-order generator's
  state and the running sums of an epoch in progress);
- the random states of torch (CPU and CUDA), numpy and Python's ``random``.

Tensors go into the safetensors payload; everything else into one JSON string in its
metadata, with a SHA-256 digest of that string's UTF-8 bytes followed by the tensor bytes
(everything after the header), so a flipped bit anywhere but in the header's own layout is
caught. Loading parses the header before trusting any byte, checks the digest, refuses
anything that is not a ppl-vae safetensors file (a pickle is reported as such and never
executed), and maps constraint names back through a fixed table, never through ``eval``.

Writing goes to a temporary file in the target's folder, which is flushed, fsynced and
renamed over the target with ``os.replace``: a crash leaves either the old checkpoint or the
new one under the final name, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import safetensors
import safetensors.torch
import torch
from pyro.distributions import constraints
from pyro.params import param_with_module_name
from torch import Tensor, nn

from ppl_vae.atomic import write_atomically
from ppl_vae.errors import CheckpointError, CheckpointWriteError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "constraint_from_name",
    "constraint_name",
    "load_checkpoint",
    "remove_stale_temporaries",
    "restore",
    "restore_optimizer",
    "restore_rng",
    "save_checkpoint",
]

FORMAT = "ppl-vae-checkpoint"
"""Value of the ``format`` metadata entry that marks a ppl-vae checkpoint."""

FORMAT_VERSION = 1
"""Version of the layout written by :func:`save_checkpoint`."""

_META_FORMAT = "format"
_META_BODY = "ppl_vae"  # the JSON string with everything that is not a tensor
_META_SHA256 = "sha256"  # of the JSON string's UTF-8 bytes followed by the tensor bytes
_MAX_HEADER = 100 << 20  # far above any real header; guards against absurd lengths
_PICKLE_PROTO = 0x80
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format (pickles inside)

# Tagged JSON for state dicts, whose keys may be ints and whose values may be tensors/tuples.
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


# --------------------------------------------------------------------------------------------
# Constraint names
# --------------------------------------------------------------------------------------------

# Constraints without parameters, by name; identified by their exact type (``softplus_positive``
# subclasses ``positive``'s type but is a different transform, so isinstance would be wrong).
_SIMPLE_NAMES = (
    "real",
    "simplex",
    "lower_cholesky",
    "positive_definite",
    "positive_semidefinite",
    "corr_cholesky",
    "corr_matrix",
    "unit_lower_cholesky",
    "softplus_positive",
    "softplus_lower_cholesky",
    "ordered_vector",
    "positive_ordered_vector",
    "sphere",
)
_SIMPLE: dict[str, constraints.Constraint] = {
    name: getattr(constraints, name) for name in _SIMPLE_NAMES if hasattr(constraints, name)
}
_SIMPLE_BY_TYPE = {type(c): name for name, c in reversed(_SIMPLE.items())}

_GreaterThan = type(constraints.greater_than(0.0))
_GreaterThanEq = type(constraints.greater_than_eq(0.0))
_LessThan = type(constraints.less_than(0.0))
_Interval = type(constraints.interval(0.0, 1.0))
_HalfOpenInterval = type(constraints.half_open_interval(0.0, 1.0))
_Independent = type(constraints.independent(constraints.real, 1))

_BOUNDED = {
    "greater_than": (_GreaterThan, ("lower_bound",)),
    "greater_than_eq": (_GreaterThanEq, ("lower_bound",)),
    "less_than": (_LessThan, ("upper_bound",)),
    "interval": (_Interval, ("lower_bound", "upper_bound")),
    "half_open_interval": (_HalfOpenInterval, ("lower_bound", "upper_bound")),
}
# Short names for the common bounds; the long form is accepted too when reading.
_ALIASES = {
    ("greater_than", (0.0,)): "positive",
    ("greater_than_eq", (0.0,)): "nonnegative",
    ("interval", (0.0, 1.0)): "unit_interval",
}
_ALIAS_TARGETS = {alias: key for key, alias in _ALIASES.items()}
_CALL = re.compile(r"^([a-z_]+)\((.*)\)$", re.DOTALL)


def _bound(value: Any, what: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise CheckpointError(
                f"cannot name {what}: its bound is a tensor of shape "
                f"{tuple(value.shape)}, only scalar bounds can be stored"
            )
        value = value.item()
    return float(value)


def constraint_name(constraint: constraints.Constraint) -> str:
    """The name under which a checkpoint stores ``constraint``: ``"real"``, ``"positive"``,
    ``"unit_interval"``, ``"simplex"``, ``"interval(0.0, 2.0)"``, ``"independent(real, 1)"``...

    :raises CheckpointError: for a constraint with no name in the table (a custom one, or
        one with tensor bounds).
    """
    kind = type(constraint)
    if kind in _SIMPLE_BY_TYPE:
        return _SIMPLE_BY_TYPE[kind]
    if kind is _Independent:
        base = constraint_name(constraint.base_constraint)
        return f"independent({base}, {int(constraint.reinterpreted_batch_ndims)})"
    for name, (cls, attrs) in _BOUNDED.items():
        if kind is cls:
            bounds = tuple(_bound(getattr(constraint, a), repr(constraint)) for a in attrs)
            alias = _ALIASES.get((name, bounds))
            return alias or f"{name}({', '.join(repr(b) for b in bounds)})"
    raise CheckpointError(
        f"cannot store a parameter with constraint {constraint!r}: it has no name in the "
        "checkpoint's table of constraints (real, positive, unit_interval, simplex, interval(a, "
        "b), greater_than(a), ..., independent(c, n)); use one of those"
    )


def _split_args(text: str) -> list[str]:
    """Split at the commas that are not inside parentheses."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def constraint_from_name(name: str) -> constraints.Constraint:
    """Inverse of :func:`constraint_name`, by table lookup (never ``eval``).

    :raises CheckpointError: for a name not in the table or with malformed arguments.
    """

    def unknown(why: str) -> CheckpointError:
        return CheckpointError(
            f"unknown constraint name {name!r} ({why}); known names: "
            f"{', '.join([*_SIMPLE, *_ALIAS_TARGETS, *_BOUNDED])}, "
            "independent(<name>, n)"
        )

    if not isinstance(name, str):
        raise unknown("not a string")
    name = name.strip()
    if name in _SIMPLE:
        return _SIMPLE[name]
    if name == "real_vector":
        return constraints.real_vector
    if name in _ALIAS_TARGETS:
        kind, bounds = _ALIAS_TARGETS[name]
        return getattr(constraints, kind)(*bounds)
    match = _CALL.match(name)
    if match is None:
        raise unknown("not a known name")
    kind, args = match.group(1), _split_args(match.group(2))
    try:
        if kind == "independent" and len(args) == 2:
            return constraints.independent(constraint_from_name(args[0]), int(args[1]))
        if kind in _BOUNDED and len(args) == len(_BOUNDED[kind][1]):
            bounds = [float(a) for a in args]
            if any(math.isnan(b) for b in bounds):
                raise ValueError("NaN bound")
            return getattr(constraints, kind)(*bounds)
    except ValueError as exc:
        raise unknown(f"bad arguments: {exc}") from None
    raise unknown("not a known name or wrong number of arguments")


# --------------------------------------------------------------------------------------------
# The loaded checkpoint
# --------------------------------------------------------------------------------------------


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
    state as saved (plain JSON values and tensors).
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
    config: dict[str, Any] = field(default_factory=dict)
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
# Tagged JSON for state dicts
# --------------------------------------------------------------------------------------------


def _encode(obj: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-ready form of a state dict: tensors become ``{"__tensor__": key}`` (stored in
    ``tensors``), tuples and non-string-keyed dicts are tagged, so decoding is exact."""
    if isinstance(obj, Tensor):
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        plain = all(isinstance(k, str) for k in obj) and not {_TENSOR, _TUPLE, _DICT} & set(obj)
        if plain:
            return {k: _encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if k is not None and not isinstance(k, bool | int | float | str):
                raise CheckpointError(
                    f"cannot store a dict key of type {type(k).__name__} at {key}"
                )
            items.append([k, _encode(v, f"{key}/{k}", tensors)])
        return {_DICT: items}
    raise CheckpointError(
        f"cannot store a value of type {type(obj).__name__} at {key}: checkpoints hold "
        "tensors and plain JSON values only"
    )


def _decode(obj: Any, tensors: Mapping[str, Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            key = obj[_TENSOR]
            if key not in tensors:
                raise CheckpointError(
                    f"{where}: the metadata names tensor {key!r}, which the file does not hold"
                )
            return tensors[key]
        if set(obj) == {_TUPLE}:
            return tuple(_decode(v, tensors, where) for v in obj[_TUPLE])
        if set(obj) == {_DICT}:
            return {k: _decode(v, tensors, where) for k, v in obj[_DICT]}
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    return obj


def _plain_json(value: Any, what: str) -> Any:
    """``value`` after a JSON round trip (tuples become lists); CheckpointError if it is not
    plain JSON."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{what} must be plain JSON (dicts, lists, numbers, strings): {exc}"
        ) from None


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _full_name(module: str, key: str) -> str:
    """The param-store name ``pyro.module(module, ...)`` gives a network's entry ``key``."""
    return param_with_module_name(module, key)


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


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    modules: Mapping[str, nn.Module] | None = None,
    param_store: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    counters: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    rng: bool = True,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint to ``path`` atomically and return the path.

    :param modules: networks by the name they are registered under (``pyro.module(name,
        net)``); their weights are stored once, through the param store when it holds them.
    :param param_store: store Pyro's param store (unconstrained values and constraints).
    :param optimizer: a ``torch.optim.Optimizer``; its parameters are recorded by param-store
        name, so :func:`restore` can check it is given an optimizer over the same parameters.
    :param scheduler: a ``torch.optim.lr_scheduler`` object (anything with ``state_dict``).
    :param counters: plain JSON (step, epoch, position in the data order, ...).
    :param config: plain JSON, the run's configuration.
    :param rng: store the torch (CPU, and CUDA when in use), numpy and ``random`` states.
    :param state: a trainer's own state: string keys, values tensors (e.g. a
        ``torch.Generator``'s ``get_state()``), numbers, strings, lists, tuples and dicts of
        them; read back as :attr:`Checkpoint.state`.
    :raises CheckpointError: when a value cannot be stored.
    :raises CheckpointWriteError: (a :class:`CheckpointError`) when the file cannot be written
        (missing or read-only folder, full disk); the previous file under ``path``, if any,
        is then left as it was, and no temporary file remains.
    """
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    body: dict[str, Any] = {"version": FORMAT_VERSION}

    store = pyro.get_param_store()
    store_state = store.get_state()  # {"params": unconstrained tensors, "constraints": ...}
    params: list[str] = []
    constraint_names: dict[str, str] = {}
    if param_store:
        for name, value in store_state["params"].items():
            constraint_names[name] = constraint_name(store_state["constraints"][name])
            tensors[f"param/{name}"] = value.detach().to("cpu").contiguous().clone()
            params.append(name)
    body["param_store"] = bool(param_store)
    body["params"] = params
    body["constraints"] = constraint_names

    stored = {name: store_state["params"][name] for name in params}
    module_keys: dict[str, dict[str, str]] = {}
    for module_name, module in (modules or {}).items():
        keys: dict[str, str] = {}
        for key, value in module.state_dict(keep_vars=True).items():
            full = _full_name(module_name, key)
            if full in stored and stored[full] is value:
                keys[key] = full  # the param store holds this very tensor
            else:
                tensors[f"module/{module_name}/{key}"] = (
                    value.detach().to("cpu").contiguous().clone()
                )
                keys[key] = ""
        module_keys[module_name] = keys
    body["modules"] = module_keys

    if optimizer is not None:
        by_id = {id(t): name for name, t in store.named_parameters()}
        for module_name, module in (modules or {}).items():
            for key, p in module.named_parameters():
                by_id.setdefault(id(p), _full_name(module_name, key))
        body["optimizer_params"] = [
            by_id.get(id(p)) for group in optimizer.param_groups for p in group["params"]
        ]
        body["optimizer"] = _encode(optimizer.state_dict(), "optim", tensors)
    if scheduler is not None:
        body["scheduler"] = _encode(scheduler.state_dict(), "sched", tensors)
    body["counters"] = _plain_json(dict(counters or {}), "counters")
    body["config"] = _plain_json(dict(config or {}), "config")
    if rng:
        body["rng"] = _rng_state(tensors)
    if state is not None:
        body["state"] = _encode(dict(state), "state", tensors)

    try:
        text = json.dumps(body)
        meta = {_META_FORMAT: FORMAT, _META_BODY: text}
        draft = safetensors.torch.save(tensors, meta)
        # The tensor bytes do not depend on the metadata: digest them, then write the header
        # again with the digest in it.
        meta[_META_SHA256] = _digest(text, draft[_data_start(draft) :])
        payload = safetensors.torch.save(tensors, meta)
    except (TypeError, ValueError, safetensors.SafetensorError) as exc:
        raise CheckpointError(f"cannot encode checkpoint {path}: {exc}") from exc
    write_atomically(path, payload, what="checkpoint", error=CheckpointWriteError)
    return path


def _data_start(payload: bytes) -> int:
    """Offset of the tensor bytes: after the 8-byte header length and the header."""
    return 8 + struct.unpack("<Q", payload[:8])[0]


def _digest(text: str, data: bytes) -> str:
    digest = hashlib.sha256(text.encode("utf-8"))
    digest.update(data)
    return digest.hexdigest()


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that :func:`save_checkpoint` leaves when its process is
    killed mid-write (``.NAME.*.tmp`` in ``folder``), and return their paths. Call it only
    when no other process is writing checkpoints to ``folder``. Files under final names are
    never touched: they are complete by construction."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for candidate in folder.iterdir():
        name = candidate.name
        if name.startswith(".") and name.endswith(".tmp") and ".ckpt." in name:
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return sorted(removed)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_header(path: Path, data: bytes) -> dict[str, Any]:
    """The safetensors JSON header of ``data``, checked before any tensor is read."""

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} {problem}")

    if not data:
        raise fail("is empty")
    # A safetensors file starts with its header's length (8 bytes, little-endian) and the
    # header's "{"; the length's first byte may be anything, 0x80 included, so a pickle or a
    # zip archive is named only when the file does not look like safetensors.
    safetensors_like = len(data) > 8 and data[8:9] == b"{"
    if not safetensors_like and data[0] == _PICKLE_PROTO:
        raise fail(
            "is a Python pickle, not a safetensors checkpoint; pickles can run code "
            "when loaded, so it was not opened. Re-create the checkpoint with ppl-vae."
        )
    if not safetensors_like and data.startswith(_ZIP_MAGIC):
        raise fail(
            "is a zip archive (torch.save format, which holds pickles), not a "
            "safetensors checkpoint; it was not opened. Re-create it with ppl-vae."
        )
    if len(data) < 8:
        raise fail(f"is truncated: {len(data)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER:
        raise fail(f"is not a safetensors file (header length {n} bytes is absurd)")
    if 8 + n > len(data):
        raise fail(
            f"is truncated or not a safetensors file: the header needs {n} bytes but "
            f"only {len(data) - 8} follow"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise fail("is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise fail("is not a safetensors file (its header is not a JSON object)")
    return header


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; nothing is unpickled or
    evaluated.

    :raises CheckpointError: naming the path and the defect, for a missing or unreadable
        file, a truncated or corrupt one, a pickle or ``torch.save`` archive, a safetensors
        file that is not a ppl-vae checkpoint, or unknown constraint names.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a folder, not a file") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    header = _read_header(path, data)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get(_META_FORMAT) != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a ppl-vae checkpoint (no "
            f"'{_META_FORMAT}: {FORMAT}' entry in its metadata)"
        )
    text = meta.get(_META_BODY, "")
    if not isinstance(text, str) or meta.get(_META_SHA256) != _digest(
        text, data[_data_start(data) :]
    ):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the SHA-256 digest "
            "stored in it (a damaged copy, or a file edited after it was written)"
        )
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is not JSON") from None
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {exc}") from None
    try:
        return _checkpoint(path, body, tensors)
    except CheckpointError:
        raise
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        OverflowError,
        RecursionError,
    ) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: malformed metadata ({type(exc).__name__}: {exc})"
        ) from None


def _checkpoint(path: Path, body: dict[str, Any], tensors: dict[str, Tensor]) -> Checkpoint:
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
    modules: dict[str, dict[str, Tensor]] = {}
    module_keys: dict[str, dict[str, str]] = {}
    for module_name, keys in body["modules"].items():
        module_keys[module_name] = dict(keys)
        modules[module_name] = {}
        for key, param_name in keys.items():
            if param_name:
                if param_name not in params:
                    raise CheckpointError(
                        f"checkpoint {path} is corrupt: network "
                        f"{module_name!r} refers to missing param "
                        f"{param_name!r}"
                    )
            else:
                modules[module_name][key] = tensor(f"module/{module_name}/{key}")
    where = f"checkpoint {path}"
    optimizer = _decode(body["optimizer"], tensors, where) if "optimizer" in body else None
    scheduler = _decode(body["scheduler"], tensors, where) if "scheduler" in body else None
    rng = None
    if "rng" in body:
        r = body["rng"]
        np_meta = r["numpy"]
        keys = tensor("rng/numpy_keys").numpy().astype(np.uint32)
        py = r["python"]
        rng = {
            "torch": tensor("rng/torch"),
            "cuda": [tensor(f"rng/cuda/{i}") for i in range(int(r["cuda_devices"]))],
            "numpy": (
                str(np_meta["algorithm"]),
                keys,
                int(np_meta["pos"]),
                int(np_meta["has_gauss"]),
                float(np_meta["cached_gaussian"]),
            ),
            "python": (int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss_next"]),
        }
    state = _decode(body["state"], tensors, where) if "state" in body else {}
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
        config=dict(body["config"]),
        rng=rng,
        version=version,
        has_param_store=bool(body.get("param_store", True)),
        state=state,
    )


# --------------------------------------------------------------------------------------------
# Restoring
# --------------------------------------------------------------------------------------------


def _as_tuples(saved: Any, live: Any) -> Any:
    """Give ``saved`` (param groups after JSON) the tuple types of ``live`` (e.g. betas)."""
    if isinstance(live, tuple) and isinstance(saved, list | tuple):
        return tuple(saved)
    return saved


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
    if rng and checkpoint.rng is None:
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
    live: dict[str, Tensor] = {}  # param-store name -> tensor to enter
    for module_name, module in modules.items():
        if module_name in checkpoint.module_keys:
            state = checkpoint.module_state_dict(module_name)
            strict = True
        else:
            prefix = _full_name(module_name, "")
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
            live[_full_name(module_name, key)] = p

    if checkpoint.has_param_store:
        _restore_store(checkpoint, live, device)

    if optimizer is not None or scheduler is not None:
        restore_optimizer(checkpoint, optimizer, scheduler=scheduler, modules=modules)
    if rng:
        _restore_rng(checkpoint)


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


def _load_optimizer(
    checkpoint: Checkpoint, optimizer: torch.optim.Optimizer, modules: Mapping[str, nn.Module]
) -> None:
    if checkpoint.optimizer is None:
        raise CheckpointError(f"checkpoint {checkpoint.path} holds no optimizer state")
    store = pyro.get_param_store()
    by_id = {id(t): name for name, t in store.named_parameters()}
    for module_name, module in modules.items():
        for key, p in module.named_parameters():
            by_id.setdefault(id(p), _full_name(module_name, key))
    names = [by_id.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
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
    _restore_rng(checkpoint)


def _restore_rng(checkpoint: Checkpoint) -> None:
    if checkpoint.rng is None:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} holds no random states; pass "
            "rng=False to restore without them"
        )
    try:
        torch.set_rng_state(checkpoint.rng["torch"])
        cuda = checkpoint.rng["cuda"]
        # A run saved on GPUs may be resumed on a CPU-only machine: its CUDA states are then
        # unused.
        if cuda and torch.cuda.is_available():
            for i, state in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, i)
        np.random.set_state(checkpoint.rng["numpy"])  # noqa: NPY002
        random.setstate(checkpoint.rng["python"])
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} holds random states that cannot be restored "
            f"({type(exc).__name__}: {exc}); it is damaged"
        ) from None
