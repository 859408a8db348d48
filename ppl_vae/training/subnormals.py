"""Subnormal floats flushed to zero while training (``TrainConfig.flush_subnormals``).

Adam's first moment m <- 0.9 m + 0.1 g decays through float32's subnormal range
(0 < |m| < 2^-126 ~ 1.2e-38) for weights whose gradient is rarely non-zero (input pixels that
are nearly always off), and x86 arithmetic on subnormals is about a hundred times slower:
after three Fashion-MNIST epochs 8 % of a VAE's first moments are subnormal and Adam's step
takes 2.5x its time. With the CPU's flush-to-zero and denormals-are-zero modes they are 0
instead. A value below 2^-126 cannot move a parameter of ordinary size (its update is
lr * m / (sqrt(v) + eps)), and the parameters after those three epochs are bitwise those
trained without the modes (0 of 652,824 differ; tests/test_subnormals.py checks it on
digits). XLA (so JAX and NumPyro) computes this way on the CPU.

The modes are per thread. ``torch.set_flush_denormal`` sets the calling thread's; the
OpenMP threads that run torch's parallel kernels get the same floating-point environment
through the OpenMP runtime torch loaded from its own package (``GOMP_parallel`` running
the C library's ``fesetenv`` on each of them), where both are found; otherwise only the
calling thread flushes, which covers one-thread training.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["flushes_subnormals", "flushing_subnormals"]

_TINY = torch.finfo(torch.float32).tiny
_OPENMP = re.compile(r"lib[gi]?omp")  # GNU's, Intel's (GOMP-compatible) or LLVM's runtime
_TORCH = ("torch", "torch.libs")  # where torch's wheels keep the runtime they load
_ENV_BYTES = 64  # glibc's fenv_t is 32 bytes on x86-64; room to spare


def flushes_subnormals() -> bool:
    """Whether this thread's float32 arithmetic flushes subnormal results to zero."""
    return bool(torch.tensor([_TINY]).mul_(0.5).item() == 0.0)


def _top_folder(path: Path, root: Path) -> str | None:
    """The folder of ``root`` that holds ``path``, or ``None`` when it lies outside."""
    return path.relative_to(root).parts[0] if path.is_relative_to(root) else None


class _OpenMPThreads:
    """Sets the floating-point environment of every thread of an OpenMP team (the C
    library's ``fegetenv``/``fesetenv``, run on each by ``GOMP_parallel``)."""

    def __init__(self, openmp: ctypes.CDLL, libm: ctypes.CDLL) -> None:
        self.parallel = openmp.GOMP_parallel
        self.parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self.parallel.restype = None
        self.fegetenv, self.fesetenv = libm.fegetenv, ctypes.cast(libm.fesetenv, ctypes.c_void_p)

    @classmethod
    def find(cls) -> _OpenMPThreads | None:
        """The OpenMP runtime torch's parallel kernels use: the one loaded from torch's own
        package, or the only one loaded (other packages bring their own: scikit-learn's
        libgomp has threads of its own); else ``None``."""
        if "OpenMP" not in torch.__config__.parallel_info():
            return None
        name = ctypes.util.find_library("m")
        site = Path(torch.__file__).resolve().parent.parent
        try:
            with open("/proc/self/maps") as maps:
                paths = {
                    line.split()[-1] for line in maps if _OPENMP.match(line.rsplit("/", 1)[-1])
                }
            own = [p for p in paths if _top_folder(Path(p).resolve(), site) in _TORCH]
            candidates = own or (sorted(paths) if len(paths) == 1 else [])
            for path in candidates:
                library = ctypes.CDLL(path)
                if hasattr(library, "GOMP_parallel") and name is not None:
                    return cls(library, ctypes.CDLL(name))
        except OSError:  # no /proc (not Linux), or a library that will not load
            return None
        return None

    def environment(self) -> ctypes.Array:
        """This thread's floating-point environment."""
        env = ctypes.create_string_buffer(_ENV_BYTES)
        if self.fegetenv(env) != 0:
            raise OSError("fegetenv failed")
        return env

    def set_all(self, env: ctypes.Array) -> None:
        """``env`` on every thread of a team of torch's thread count (this one among them)."""
        self.parallel(self.fesetenv, ctypes.cast(env, ctypes.c_void_p), 0, 0)


@contextlib.contextmanager
def flushing_subnormals(enabled: bool = True) -> Iterator[bool]:
    """Run the block with subnormal float results and inputs read as zero on this thread and
    torch's OpenMP threads (the count set when the block starts), then restore what was;
    yields whether this thread flushes. Nothing changes when ``enabled`` is false, when it
    flushes already, or on a CPU without the modes."""
    if not enabled or flushes_subnormals():
        yield flushes_subnormals()
        return
    team = _OpenMPThreads.find()  # None: only this thread's mode is set
    before = team.environment() if team is not None else None
    if not torch.set_flush_denormal(True):  # a CPU without the modes
        yield False
        return
    try:
        if team is not None:
            team.set_all(team.environment())
        yield True
    finally:
        torch.set_flush_denormal(False)
        if team is not None:
            team.set_all(before)
