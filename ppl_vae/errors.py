"""Typed errors: each names what went wrong and how to fix it.

Every error the library raises on bad input derives from :class:`PplVaeError` and from the
matching builtin (``ValueError``, ``FileNotFoundError``), so callers can catch either.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataError",
    "DatasetNotFoundError",
    "ModelGuideMismatchError",
    "NotEnumerableError",
    "PplVaeError",
]


class PplVaeError(Exception):
    """Base class of every error raised by ppl-vae on bad input."""


class DataError(PplVaeError, ValueError):
    """Data that cannot be used as given: wrong shape, NaN/inf, non-binary for a Bernoulli,
    a corrupt or truncated file. The message names the tensor or file and the fix."""


class DatasetNotFoundError(PplVaeError, FileNotFoundError):
    """A dataset that is not on this machine; the message lists the ways to get it."""


class ModelGuideMismatchError(PplVaeError, ValueError):
    """A model/guide pair whose sample sites do not line up (a guide site the model lacks,
    an observed site in the guide)."""


class NotEnumerableError(PplVaeError, ValueError):
    """Exact values were asked of a pair whose latent sites cannot all be enumerated."""


class CheckpointError(PplVaeError, ValueError):
    """A checkpoint that cannot be written or safely read."""
