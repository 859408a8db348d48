"""Command-line options that several commands share: integer ranges and layer sizes as argparse
types, and the flags written once for all commands that take them (--threads, --data-dir,
--device, --checkpoint, --seed, --no-progress).

Below the command modules, so that they import it and not each other. The flags that set a
configuration's fields are generated in :mod:`ppl_vae.cli.config_flags`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

__all__ = [
    "THREADS_HELP",
    "add_checkpoint_argument",
    "add_data_dir_argument",
    "add_device_argument",
    "add_no_progress_argument",
    "add_seed_argument",
    "add_threads_argument",
    "at_least_two",
    "hidden_sizes",
    "integer_at_least",
    "set_threads",
    "thread_count",
]


def integer_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, else a usage error saying ``expected``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


at_least_two = integer_at_least(2, "an integer >= 2 (a standard error needs two draws)")


def set_threads(threads: int | None) -> None:
    """torch's CPU threads for the rest of the command (``None``: torch's default). On a
    machine shared with other work, fewer threads than cores avoid waiting for a busy core."""
    if threads is not None:
        torch.set_num_threads(threads)


thread_count = integer_at_least(1, "a positive number of threads")
"""argparse type of ``--threads``: a positive integer."""


THREADS_HELP = "CPU threads for torch (default: torch's, one per core)"


def hidden_sizes(text: str) -> tuple[int, ...]:
    """argparse type for layer sizes: "400" or "300,300" -> (300, 300)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers like 400 or 300,300, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return values


def add_threads_argument(parser: argparse.ArgumentParser, help: str = THREADS_HELP) -> None:
    """``--threads N``: torch's CPU threads (``None`` when not given)."""
    parser.add_argument("--threads", type=thread_count, default=None, help=help)


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    """``--data-dir FOLDER``: where the data set's IDX files are."""
    parser.add_argument("--data-dir", help="folder holding the IDX files of the data set")


def add_device_argument(
    parser: argparse.ArgumentParser,
    default: str | None = "cpu",
    help: str = "cpu or cuda (default: %(default)s)",
) -> None:
    """``--device``: where the networks run; evaluation and drawing default to the CPU."""
    parser.add_argument("--device", default=default, help=help)


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint best|last``: which of a run's checkpoints to load."""
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="which checkpoint (default: %(default)s)",
    )


def add_seed_argument(parser: argparse.ArgumentParser) -> None:
    """``--seed N`` of the commands whose seed is no training setting (default 0)."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def add_no_progress_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--no-progress``: no tqdm bars (logs and pipes)."""
    parser.add_argument("--no-progress", action="store_true", help=help)
