"""The ``ppl-vae`` command: ``demo`` (the main job) and ``check`` (any model/guide pair)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyro
import torch

from ppl_vae.errors import PplVaeError

__all__ = ["load_callable", "load_data", "main"]


def load_callable(spec: str) -> Callable:
    """Resolve ``package.module:function`` or ``path/to/file.py:function`` to the function."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(
            f"'{spec}' is not of the form package.module:function or path/to/file.py:function"
        )
    if target.endswith(".py") or Path(target).is_file():
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"no file '{path}' (from '{spec}')")
        module_name = f"_ppl_vae_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot import '{path}' as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    try:
        fn = getattr(module, name)
    except AttributeError:
        raise ValueError(f"'{target}' has no attribute '{name}'") from None
    if not callable(fn):
        raise ValueError(f"'{spec}' is not callable")
    return fn


def load_data(text: str) -> torch.Tensor:
    """Data from the command line: numbers (``1`` or ``1,0,1``), a JSON list, or a file
    (``.npy``, ``.pt`` holding one tensor, or ``.csv``/``.txt`` of numbers)."""
    path = Path(text)
    if path.suffix in {".npy", ".pt", ".csv", ".txt"}:
        if not path.is_file():
            raise FileNotFoundError(f"no data file '{path}'")
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix == ".pt":
            array = torch.load(path, weights_only=True)
        else:
            array = np.loadtxt(path, delimiter=",", ndmin=1)
        return torch.as_tensor(array, dtype=torch.get_default_dtype())
    try:
        values = json.loads(text if text.lstrip().startswith("[") else f"[{text}]")
    except json.JSONDecodeError:
        raise ValueError(
            f"--data '{text}' is neither numbers (1,0,1), a JSON list, nor a data file"
        ) from None
    data = torch.tensor(values, dtype=torch.get_default_dtype())
    return data.reshape(()) if data.numel() == 1 and not text.lstrip().startswith("[") else data


def _cmd_check(args: argparse.Namespace) -> int:
    from ppl_vae.check import check_pair

    model, guide = load_callable(args.model), load_callable(args.guide)
    data = load_data(args.data)
    pyro.set_rng_seed(args.seed)
    report = check_pair(
        model, guide, data, num_particles=args.particles, iwae_samples=args.iwae_samples
    )
    print(report)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ppl_vae.demo import binary_toy_demo

    out = Path(args.out)
    print("1. The worked example: binary x and z, p(z=1) = 0.5, p(x=1|z) = (0.2, 0.8), x = 1\n")
    for q, note in ((0.7, ""), (0.8, " (the true posterior: the bound is tight)")):
        report, figure = binary_toy_demo(out, q=q, seed=args.seed)
        print(f"q(z=1|x=1) = {q}{note}\n{report}\nfigure: {figure}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ppl-vae`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="ppl-vae",
        description="Latent-variable models and their ELBO on Pyro: check a model/guide pair "
        "against exact values, train and evaluate VAEs. All values are in nats.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run the main job: the worked binary example, checked and drawn",
        description="Check the binary toy (exact vs sampled ELBO, log p(x), the gap and "
        "KL(q || posterior)) at q(z=1|x=1) = 0.7 and 0.8, and save the ELBO-vs-particles "
        "figure as PNG.",
    )
    demo.add_argument(
        "--out", default="runs/demo", help="folder for figures (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.set_defaults(run=_cmd_demo)

    check = sub.add_parser(
        "check",
        help="check any model/guide pair: exact vs sampled ELBO, gap identity",
        description="Print the check table of a model/guide pair: the exact ELBO (enumeration, "
        "when every latent site is discrete), the sampled Trace_ELBO with its standard error "
        "and z-score, log p(x), the gap log p(x) - ELBO and KL(q || exact posterior). For "
        "continuous latents the table names the estimators standing in for exact values.",
        epilog="example: ppl-vae check ppl_vae.models.binary_toy:model "
        "ppl_vae.guides.binary_toy:guide --data 1",
    )
    check.add_argument("model", help="the model: package.module:function or file.py:function")
    check.add_argument("guide", help="the guide: package.module:function or file.py:function")
    check.add_argument(
        "--data",
        default="1",
        help="the model's first argument: numbers (1 or 1,0,1), a JSON list ([[0.5, 1.2]]), or "
        "a .npy/.pt/.csv file; write --data=-1,2 when it starts with a minus "
        "(default: %(default)s)",
    )
    check.add_argument(
        "--particles",
        type=int,
        default=1000,
        help="particles of the sampled ELBO (default: %(default)s)",
    )
    check.add_argument(
        "--iwae-samples",
        type=int,
        default=5000,
        help="K of the IWAE bound used when log p(x) is not exact (default: %(default)s)",
    )
    check.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    check.set_defaults(run=_cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ppl-vae``; returns the exit code (2 for bad input, with a message)."""
    args = build_parser().parse_args(argv)
    pyro.enable_validation(True)
    try:
        return args.run(args)
    except (PplVaeError, ValueError, FileNotFoundError) as error:
        print(f"ppl-vae {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
