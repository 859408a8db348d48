"""``ppl-vae evaluate``: a run's test-set numbers (:func:`ppl_vae.runs.evaluate_run`), written to
``evaluation.json``.

ELBO <= IWAE_K = E[log (1/K) sum_k p(x, z_k) / q(z_k | x)] <= log p(x): two lower bounds in
nats per image, and bits per dimension -bound / (D log 2) for D pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ppl_vae.cli.launch import add_process_arguments, on_processes
from ppl_vae.cli.options import (
    add_checkpoint_argument,
    add_device_argument,
    add_no_progress_argument,
)
from ppl_vae.runs import evaluate_run
from ppl_vae.training import Distributed, resolve_device

__all__ = ["add_parser"]


def _run(args: argparse.Namespace) -> int:
    def evaluate(group: Distributed | None) -> int:
        device = args.device
        if group is not None and resolve_device(device).type == "cuda":
            device = str(group.device)  # one GPU a rank
        result = evaluate_run(
            args.run,
            iwae_samples=args.iwae_k,
            limit=args.limit,
            checkpoint=args.checkpoint,
            device=device,
            progress=not args.no_progress and (group is None or group.is_main),
            distributed=group,
        )
        if group is None or group.is_main:
            print(result)
            print(f"written: {Path(args.run) / 'evaluation.json'}")
        return 0

    return on_processes(args, evaluate)


def add_parser(subparsers: Any) -> None:
    """Add the ``evaluate`` subcommand to ``subparsers`` (from ``add_subparsers``); its handler
    is ``args.handler(args) -> int``."""
    evaluate = subparsers.add_parser(
        "evaluate",
        help="evaluate a run on its test set: ELBO, IWAE bound, diagnostics",
        description="Test ELBO (mean ± standard error per image), reconstruction and KL, the "
        "IWAE lower bound on log p(x) with K importance samples in nats and bits/dim, the gap "
        "IWAE - ELBO, active units and KL per latent dimension. Writes evaluation.json. For an "
        "M2 run (train --model m2): the test accuracy of q(y | x) too, and both bounds sum the "
        "label out exactly (the IWAE bound then costs C times a VAE's: pass a smaller --iwae-k "
        "or --limit on a CPU).",
    )
    evaluate.add_argument("run", help="the run folder written by 'ppl-vae train'")
    evaluate.add_argument(
        "--iwae-k",
        type=int,
        default=5000,
        help="importance samples per image (default: %(default)s)",
    )
    evaluate.add_argument(
        "--limit", type=int, default=None, help="evaluate the first N test images only"
    )
    add_checkpoint_argument(evaluate)
    add_device_argument(evaluate)
    add_no_progress_argument(evaluate, "no progress bar")
    add_process_arguments(evaluate, "the test images are shared out")
    evaluate.set_defaults(handler=_run)
