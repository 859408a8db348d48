"""``python -m ppl_vae`` runs the ``ppl-vae`` command."""

from ppl_vae.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
