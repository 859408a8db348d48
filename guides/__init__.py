"""Variational posteriors q(z | x) matching ``ppl_vae.models``; installed as ``ppl_vae.guides``."""
