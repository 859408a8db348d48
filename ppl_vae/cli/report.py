"""``ppl-vae report``: an offline HTML page of a run's or a sweep's figures and numbers
(:mod:`ppl_vae.runs.report`).

Its key numbers: ELBO = -(D + R) for distortion D and rate R, with the rate split as
R = I_q(x;z) + KL(q(z) || p(z)), and the IWAE bound against K.
"""

from __future__ import annotations

import argparse
from typing import Any

from ppl_vae.cli.options import (
    add_checkpoint_argument,
    add_data_dir_argument,
    add_device_argument,
    add_seed_argument,
)
from ppl_vae.runs import write_report

__all__ = ["add_parser"]


def _run(args: argparse.Namespace) -> int:
    index = write_report(
        args.run,
        out=args.out,
        checkpoint=args.checkpoint,
        device=args.device,
        data_dir=args.data_dir,
        iwae_images=args.iwae_images,
        iwae_k=args.iwae_k,
        latent_images=args.latent_images,
        seed=args.seed,
        runs=not args.no_runs,
    )
    print(f"written: {index} (open it in a browser; it works offline)")
    return 0


def add_parser(subparsers: Any) -> None:
    """Add the ``report`` subcommand to ``subparsers`` (from ``add_subparsers``); its handler
    is ``args.handler(args) -> int``."""
    report = subparsers.add_parser(
        "report",
        help="write an offline HTML page of a run's (or a sweep's) figures and numbers",
        description="Write FOLDER/report/index.html and its PNG figures: training curves "
        "(reconstruction, KL, ELBO; warm-up shaded), the latent space coloured by class with "
        "the prior's circles, KL(N(mu, sigma^2) || N(0, 1)) over a grid, samples, "
        "reconstructions and latent interpolations, the IWAE bound against K with the ELBO, "
        "and the key numbers (ELBO = -(D + R), IWAE, the rate split as I_q(x;z) + "
        "KL(q(z)||p(z)), active units, a collapse warning). For a sweep folder: the "
        "rate-distortion plane, the table, and each run's report. Relative links only: the "
        "page works offline.",
        epilog="example: ppl-vae report runs/fmnist",
    )
    report.add_argument(
        "run", help="a run folder ('ppl-vae train') or sweep folder ('ppl-vae sweep')"
    )
    report.add_argument("--out", default=None, help="the report's folder (default: RUN/report)")
    add_checkpoint_argument(report)
    add_device_argument(report)
    add_data_dir_argument(report)
    report.add_argument(
        "--iwae-k",
        type=int,
        default=5000,
        help="largest K of the IWAE-against-K figure (default: %(default)s)",
    )
    report.add_argument(
        "--iwae-images",
        type=int,
        default=100,
        help="test images of the IWAE-against-K figure (default: %(default)s)",
    )
    report.add_argument(
        "--latent-images",
        type=int,
        default=2000,
        help="test images encoded for the latent space and ELBO surgery (default: %(default)s)",
    )
    add_seed_argument(report)
    report.add_argument(
        "--no-runs", action="store_true", help="for a sweep: do not write each run's report"
    )
    report.set_defaults(handler=_run)
