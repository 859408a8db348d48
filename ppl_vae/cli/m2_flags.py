"""The flags of ``ppl-vae train --model m2``, the semi-supervised VAE of Kingma et al.
(2014): which model a run is, how many labels it keeps, and how they weigh."""

from __future__ import annotations

import argparse

from ppl_vae.cli.config_flags import ConfigFlag, build_config
from ppl_vae.errors import ConfigMismatchError
from ppl_vae.runs import run_config
from ppl_vae.vae import M2Config

__all__ = ["M2_FLAGS", "MODELS", "check_model", "m2_config"]

MODELS = ("vae", "m2")
"""Values of ``--model``: the Gaussian VAE, or the semi-supervised M2 (Kingma et al. 2014)."""

M2_FLAGS = (
    ConfigFlag(
        M2Config,
        "labels",
        "with --model m2: training images that keep their label, drawn per class (balanced) "
        "from the seed; the others are unlabelled (default: {default})",
        metavar="N",
    ),
    ConfigFlag(
        M2Config,
        "alpha",
        "with --model m2: weight of the classification term alpha * log q(y | x) per labelled "
        "image (default: {default})",
        none="N / labels; the paper's is 0.1 N / labels",
    ),
    ConfigFlag(
        M2Config,
        "labelled_batch",
        "with --model m2: labelled images added to each batch of --batch-size unlabelled ones, "
        "weighted to count once per epoch unless --labelled-weight (default: {default})",
        metavar="M",
    ),
    ConfigFlag(
        M2Config,
        "labelled_weight",
        "with --model m2: the weight W of each labelled image in its batch (1: as much as an "
        "unlabelled one, as most M2 code does; the labelled set then weighs more than once "
        "an epoch) (default: {default})",
        metavar="W",
        none="once per epoch",
    ),
)


def check_model(path: str, model: str) -> None:
    """Refuse ``--resume`` of a run as another ``--model`` than it was trained as."""
    saved = "m2" if "m2" in run_config(path) else "vae"
    if saved != model:
        raise ConfigMismatchError(
            f"cannot resume {path} as --model {model}: it is a {saved} run. Resume without "
            "--model, or start a new run in another folder.",
            differences=[f"model: run {saved}, asked {model}"],
        )


def m2_config(args: argparse.Namespace) -> M2Config | None:
    """The M2 settings of a new run; ``None`` for a VAE, which refuses the M2 flags."""
    given = [f"--{f.dest.replace('_', '-')}" for f in M2_FLAGS if getattr(args, f.dest) is not None]
    if (args.model or "vae") == "vae":
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ValueError(f"{', '.join(given)} {verb} to --model m2 only")
        return None
    return build_config(M2Config, args, M2_FLAGS)
