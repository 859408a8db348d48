"""``ppl-vae sample``: a run's sample and reconstruction grids (:func:`ppl_vae.runs.sample_run`).

Samples are E[x | z] with z ~ p(z) (N(0, I), or the run's learned prior); reconstructions
E[x | z = mu(x)] decode the mean mu(x) of q(z | x) for test images x. An M2 run decodes each
code z as every class y: E[x | y, z].
"""

from __future__ import annotations

import argparse
from typing import Any

from ppl_vae.cli.options import add_device_argument, add_seed_argument
from ppl_vae.runs import sample_run

__all__ = ["add_parser"]


def _run(args: argparse.Namespace) -> int:
    for path in sample_run(args.run, num=args.num, seed=args.seed, device=args.device):
        print(f"written: {path}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Add the ``sample`` subcommand to ``subparsers`` (from ``add_subparsers``); its handler
    is ``args.handler(args) -> int``."""
    sample = subparsers.add_parser(
        "sample",
        help="decode samples from the prior of a run, and reconstructions",
        description="Write samples.png (E[x | z], z ~ p(z)) and reconstructions.png into "
        "the run folder. For an M2 run (train --model m2): one row per class named by the "
        "dataset's class names, the same codes z in every row (the style kept, the class "
        "changed), --num / C columns.",
    )
    sample.add_argument("run", help="the run folder written by 'ppl-vae train'")
    sample.add_argument("--num", type=int, default=100, help="samples (default: %(default)s)")
    add_seed_argument(sample)
    add_device_argument(sample)
    sample.set_defaults(handler=_run)
