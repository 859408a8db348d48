"""The ``ppl-vae`` command: one module per subcommand."""

from ppl_vae.cli.commands import main

__all__ = ["main"]
