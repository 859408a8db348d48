"""Tagged JSON for what a checkpoint holds besides its tensors: optimizer and scheduler state
dicts (int keys, tuples, tensors), a trainer's own state, and plain-JSON counters and config.

A tensor becomes ``{"__tensor__": key}`` and is stored under ``key`` in the safetensors
payload; a tuple becomes ``{"__tuple__": [...]}`` and a dict with keys other than strings
``{"__dict__": [[k, v], ...]}``, so decoding is exact: ``decode(encode(x)) == x``, types
included.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor

from ppl_vae.errors import CheckpointError

__all__ = ["cpu_copy", "decode_tagged", "encode_tagged", "plain_json"]

_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


def cpu_copy(tensor: Tensor) -> Tensor:
    """A detached, contiguous copy on the CPU: what the safetensors payload stores, untouched
    by later in-place updates of ``tensor``."""
    return tensor.detach().to("cpu").contiguous().clone()


def encode_tagged(obj: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-ready form of a state dict: tensors become ``{"__tensor__": key}`` (stored in
    ``tensors``), tuples and non-string-keyed dicts are tagged, so decoding is exact."""
    if isinstance(obj, Tensor):
        tensors[key] = cpu_copy(obj)
        return {_TENSOR: key}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [encode_tagged(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tagged(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        return _encode_mapping(obj, key, tensors)
    raise CheckpointError(
        f"cannot store a value of type {type(obj).__name__} at {key}: checkpoints hold "
        "tensors and plain JSON values only"
    )


def _encode_mapping(obj: Mapping[Any, Any], key: str, tensors: dict[str, Tensor]) -> Any:
    # A dict whose keys are strings, none of them a tag, stays a JSON object; any other is
    # tagged as a list of pairs (JSON would turn int keys into strings).
    plain = all(isinstance(k, str) for k in obj) and not {_TENSOR, _TUPLE, _DICT} & set(obj)
    if plain:
        return {k: encode_tagged(v, f"{key}/{k}", tensors) for k, v in obj.items()}
    items = []
    for k, v in obj.items():
        if k is not None and not isinstance(k, bool | int | float | str):
            raise CheckpointError(f"cannot store a dict key of type {type(k).__name__} at {key}")
        items.append([k, encode_tagged(v, f"{key}/{k}", tensors)])
    return {_DICT: items}


def decode_tagged(obj: Any, tensors: Mapping[str, Tensor], where: str) -> Any:
    """Inverse of :func:`encode_tagged`, taking the tensors from ``tensors``.

    :param where: names the file in the error for a tensor the metadata names but
        ``tensors`` lacks.
    """
    if isinstance(obj, list):
        return [decode_tagged(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            key = obj[_TENSOR]
            if key not in tensors:
                raise CheckpointError(
                    f"{where}: the metadata names tensor {key!r}, which the file does not hold"
                )
            return tensors[key]
        if set(obj) == {_TUPLE}:
            return tuple(decode_tagged(v, tensors, where) for v in obj[_TUPLE])
        if set(obj) == {_DICT}:
            return {k: decode_tagged(v, tensors, where) for k, v in obj[_DICT]}
        return {k: decode_tagged(v, tensors, where) for k, v in obj.items()}
    return obj


def plain_json(value: Any, what: str) -> Any:
    """``value`` after a JSON round trip (tuples become lists).

    :raises CheckpointError: if it is not plain JSON.
    """
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{what} must be plain JSON (dicts, lists, numbers, strings): {exc}"
        ) from None
