"""Checkpoints: a safetensors file (never unpickled) with a JSON body, written atomically,
and restoring the parameter store, optimiser and RNG from it.

Modules, each using only those before it: ``constraint_names`` (torch constraints as text),
``codec`` (tagged JSON for state dicts), ``contents`` (what a checkpoint holds: live objects
<-> body and tensors), ``format`` (the file: digest, refusals, atomic write), ``restore``
(putting a checkpoint back).
"""

from ppl_vae.checkpoint.codec import cpu_copy, decode_tagged, encode_tagged, plain_json
from ppl_vae.checkpoint.constraint_names import constraint_from_name, constraint_name
from ppl_vae.checkpoint.contents import (
    FORMAT_VERSION,
    Checkpoint,
    checkpoint_from_contents,
    collect_contents,
    optimizer_param_names,
)
from ppl_vae.checkpoint.format import (
    FORMAT,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from ppl_vae.checkpoint.restore import restore, restore_optimizer, restore_rng

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "checkpoint_from_contents",
    "collect_contents",
    "constraint_from_name",
    "constraint_name",
    "cpu_copy",
    "decode_tagged",
    "encode_tagged",
    "load_checkpoint",
    "optimizer_param_names",
    "plain_json",
    "remove_stale_temporaries",
    "restore",
    "restore_optimizer",
    "restore_rng",
    "save_checkpoint",
]
