"""``--nproc N`` of ``ppl-vae train`` and ``evaluate``: start N processes on this machine
through torch's own elastic launcher (what ``torchrun --standalone --nproc-per-node N``
runs), each one ``python -m ppl_vae COMMAND`` with the same arguments, and exit with the
job's code; under ``torchrun`` the command joins the job as its rank instead.

A rank's exit code is the job's: the first rank to fail names it (a dead rank's peers exit 6,
"peer lost", after it). A signal to this process is passed on to every rank, which stop at
the same step boundary after one checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from collections.abc import Callable, Sequence

from ppl_vae.errors import EXIT_INPUT
from ppl_vae.training import BACKENDS, Distributed, launched_by_torchrun

__all__ = ["add_process_arguments", "launch_local", "on_processes", "without_nproc"]

_NPROC = "--nproc"


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` (or ``--nproc=N``): the arguments of each rank."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == _NPROC:
            skip = True
        elif not arg.startswith(f"{_NPROC}="):
            out.append(arg)
    return out


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m ppl_vae *argv`` as ``nproc`` ranks of one job on this machine (a
    c10d rendezvous on a free loopback port); the job's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher's own log lines (worker states, its failure report with tracebacks) say
    # nothing the ranks' one-line messages do not.
    # Its modules' loggers do not all propagate to the package's, so each is quietened.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"ppl-vae-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,  # a failed rank fails the job: resume it with --resume
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-m", "ppl_vae", *argv)
    except ChildFailedError as failed:
        _, first = failed.get_first_failure()
        code = first.exitcode
        return 128 - code if code < 0 else code  # killed by a signal: 128 + its number
    except SignalException as stop:
        return 128 + int(stop.sigval)
    except Exception as exc:  # the rendezvous itself: a port, the loopback interface
        command = argv[0] if argv else "train"
        print(f"ppl-vae {command}: error: cannot start {nproc} processes: {exc}", file=sys.stderr)
        return EXIT_INPUT
    return 0


def add_process_arguments(parser: argparse.ArgumentParser, work: str) -> None:
    """``--nproc`` and ``--backend``; ``work`` says what the processes share."""
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help=f"run on N processes of this machine (torchrun's launcher; one GPU each on "
        f"CUDA): {work}, with the numbers of one process; under torchrun the processes are "
        "torchrun's and --nproc is ignored",
    )
    parser.add_argument(
        "--backend",
        choices=tuple(b for b in BACKENDS if b != "auto"),
        default=None,
        help="torch.distributed backend of --nproc / torchrun (default: nccl on CUDA, gloo "
        "on the CPU)",
    )


def on_processes(args: argparse.Namespace, body: Callable[[Distributed | None], int]) -> int:
    """Run ``body`` on this process alone, as this rank of a ``torchrun`` job, or start
    ``--nproc`` processes that each do; the exit code."""
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, not {args.nproc}")
    if not launched_by_torchrun():
        if args.nproc is not None and args.nproc > 1:
            return launch_local(args.nproc, without_nproc(args.argv))
        if args.backend is not None:
            raise ValueError("--backend applies to several processes: add --nproc N, or torchrun")
        return body(None)
    group = Distributed(args.backend or "auto")
    try:
        return body(group)
    finally:
        group.close()
