"""``ppl-vae check``: the check table of any model/guide pair (:func:`ppl_vae.elbo.check_pair`),
and how the command reads its inputs: a pair named ``package.module:function`` or
``path/to/file.py:function``, and data as numbers, a JSON list or a file.

The table holds ELBO = E_q[log p(x, z) - log q(z)], exact by enumeration when every latent
site is discrete, against its sampled estimate, and the gap log p(x) - ELBO = KL(q || p(z|x)).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyro
import torch

from ppl_vae.cli.options import add_seed_argument, at_least_two
from ppl_vae.elbo import check_pair
from ppl_vae.errors import DataError, UserFileError

__all__ = ["add_parser", "load_callable", "load_data"]


def load_callable(spec: str) -> Callable:
    """Resolve ``package.module:function`` or ``path/to/file.py:function`` to the function."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(
            f"'{spec}' is not of the form package.module:function or path/to/file.py:function"
        )
    if target.endswith(".py") or Path(target).is_file():
        module = _import_file(Path(target), spec)
    else:
        try:
            module = pkgutil.resolve_name(f"{target}:")  # ending in ':' names the module
        except Exception as error:
            raise UserFileError(f"cannot import '{target}': {_describe(error)}") from error
    try:
        fn = getattr(module, name)
    except AttributeError:
        raise ValueError(f"'{target}' has no attribute '{name}'") from None
    if not callable(fn):
        raise ValueError(f"'{spec}' is not callable")
    return fn


def _import_file(path: Path, spec: str) -> ModuleType:
    """The module of a user's ``.py`` file, run once under a name of its own."""
    if not path.is_file():
        raise FileNotFoundError(f"no file '{path}' (from '{spec}')")
    module_name = f"_ppl_vae_user_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot import '{path}' as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's code: any failure is theirs to fix
        del sys.modules[module_name]
        raise UserFileError(f"cannot import '{path}': {_describe(error)}") from error
    return module


def _describe(error: BaseException) -> str:
    """``Kind: message (file, line N)`` on one line, for an error raised by a user's file."""
    where = ""
    if isinstance(error, SyntaxError) and error.lineno:
        where = f" ({Path(error.filename or '?').name}, line {error.lineno})"
        return f"SyntaxError: {error.msg}{where}"
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


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


def _run(args: argparse.Namespace) -> int:
    model, guide = load_callable(args.model), load_callable(args.guide)
    data = load_data(args.data)
    bad = ~torch.isfinite(data)
    if bool(bad.any()):
        first = [int(i) for i in bad.reshape(-1).nonzero()[:3, 0]]
        raise DataError(
            f"--data holds NaN or infinite values (at flat positions {first}); pass finite numbers"
        )
    pyro.set_rng_seed(args.seed)
    report = check_pair(
        model,
        guide,
        data,
        num_particles=args.particles,
        iwae_samples=args.iwae_samples,
        gradients=args.gradients,
        estimators=args.estimators,
    )
    print(report)
    return 0


def add_parser(subparsers: Any) -> None:
    """Add the ``check`` subcommand to ``subparsers`` (from ``add_subparsers``); its handler
    is ``args.handler(args) -> int``."""
    check = subparsers.add_parser(
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
        type=at_least_two,
        default=1000,
        help="particles of the sampled ELBO, >= 2 (default: %(default)s)",
    )
    check.add_argument(
        "--gradients",
        action="store_true",
        help="also compare every parameter's sampled gradient (25 independent estimates) "
        "with the exact enumerated one, and print the worst z-score per parameter",
    )
    check.add_argument(
        "--estimators",
        default="",
        metavar="LIST",
        help="also compare estimators on the pair: value, bias, gradient variance and SNR, "
        "e.g. trace,meanfield,tracegraph,renyi:0.5,iwae:10,stl,dreg:10",
    )
    check.add_argument(
        "--iwae-samples",
        type=at_least_two,
        default=5000,
        help="K of the IWAE bound used when log p(x) is not exact (default: %(default)s)",
    )
    add_seed_argument(check)
    check.set_defaults(handler=_run)
