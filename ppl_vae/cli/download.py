"""``ppl-vae download``: fetch MNIST or Fashion-MNIST with torchvision into the user cache or a
folder of one's choice (:func:`ppl_vae.data.download`); needs internet.
"""

from __future__ import annotations

import argparse
from typing import Any

from ppl_vae.data import DATASETS, download

__all__ = ["add_parser"]

_DOWNLOADABLE = tuple(name for name in DATASETS if name != "digits")  # digits: scikit-learn's


def _run(args: argparse.Namespace) -> int:
    print(f"downloaded to {download(args.name, args.root)}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Add the ``download`` subcommand to ``subparsers`` (from ``add_subparsers``); its handler
    is ``args.handler(args) -> int``."""
    parser = subparsers.add_parser(
        "download",
        help="download MNIST or Fashion-MNIST (needs internet)",
        description="Download a data set with torchvision into the user cache "
        "(~/.cache/ppl-vae/NAME) or --root.",
    )
    parser.add_argument("name", choices=_DOWNLOADABLE)
    parser.add_argument("--root", default=None, help="target folder")
    parser.set_defaults(handler=_run)
