"""``ppl-vae demo``: the main job. The worked binary example (:func:`ppl_vae.runs.binary_toy_demo`),
checked and drawn, then a small VAE on Fashion-MNIST (:func:`ppl_vae.runs.vae_demo`).

Binary x and z with p(z=1) = 0.5 and p(x=1|z) = (0.2, 0.8): at x = 1 the ELBO of q(z=1|x=1) = q
is below log p(x) = log 0.5 by KL(q || p(z|x)), zero at the true posterior q = 0.8.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ppl_vae.cli.options import (
    add_no_progress_argument,
    add_seed_argument,
    add_threads_argument,
    set_threads,
)
from ppl_vae.runs import binary_toy_demo, vae_demo, write_report

__all__ = ["add_parser"]


def _run(args: argparse.Namespace) -> int:
    set_threads(args.threads)

    out = Path(args.out)
    print("1. The worked example: binary x and z, p(z=1) = 0.5, p(x=1|z) = (0.2, 0.8), x = 1\n")
    for q, note in ((0.7, ""), (0.8, " (the true posterior: the bound is tight)")):
        report, figure = binary_toy_demo(out, q=q, seed=args.seed)
        print(f"q(z=1|x=1) = {q}{note}\n{report}\nfigure: {figure}\n")
    if args.skip_vae:
        return 0

    print(f"2. A VAE on Fashion-MNIST: {args.epochs} epochs of SVI, then the test bounds\n")
    run_dir, result = vae_demo(
        out,
        epochs=args.epochs,
        iwae_samples=args.iwae_k,
        test_images=args.test_images,
        seed=args.seed,
        progress=not args.no_progress,
    )
    page = write_report(run_dir)
    print(f"{result}\nrun folder: {run_dir} (samples.png, reconstructions.png, history.csv)")
    print(f"report: {page} (open it in a browser; it works offline)")
    return 0


def add_parser(subparsers: Any) -> None:
    """Add the ``demo`` subcommand to ``subparsers`` (from ``add_subparsers``); its handler
    is ``args.handler(args) -> int``."""
    demo = subparsers.add_parser(
        "demo",
        help="run the main job: the worked binary example, checked and drawn",
        description="Check the binary toy (exact vs sampled ELBO, log p(x), the gap and "
        "KL(q || posterior)) at q(z=1|x=1) = 0.7 and 0.8 and save the ELBO-vs-particles "
        "figure as PNG; then train a small VAE on Fashion-MNIST (digits when it is missing) "
        "and print its test ELBO and IWAE bound.",
    )
    demo.add_argument(
        "--out", default="runs/demo", help="folder for figures (default: %(default)s)"
    )
    add_seed_argument(demo)
    demo.add_argument(
        "--epochs",
        type=int,
        default=5,
        help="training epochs of the demo VAE (default: %(default)s)",
    )
    demo.add_argument(
        "--iwae-k",
        type=int,
        default=500,
        help="importance samples of the IWAE bound (default: %(default)s)",
    )
    demo.add_argument(
        "--test-images", type=int, default=1000, help="test images evaluated (default: %(default)s)"
    )
    demo.add_argument("--skip-vae", action="store_true", help="only the binary example")
    add_threads_argument(demo)
    add_no_progress_argument(demo, "no progress bars")
    demo.set_defaults(handler=_run)
