"""Shared helpers of the benchmark scripts: hardware report, data, GEMM timing, tables.

The scripts in this folder import it as a sibling module (``python benchmarks/x.py`` puts this
folder on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

_ROOT = Path(__file__).resolve().parent.parent  # the repository

# ---------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what the platform module knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as text."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def hardware_lines(device: torch.device) -> list[str]:
    """What the numbers were measured on: CPU, cores, torch threads, versions, CUDA device."""
    import pyro

    lines = [
        f"CPU: {cpu_model()}, {usable_cores()} usable cores (of {os.cpu_count()}), "
        f"torch threads: {torch.get_num_threads()}",
        f"torch {torch.__version__}, pyro {pyro.__version__}, python {platform.python_version()}",
        f"device: {device}",
    ]
    if torch.cuda.is_available():
        lines.append(
            f"CUDA device: {torch.cuda.get_device_name(device if device.type == 'cuda' else 0)}"
        )
    else:
        lines.append("CUDA device: none")
    lines.append(f"load average (1/5/15 min) at start: {load_average()}")
    try:
        busy = os.getloadavg()[0] > usable_cores() - 0.5
    except OSError:
        busy = False
    if busy and device.type == "cpu" and torch.get_num_threads() > 1:
        lines.append(
            "note: other processes keep the cores busy; multi-threaded small matrix products "
            "then stall on each other and times scatter: --threads 1 gives steadier ratios"
        )
    return lines


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (must be available) or ``auto``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock times include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchData:
    """Fashion-MNIST for the benchmarks: grey training images (dynamic binarisation draws a
    binary image from them per batch), their uint8 originals, and the binarised test set."""

    train: Tensor  # (N, 784) float in [0, 1], on the device
    train_uint8: Tensor  # (N, 28, 28) uint8, on the CPU (for the DataLoader pipelines)
    train_labels: Tensor  # (N,) int64, on the CPU
    test: Tensor  # (10000, 784) float in {0, 1}, on the device
    source: str


def load_data(device: torch.device, quick: bool = False, test_size: int | None = None) -> BenchData:
    """Fashion-MNIST's 60,000 training images (train and validation together, no split
    carved), or the first 6,000 with ``quick``; the 10,000 test images binarised once with
    the fixed generator of ``ppl_vae.data.datasets`` (the same draws in every row)."""
    from ppl_vae.data import load

    data = load("fashion-mnist", binarize="dynamic", validation_size=0)
    train = data.train.images
    labels = data.train.labels
    if quick:
        train, labels = train[:6000], labels[:6000]
    test = data.test.images if test_size is None else data.test.images[:test_size]
    grey = (train * 255).round().to(torch.uint8).reshape(-1, 28, 28)
    return BenchData(
        train=train.contiguous().to(device),
        train_uint8=grey,
        train_labels=labels,
        test=test.contiguous().to(device),
        source=data.source,
    )


def memory_batches(
    images: Tensor, batch_size: int, generator: torch.Generator, drop_last: bool = False
) -> Iterator[Tensor]:
    """One epoch of the hand-written loop: rows taken by slicing one random permutation, each
    batch a fresh Bernoulli draw of the grey levels (dynamic binarisation)."""
    n = images.shape[0]
    order = torch.randperm(n, generator=generator, device=generator.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        x = images[order[start : start + batch_size]]
        yield torch.bernoulli(x, generator=generator)


def device_generator(device: torch.device, seed: int) -> torch.Generator:
    """A torch generator on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# GEMM bound
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gemm:
    """One matrix product (m x k) @ (k x n); ``transpose_a`` / ``transpose_b`` say whether the
    operand is a transposed view, as autograd passes it (``x @ W.t()``, ``grad.t() @ x``)."""

    name: str
    m: int
    k: int
    n: int
    transpose_a: bool = False
    transpose_b: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def linear_gemms(
    name: str, rows: int, d_in: int, d_out: int, *, input_grad: bool, backward: bool = True
) -> list[Gemm]:
    """The products of one ``nn.Linear(d_in, d_out)`` on ``rows`` inputs: forward
    ``x @ W.t()``; backward ``grad @ W`` (only when the input needs a gradient) and
    ``grad.t() @ x``."""
    gemms = [Gemm(f"{name} fwd", rows, d_in, d_out, transpose_b=True)]
    if backward:
        if input_grad:
            gemms.append(Gemm(f"{name} dX", rows, d_out, d_in))
        gemms.append(Gemm(f"{name} dW", d_out, rows, d_in, transpose_a=True))
    return gemms


def time_gemm(
    gemm: Gemm, device: torch.device, min_seconds: float = 0.05, blocks: int = 5
) -> tuple[float, float]:
    """Seconds per call of ``torch.mm`` on the shapes of ``gemm``, by the wall clock and by
    this process's CPU time: the best of ``blocks`` blocks, each repeating the product for at
    least ``min_seconds`` (a bound: the best block is the one least disturbed by other work)."""
    a = torch.randn(gemm.k, gemm.m, device=device).t() if gemm.transpose_a else None
    if a is None:
        a = torch.randn(gemm.m, gemm.k, device=device)
    b = torch.randn(gemm.n, gemm.k, device=device).t() if gemm.transpose_b else None
    if b is None:
        b = torch.randn(gemm.k, gemm.n, device=device)
    out = torch.empty(gemm.m, gemm.n, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    synchronize(device)
    # Calls per block: enough to last min_seconds.
    t0 = time.perf_counter()
    torch.mm(a, b, out=out)
    synchronize(device)
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, int(min_seconds / once))
    wall, cpu = [], []
    for _ in range(blocks):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        synchronize(device)
        wall.append((time.perf_counter() - t0) / reps)
        cpu.append((time.process_time() - c0) / reps)
    return min(wall), min(cpu)


# ---------------------------------------------------------------------------------------------
# Statistics and tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Median, minimum and maximum of repeated timings (seconds)."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values), len(values))


def timed(fn: Callable[[], object], device: torch.device) -> tuple[dict[str, float], object]:
    """Run ``fn()``; return its wall-clock seconds (device work included) and this process's
    CPU seconds (all threads), as ``{"seconds": ..., "cpu": ...}``, and its result.

    With one thread on a shared machine the CPU time is the steadier measure: it leaves out
    the time the process waits for a core. It means nothing for work on a GPU.
    """
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0}, result


def collapsed_stack_summary(
    path: str, anchor: str, steps: int, rate: float, top: int = 30
) -> list[tuple[str, float, float]]:
    """Inclusive time per function from py-spy's raw output (``--format raw``: one
    ``frame;frame;... count`` line per stack), over the stacks that pass through a frame
    containing ``anchor`` and not through an import: (function, ms per step, share)."""
    import collections
    import re

    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            starts = [i for i, frame in enumerate(frames) if anchor in frame]
            if not starts or any("_find_and_load" in frame for frame in frames):
                continue
            total += int(count)
            names = set()
            for frame in frames[starts[0] :]:
                match = re.match(r"(.*) \((.*?):\d+\)", frame)
                if match:
                    function, file = match.groups()
                    file = file.split("site-packages/")[-1].removeprefix(f"{_ROOT}/")
                    names.add(f"{function} ({file})")
                else:
                    names.add(frame)
            for name in names:
                inclusive[name] += int(count)
    per_step = 1000.0 / rate / steps
    return [(name, n * per_step, n / total) for name, n in inclusive.most_common(top)]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table, columns padded for reading in a terminal."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )


class PeerRow:
    """The part of a ``train_speed`` row that a peer's re-implementation shares: its state is
    its own (no param store to swap in and out around its epochs), and it may be skipped
    after setup (``skipped`` says why: the peer is not installed)."""

    skipped: str | None = None

    def enter(self) -> None:
        """Nothing to swap."""

    def leave(self) -> None:
        """Nothing to swap."""
