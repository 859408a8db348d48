"""Torch constraints as text, so a checkpoint stores a parameter's constraint without pickling.

The grammar, read back by table lookup and never by ``eval``::

    name := simple | alias | bounded "(" a ["," b] ")" | "independent(" name "," n ")"

with ``simple`` a parameterless constraint (``real``, ``simplex``, ...), ``alias`` one of
``positive`` = ``greater_than(0.0)``, ``nonnegative`` = ``greater_than_eq(0.0)``,
``unit_interval`` = ``interval(0.0, 1.0)``, and ``bounded`` a constraint with scalar bounds.
A name maps back to a constraint with the same bijection: ``transform_to(c)(u)`` is unchanged,
so the param store's unconstrained values stay valid.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pyro.distributions import constraints
from torch import Tensor

from ppl_vae.errors import CheckpointError

__all__ = ["constraint_from_name", "constraint_name"]

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
    """Split at the commas that are not inside parentheses (``independent``'s first argument
    may itself be a call with commas)."""
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
