"""Random streams that leave the caller's state alone.

Every estimate that must not depend on, or disturb, what the caller draws next (validation,
evaluation, figures, binding a pair) runs inside :func:`forked_rng`; independent streams of
one seed come from :func:`sub_seed` (numpy's SeedSequence, so nearby seeds do not overlap).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["forked_rng", "sub_seed"]


@contextlib.contextmanager
def forked_rng(device: torch.device | str | None = None, seed: int | None = None) -> Iterator[None]:
    """Run a block without moving torch's global random state (the CPU generator, and the
    CUDA device's when ``device`` is one); with ``seed``, the block draws from a fresh stream
    seeded by it (on the CPU and on every CUDA device, as ``torch.manual_seed``)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def sub_seed(seed: int, *stream: int) -> int:
    """A seed for stream ``stream`` of ``seed``: distinct streams are independent."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])
