"""Generative stories p(x, z), one per module; installed as ``ppl_vae.models``."""
