"""The ``ppl-vae`` command: one module per subcommand, assembled in :mod:`ppl_vae.cli.commands`."""

from ppl_vae.cli.check import load_callable, load_data
from ppl_vae.cli.commands import build_parser, main

__all__ = ["build_parser", "load_callable", "load_data", "main"]
