"""Command-line options that several commands share: integer ranges, threads, and the data and
model flags of ``train`` and ``sweep`` with the :class:`~ppl_vae.vae.config.VAEConfig` they name.

Below the commands (``cli``, ``sweep``), so that they import it and not each other.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported lazily at run time: --help stays quick
    from ppl_vae.vae import VAEConfig

__all__ = [
    "THREADS_HELP",
    "add_model_arguments",
    "at_least_two",
    "hidden_sizes",
    "integer_at_least",
    "set_threads",
    "thread_count",
    "vae_config_from_args",
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


def add_model_arguments(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The data and model flags that ``train`` and ``sweep`` share: --dataset, --data-dir,
    --likelihood, --binarize, --z-dim, --hidden. With ``defaults=False`` every value is left
    ``None`` when not given (``train`` compares the ones given with a resumed run's)."""

    def default(value: object) -> object:
        return value if defaults else None

    parser.add_argument(
        "--dataset",
        choices=("digits", "fashion-mnist", "mnist"),
        default=default("fashion-mnist"),
        help="data set (default: fashion-mnist); digits ships with scikit-learn, the others "
        "are read from --data-dir, $PPL_VAE_DATA, the Debian package or the download cache",
    )
    parser.add_argument("--data-dir", help="folder holding the IDX files of the data set")
    parser.add_argument(
        "--likelihood",
        choices=("bernoulli", "gaussian", "continuous-bernoulli"),
        default=default("bernoulli"),
        help="p(x | z) (default: bernoulli)",
    )
    parser.add_argument(
        "--binarize",
        choices=("none", "static", "dynamic"),
        default=None,
        help="binarisation of the grey images: none, static (once, seeded) or "
        "dynamic (a fresh draw every epoch; the test set binarised once). "
        "Default: dynamic for bernoulli, none otherwise",
    )
    parser.add_argument("--z-dim", type=int, default=default(20), help="latent size (default: 20)")
    parser.add_argument(
        "--hidden",
        type=hidden_sizes,
        default=default((400,)),
        help="hidden layer sizes, e.g. 400 or 300,300 (default: 400)",
    )


def vae_config_from_args(args: argparse.Namespace) -> VAEConfig:
    """The :class:`~ppl_vae.vae.config.VAEConfig` named by :func:`add_model_arguments`' flags
    (and ``--arch``, ``--sigma`` where the command has them)."""
    from ppl_vae.vae import VAEConfig

    return VAEConfig(
        dataset=args.dataset,
        likelihood=args.likelihood,
        binarize=args.binarize,
        z_dim=args.z_dim,
        hidden=args.hidden,
        arch=getattr(args, "arch", None) or "mlp",
        sigma=getattr(args, "sigma", None),
    )
