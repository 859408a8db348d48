"""The ``ppl-vae`` command: ``demo`` (the main job), ``check`` (any model/guide pair),
``train`` / ``evaluate`` / ``sample`` (VAE runs on real images) and ``download``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
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
    if args.skip_vae:
        return 0
    from ppl_vae.demo import vae_demo

    print(f"2. A VAE on Fashion-MNIST: {args.epochs} epochs of SVI, then the test bounds\n")
    run_dir, result = vae_demo(
        out,
        epochs=args.epochs,
        iwae_samples=args.iwae_k,
        test_images=args.test_images,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"{result}\nrun folder: {run_dir} (samples.png, reconstructions.png, history.csv)")
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers like 400 or 300,300, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return values


def _cmd_train(args: argparse.Namespace) -> int:
    from ppl_vae.beta import parse_schedule
    from ppl_vae.experiment import VAEConfig
    from ppl_vae.run import train_run
    from ppl_vae.train import TrainConfig

    schedule = parse_schedule(args.beta)
    constant = getattr(schedule, "beta", None)
    vae_config = VAEConfig(
        dataset=args.dataset,
        likelihood=args.likelihood,
        binarize=args.binarize,
        z_dim=args.z_dim,
        hidden=args.hidden,
        arch=args.arch,
        sigma=args.sigma,
    )
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        elbo=args.elbo,
        num_particles=args.particles,
        beta=1.0 if constant is None else constant,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    run = train_run(
        args.out,
        vae_config,
        train_config,
        data_dir=args.data_dir,
        beta_schedule=None if constant is not None else schedule,
        beta_spec=args.beta,
        train_subset=args.train_subset,
    )
    last = run.history[-1]
    best = max(run.history, key=lambda row: row["val_elbo"])
    dim = run.dataset.data_dim
    print(
        f"trained {len(run.history)} epochs on {run.dataset.name} ({run.dataset.source})\n"
        f"validation ELBO (lower bound on log p(x), beta = 1): last {last['val_elbo']:.2f} "
        f"± {last['val_elbo_se']:.2f} nats/image, best {best['val_elbo']:.2f} "
        f"({-best['val_elbo'] / (dim * math.log(2)):.4f} bits/dim) at epoch {best['epoch']}\n"
        f"  reconstruction {last['val_reconstruction']:.2f} nats, KL {last['val_kl']:.2f} nats\n"
        f"run folder: {run.path} (history.csv, checkpoints/, samples.png, reconstructions.png)"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ppl_vae.run import evaluate_run

    result = evaluate_run(
        args.run,
        iwae_samples=args.iwae_k,
        limit=args.limit,
        checkpoint=args.checkpoint,
        device=args.device,
        progress=not args.no_progress,
    )
    print(result)
    print(f"written: {Path(args.run) / 'evaluation.json'}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from ppl_vae.run import sample_run

    for path in sample_run(args.run, num=args.num, seed=args.seed, device=args.device):
        print(f"written: {path}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from ppl_vae.data import download

    print(f"downloaded to {download(args.name, args.root)}")
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
        "KL(q || posterior)) at q(z=1|x=1) = 0.7 and 0.8 and save the ELBO-vs-particles "
        "figure as PNG; then train a small VAE on Fashion-MNIST (digits when it is missing) "
        "and print its test ELBO and IWAE bound.",
    )
    demo.add_argument(
        "--out", default="runs/demo", help="folder for figures (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument(
        "--epochs",
        type=int,
        default=5,
        help="training epochs of the demo VAE (default: %(default)s)",
    )
    demo.add_argument(
        "--iwae-k",
        type=int,
        default=500,
        help="importance samples of the IWAE bound (default: %(default)s)",
    )
    demo.add_argument(
        "--test-images", type=int, default=1000, help="test images evaluated (default: %(default)s)"
    )
    demo.add_argument("--skip-vae", action="store_true", help="only the binary example")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_cmd_demo)

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
    check.set_defaults(handler=_cmd_check)

    train = sub.add_parser(
        "train",
        help="train a VAE on real images with Pyro's SVI",
        description="Train a Gaussian VAE (encoder outputs mu and log sigma^2; p(z) = N(0, I)) "
        "by SVI, validating the ELBO (beta = 1) every epoch. Writes a run folder: config.json, "
        "history.csv/json, checkpoints/best.ckpt and last.ckpt, samples.png, "
        "reconstructions.png.",
        epilog="example: ppl-vae train --dataset fashion-mnist --z-dim 20 --beta 1 "
        "--epochs 10 --out runs/fmnist",
    )
    train.add_argument(
        "--dataset",
        choices=("digits", "fashion-mnist", "mnist"),
        default="fashion-mnist",
        help="data set (default: %(default)s); digits "
        "ships with scikit-learn, the others are read from --data-dir, "
        "$PPL_VAE_DATA, the Debian package or the download cache",
    )
    train.add_argument("--data-dir", help="folder holding the IDX files of the data set")
    train.add_argument(
        "--likelihood",
        choices=("bernoulli", "gaussian", "continuous-bernoulli"),
        default="bernoulli",
        help="p(x | z) (default: %(default)s)",
    )
    train.add_argument(
        "--binarize",
        choices=("none", "static", "dynamic"),
        default=None,
        help="binarisation of the grey images: none, static (once, seeded) or "
        "dynamic (a fresh draw every epoch; the test set binarised once). "
        "Default: dynamic for bernoulli, none otherwise",
    )
    train.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="fixed s.d. of the gaussian likelihood (default: learned)",
    )
    train.add_argument("--z-dim", type=int, default=20, help="latent size (default: %(default)s)")
    train.add_argument(
        "--hidden",
        type=_int_list,
        default=(400,),
        help="hidden layer sizes, e.g. 400 or 300,300 (default: 400)",
    )
    train.add_argument(
        "--arch",
        choices=("mlp", "conv"),
        default="mlp",
        help="network architecture (default: %(default)s)",
    )
    train.add_argument(
        "--batch-size", type=int, default=128, help="images per step (default: %(default)s)"
    )
    train.add_argument("--lr", type=float, default=1e-3, help="Adam's rate (default: %(default)s)")
    train.add_argument(
        "--lr-schedule",
        choices=("cosine", "exponential"),
        default=None,
        help="learning-rate schedule, stepped per epoch (default: none)",
    )
    train.add_argument(
        "--epochs", type=int, default=10, help="passes over the data (default: %(default)s)"
    )
    train.add_argument(
        "--beta",
        default="1",
        help="KL weight: a number, warmup:STEPS[:END] (linear KL warm-up) or "
        "cyclical:PERIOD[:RATIO[:END]] (default: %(default)s); evaluation always "
        "reports beta = 1",
    )
    train.add_argument(
        "--elbo",
        choices=("meanfield", "trace", "jit-meanfield", "jit-trace"),
        default="meanfield",
        help="Pyro ELBO: meanfield = TraceMeanField_ELBO "
        "(closed-form KL), trace = Trace_ELBO (default: %(default)s)",
    )
    train.add_argument(
        "--particles",
        type=int,
        default=1,
        help="samples of z per image and step, vectorised (default: %(default)s)",
    )
    train.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="train on the first N training images only (quick runs)",
    )
    train.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    train.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or auto (CUDA when present; default: %(default)s)",
    )
    train.add_argument("--out", required=True, help="run folder to write, e.g. runs/NAME")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=_cmd_train)

    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate a run on its test set: ELBO, IWAE bound, diagnostics",
        description="Test ELBO (mean ± standard error per image), reconstruction and KL, the "
        "IWAE lower bound on log p(x) with K importance samples in nats and bits/dim, the gap "
        "IWAE - ELBO, active units and KL per latent dimension. Writes evaluation.json.",
    )
    evaluate.add_argument("run", help="the run folder written by 'ppl-vae train'")
    evaluate.add_argument(
        "--iwae-k",
        type=int,
        default=5000,
        help="importance samples per image (default: %(default)s)",
    )
    evaluate.add_argument(
        "--limit", type=int, default=None, help="evaluate the first N test images only"
    )
    evaluate.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="which checkpoint (default: %(default)s)",
    )
    evaluate.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(handler=_cmd_evaluate)

    sample = sub.add_parser(
        "sample",
        help="decode samples from the prior of a run, and reconstructions",
        description="Write samples.png (E[x | z], z ~ N(0, I)) and reconstructions.png into "
        "the run folder.",
    )
    sample.add_argument("run", help="the run folder written by 'ppl-vae train'")
    sample.add_argument("--num", type=int, default=100, help="samples (default: %(default)s)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    sample.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    sample.set_defaults(handler=_cmd_sample)

    download = sub.add_parser(
        "download",
        help="download MNIST or Fashion-MNIST (needs internet)",
        description="Download a data set with torchvision into the user cache "
        "(~/.cache/ppl-vae/NAME) or --root.",
    )
    download.add_argument("name", choices=("fashion-mnist", "mnist"))
    download.add_argument("--root", default=None, help="target folder")
    download.set_defaults(handler=_cmd_download)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ppl-vae``; returns the exit code (2 for bad input, with a message)."""
    args = build_parser().parse_args(argv)
    pyro.enable_validation(True)
    try:
        return args.handler(args)
    except (PplVaeError, ValueError, FileNotFoundError) as error:
        print(f"ppl-vae {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
