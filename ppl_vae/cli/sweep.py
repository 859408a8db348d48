"""``ppl-vae sweep``: one run per KL weight beta, each evaluated at beta = 1, and the
rate-distortion plane (:mod:`ppl_vae.runs.sweep`).

Training with beta minimises D + beta R (distortion D = -E_q[log p(x|z)], rate
R = KL(q(z|x) || p(z))), so each beta gives one point of the plane; -ELBO = D + R.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ppl_vae.cli.config_flags import (
    BATCH_SIZE,
    EPOCHS,
    LR,
    SEED,
    add_flags,
    add_model_arguments,
    build_config,
    config_default,
    vae_config_from_args,
)
from ppl_vae.cli.options import (
    add_device_argument,
    add_no_progress_argument,
    add_threads_argument,
    set_threads,
)
from ppl_vae.runs import DEFAULT_BETAS, SweepRow, format_table, parse_betas, run_sweep
from ppl_vae.training import TrainConfig

__all__ = ["add_parser"]

_TRAIN_FLAGS = (
    dataclasses.replace(EPOCHS, help="passes over the data per run (default: {default})"),
    BATCH_SIZE,
    LR,
    dataclasses.replace(SEED, help="random seed, the same for every run (default: {default})"),
)


def _betas(text: str) -> tuple[float, ...]:
    try:
        return parse_betas(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    vae_config = vae_config_from_args(args)
    train_config = build_config(
        TrainConfig, args, _TRAIN_FLAGS, device=args.device, progress=not args.no_progress
    )

    def report(row: SweepRow) -> None:
        print(
            f"beta = {row.beta:g}: R = {row.rate:.3f}, D = {row.distortion:.3f}, "
            f"ELBO = {row.elbo:.3f}, IWAE = {row.iwae:.3f} nats/image "
            f"({Path(args.out) / row.run})",
            flush=True,
        )

    rows = run_sweep(
        args.out,
        args.beta,
        vae_config,
        train_config,
        iwae_k=args.iwae_k,
        test_images=args.test_images,
        train_subset=args.train_subset,
        data_dir=args.data_dir,
        on_row=report,
    )
    out = Path(args.out)
    print(f"\n{format_table(rows)}")
    print(
        f"written: {out / 'sweep.csv'}, {out / 'sweep.json'}, {out / 'rate_distortion.png'}"
        f"\nsee it all: ppl-vae report {out}"
    )
    return 0


def add_parser(subparsers: Any) -> None:
    """Add the ``sweep`` subcommand to ``subparsers`` (from ``add_subparsers``); its handler
    is ``args.handler(args) -> int``."""
    sweep = subparsers.add_parser(
        "sweep",
        help="train one VAE per beta and draw the rate-distortion plane",
        description="Train one run per KL weight beta (same seed, same budget) into "
        "OUT/beta=<b>/, evaluate each at beta = 1 on the test set (ELBO, IWAE bound, active "
        "units, and the rate split as I_q(x;z) + KL(q(z)||p(z))), and write OUT/sweep.csv, "
        "OUT/sweep.json and OUT/rate_distortion.png: distortion D = -E_q[log p(x|z)] against "
        "rate R = KL(q(z|x) || p(z)), one point per beta, with the lines of equal ELBO "
        "D + R = const. Training with beta minimises D + beta R, so beta moves the model "
        "along the curve. All values are nats per image.",
        epilog="example: ppl-vae sweep --dataset digits --z-dim 8 --hidden 128 --epochs 30 "
        "--beta 0.1,0.25,0.5,1,2,4,8 --out runs/sweep-digits",
    )
    add_model_arguments(sweep, defaults=True)
    betas = ",".join(f"{beta:g}" for beta in DEFAULT_BETAS)
    sweep.add_argument(
        "--beta",
        type=_betas,
        default=DEFAULT_BETAS,
        help=f"comma-separated KL weights, one run each (default: {betas})",
    )
    add_flags(sweep, _TRAIN_FLAGS, defaults=True)
    sweep.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="train on the first N training images only (quick sweeps)",
    )
    sweep.add_argument(
        "--iwae-k",
        type=int,
        default=100,
        help="importance samples of the IWAE bound per test image (default: %(default)s)",
    )
    sweep.add_argument(
        "--test-images",
        type=int,
        default=1000,
        help="test images each run is evaluated on (default: %(default)s)",
    )
    add_device_argument(
        sweep,
        default=config_default(TrainConfig, "device"),
        help="cpu, cuda or auto (CUDA when present; default: %(default)s)",
    )
    sweep.add_argument("--out", required=True, help="sweep folder to write, e.g. runs/sweep")
    add_no_progress_argument(sweep, "no progress bars")
    add_threads_argument(sweep)
    sweep.set_defaults(handler=_run)
