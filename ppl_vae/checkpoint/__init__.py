"""Checkpoints: a safetensors file (never unpickled) with a JSON body, written atomically,
and restoring the parameter store, optimiser and RNG from it.
"""

from ppl_vae.checkpoint.format import (
    FORMAT,
    FORMAT_VERSION,
    Checkpoint,
    constraint_from_name,
    constraint_name,
    load_checkpoint,
    remove_stale_temporaries,
    restore,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "constraint_from_name",
    "constraint_name",
    "load_checkpoint",
    "remove_stale_temporaries",
    "restore",
    "restore_optimizer",
    "restore_rng",
    "save_checkpoint",
]
