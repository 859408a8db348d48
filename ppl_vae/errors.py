"""Typed errors: each names what went wrong and how to fix it.

Every error the library raises on bad input derives from :class:`PplVaeError` and from the
matching builtin (``ValueError``, ``FileNotFoundError``, ``OSError``, ``FloatingPointError``),
so callers can catch either. Each class carries the exit code ``ppl-vae`` returns for it
(``exit_code``):

====  ===========================================================================
0     success
2     bad input: data, arguments, a checkpoint that cannot be read (and usage errors)
3     training diverged: the loss or a gradient became NaN or infinite
4     a checkpoint or another file of a run could not be written (read-only, disk full)
5     ``--resume`` asked for a configuration other than the run's own
6     a peer process of a distributed run stopped or stopped answering
130   interrupted by SIGINT (Ctrl-C) after writing a checkpoint; resume it
143   interrupted by SIGTERM after writing a checkpoint; resume it
====  ===========================================================================
"""

from __future__ import annotations

import signal
from pathlib import Path

__all__ = [
    "EXIT_CONFIG_MISMATCH",
    "EXIT_DIVERGED",
    "EXIT_INPUT",
    "EXIT_PEER_LOST",
    "EXIT_WRITE",
    "ArgumentError",
    "CheckpointError",
    "CheckpointWriteError",
    "ConfigMismatchError",
    "DataError",
    "DatasetNotFoundError",
    "EngineFallbackWarning",
    "EstimatorError",
    "ModelGuideMismatchError",
    "NotEnumerableError",
    "PairExecutionError",
    "PeerLostError",
    "PplVaeError",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "UserFileError",
    "WriteError",
]

EXIT_INPUT = 2
EXIT_DIVERGED = 3
EXIT_WRITE = 4
EXIT_CONFIG_MISMATCH = 5
EXIT_PEER_LOST = 6


class PplVaeError(Exception):
    """Base class of every error raised by ppl-vae on bad input."""

    exit_code = EXIT_INPUT


class DataError(PplVaeError, ValueError):
    """Data that cannot be used as given: wrong shape, NaN/inf, non-binary for a Bernoulli,
    a corrupt or truncated file. The message names the tensor or file and the fix."""


class DatasetNotFoundError(PplVaeError, FileNotFoundError):
    """A dataset that is not on this machine; the message lists the ways to get it."""


class ArgumentError(PplVaeError, ValueError):
    """An argument outside its range (a particle count below 2, an unknown estimator name);
    the message names the argument and the values it takes."""


class EstimatorError(PplVaeError, ValueError):
    """A pair that an estimator cannot serve: a latent site that is not reparameterised, or a
    scale (a beta) on a latent site of an importance-weighted bound. The message names the
    site."""


class ModelGuideMismatchError(PplVaeError, ValueError):
    """A model/guide pair whose sample sites do not line up (a guide site the model lacks,
    an observed site in the guide)."""


class NotEnumerableError(PplVaeError, ValueError):
    """Exact values were asked of a pair whose latent sites cannot all be enumerated."""


class CheckpointError(PplVaeError, ValueError):
    """A checkpoint that cannot be written or safely read."""


class WriteError(PplVaeError, OSError):
    """A file of a run (checkpoint, history, configuration) could not be written: a missing
    or read-only folder, a full disk. The previous file under that name is unchanged."""

    exit_code = EXIT_WRITE


class CheckpointWriteError(CheckpointError, WriteError):
    """A checkpoint could not be written; the previous one under that name is unchanged."""

    exit_code = EXIT_WRITE


class ConfigMismatchError(PplVaeError, ValueError):
    """A run was asked to resume with a configuration other than the one it was started
    with; ``differences`` lists each one as ``"key: saved X, asked Y"``."""

    exit_code = EXIT_CONFIG_MISMATCH

    def __init__(self, message: str, *, differences: list[str]):
        super().__init__(message)
        self.differences = list(differences)


class TrainingDivergedError(PplVaeError, FloatingPointError):
    """The loss (or a gradient, hence the parameters) became NaN or infinite; ``step`` is the
    first bad step (1-based, counted over the run), ``site`` the sample site whose ELBO term
    is non-finite or the parameter whose gradient was (``None`` when neither could be
    named), and ``checkpoint`` the last good checkpoint or ``None``."""

    exit_code = EXIT_DIVERGED

    def __init__(
        self,
        message: str,
        *,
        step: int,
        epoch: int,
        checkpoint: Path | None,
        site: str | None = None,
    ):
        super().__init__(message)
        self.step = step
        self.epoch = epoch
        self.checkpoint = checkpoint
        self.site = site


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM at a step boundary, after writing a
    checkpoint it can be resumed from. A ``KeyboardInterrupt``, so code that handles Ctrl-C
    keeps working; ``exit_code`` is 128 + the signal's number (130 or 143)."""

    def __init__(
        self, message: str, *, signum: int, step: int, epoch: int, checkpoint: Path | None
    ):
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.epoch = epoch
        self.checkpoint = checkpoint
        self.exit_code = 128 + int(signum)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class UserFileError(PplVaeError, ValueError):
    """A user's model or guide file (or module) that does not import: a syntax error, an
    import error, an exception at import time; the message names the file and line."""


class PairExecutionError(PplVaeError, RuntimeError):
    """The user's model or guide raised while being traced; the message names which and the
    original error (often a guide value outside the model's support, or wrong arguments)."""


class PeerLostError(PplVaeError, RuntimeError):
    """A collective of a distributed run failed: another rank died, was killed, or did not
    answer within the timeout. The last checkpoint written stays; resume from it."""

    exit_code = EXIT_PEER_LOST


class EngineFallbackWarning(UserWarning):
    """The compiled engine could not capture a pair's step and training goes on eagerly."""
