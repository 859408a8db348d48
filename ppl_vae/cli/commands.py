"""The ``ppl-vae`` command: its parser, built from one module per subcommand (``demo``, the
main job; ``check``, any model/guide pair; ``train`` / ``evaluate`` / ``sample``, VAE runs on
real images; ``download``; ``sweep``; ``report``; ``lessons``), and :func:`main`, which turns
every failure into one line on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence

import matplotlib
import pyro

from ppl_vae.cli import check, demo, download, evaluate, lessons, report, sample, sweep, train
from ppl_vae.errors import EXIT_INPUT, EngineFallbackWarning, PplVaeError, TrainingInterrupted

__all__ = ["build_parser", "main"]

_SUBCOMMANDS = (demo, check, train, evaluate, sample, download, sweep, report, lessons)
"""The modules of the subcommands, in the order ``ppl-vae --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ppl-vae`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="ppl-vae",
        description="Latent-variable models and their ELBO on Pyro: check a model/guide pair "
        "against exact values, train and evaluate VAEs. All values are in nats.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _SUBCOMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ppl-vae``; returns the exit code, with a one-line message for every
    failure: 2 bad input, 3 training diverged, 4 a file could not be written, 5 a resumed
    run's settings differ, 130/143 interrupted by SIGINT/SIGTERM (see ``ppl_vae.errors``)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc passes on
    # The commands write figures to files and never open a window; the library itself leaves
    # the backend to its user (a notebook's inline figures).
    matplotlib.use("Agg")
    pyro.enable_validation(True)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return args.handler(args)
    except TrainingInterrupted as stop:
        _say(f"{_prog(args)}: {stop}")
        return stop.exit_code
    except KeyboardInterrupt:
        _say(f"{_prog(args)}: interrupted")
        return 128 + signal.SIGINT
    except PplVaeError as error:
        _say(f"{_prog(args)}: error: {_message(args, error)}")
        return error.exit_code
    except (ValueError, FileNotFoundError) as error:
        _say(f"{_prog(args)}: error: {_message(args, error)}")
        return EXIT_INPUT


def _say(line: str) -> None:
    """``line`` on stderr in one write: the ranks of ``--nproc`` share one pipe, and
    ``print``'s separate write of the newline let two ranks' messages run into one line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _prog(args: argparse.Namespace) -> str:
    """``ppl-vae COMMAND``, and the rank on a process of a ``torchrun`` job."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world = os.environ.get("RANK", "?"), os.environ["WORLD_SIZE"]
        return f"ppl-vae {args.command} (rank {rank} of {world})"
    return f"ppl-vae {args.command}"


def _one_line_warning(command: str) -> Callable[..., None]:
    """``warnings.showwarning`` that prints the project's own warnings as one line."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, EngineFallbackWarning):
            _say(f"ppl-vae {command}: warning: {message}")
        else:
            default(message, category, filename, lineno, file, line)

    return show


def _message(args: argparse.Namespace, error: BaseException) -> str:
    # check runs the user's code, whose errors (Pyro's among them) span lines: keep one.
    return " ".join(str(error).split()) if args.command == "check" else str(error)


if __name__ == "__main__":
    sys.exit(main())
