"""The ``ppl-vae`` command: ``demo`` (the main job), ``check`` (any model/guide pair),
``train`` / ``evaluate`` / ``sample`` (VAE runs on real images) and ``download``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyro
import torch

from ppl_vae.cli.options import (
    THREADS_HELP,
    add_model_arguments,
    at_least_two,
    set_threads,
    thread_count,
    vae_config_from_args,
)
from ppl_vae.elbo import ELBOS
from ppl_vae.errors import (
    EXIT_INPUT,
    DataError,
    PplVaeError,
    TrainingInterrupted,
    UserFileError,
)

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
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # the user's code: any failure is theirs to fix
            del sys.modules[module_name]
            raise UserFileError(f"cannot import '{path}': {_describe(error)}") from error
    else:
        try:
            module = importlib.import_module(target)
        except Exception as error:
            raise UserFileError(f"cannot import '{target}': {_describe(error)}") from error
    try:
        fn = getattr(module, name)
    except AttributeError:
        raise ValueError(f"'{target}' has no attribute '{name}'") from None
    if not callable(fn):
        raise ValueError(f"'{spec}' is not callable")
    return fn


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


def _cmd_check(args: argparse.Namespace) -> int:
    from ppl_vae.elbo import check_pair

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


def _cmd_demo(args: argparse.Namespace) -> int:
    from ppl_vae.runs import binary_toy_demo

    set_threads(args.threads)

    out = Path(args.out)
    print("1. The worked example: binary x and z, p(z=1) = 0.5, p(x=1|z) = (0.2, 0.8), x = 1\n")
    for q, note in ((0.7, ""), (0.8, " (the true posterior: the bound is tight)")):
        report, figure = binary_toy_demo(out, q=q, seed=args.seed)
        print(f"q(z=1|x=1) = {q}{note}\n{report}\nfigure: {figure}\n")
    if args.skip_vae:
        return 0
    from ppl_vae.runs import vae_demo

    print(f"2. A VAE on Fashion-MNIST: {args.epochs} epochs of SVI, then the test bounds\n")
    run_dir, result = vae_demo(
        out,
        epochs=args.epochs,
        iwae_samples=args.iwae_k,
        test_images=args.test_images,
        seed=args.seed,
        progress=not args.no_progress,
    )
    from ppl_vae.runs import write_report

    page = write_report(run_dir)
    print(f"{result}\nrun folder: {run_dir} (samples.png, reconstructions.png, history.csv)")
    print(f"report: {page} (open it in a browser; it works offline)")
    return 0


# The train command's settings that define a run: argparse destination -> (place in the run's
# config.json, default). Their parser defaults are None, so that with --resume the ones given
# on the command line are known and compared with the run's own.
_TRAIN_SETTINGS: dict[str, tuple[tuple[str, ...], object]] = {
    "dataset": (("vae", "dataset"), "fashion-mnist"),
    "likelihood": (("vae", "likelihood"), "bernoulli"),
    "binarize": (("vae", "binarize"), None),
    "sigma": (("vae", "sigma"), None),
    "z_dim": (("vae", "z_dim"), 20),
    "hidden": (("vae", "hidden"), (400,)),
    "arch": (("vae", "arch"), "mlp"),
    "batch_size": (("train", "batch_size"), 128),
    "lr": (("train", "lr"), 1e-3),
    "lr_schedule": (("train", "lr_schedule"), None),
    "epochs": (("train", "epochs"), 10),
    "elbo": (("train", "elbo"), "meanfield"),
    "particles": (("train", "num_particles"), 1),
    "precision": (("train", "precision"), "float32"),
    "free_bits": (("train", "free_bits"), 0.0),
    "seed": (("train", "seed"), 0),
    "beta": (("beta",), "1"),
    "train_subset": (("data", "train_subset"), None),
}

TRAIN_EXIT_CODES = """\
exit codes:
  0    done
  2    bad input: data, arguments, a checkpoint that cannot be read
  3    training diverged: the loss or a gradient became NaN or inf; the message names the
       step and the site or parameter, and the last good checkpoint stays
  4    a checkpoint or another run file could not be written (read-only folder, full disk)
  5    --resume with settings that differ from the run's own (the message lists them)
  130  interrupted by Ctrl-C (SIGINT), 143 by SIGTERM, after writing a checkpoint:
       continue with 'ppl-vae train --resume FOLDER'"""


def _given_settings(args: argparse.Namespace) -> dict[str, object]:
    """The run-defining settings given on the command line, nested as in config.json."""
    given: dict[str, object] = {}
    for dest, (place, _) in _TRAIN_SETTINGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = list(value)
        node = given
        for key in place[:-1]:
            node = node.setdefault(key, {})  # type: ignore[assignment]
        node[place[-1]] = value  # type: ignore[index]
    return given


def _same_beta(saved: object, asked: object) -> bool:
    try:
        return float(str(saved)) == float(str(asked))
    except ValueError:
        return str(saved) == str(asked)


def _resume(args: argparse.Namespace):
    from ppl_vae.runs import resume_run, run_config

    if args.out is not None and Path(args.out) != Path(args.resume):
        raise ValueError(
            f"--out {args.out} and --resume {args.resume} name different folders: a resumed "
            "run continues in its own folder (drop --out)"
        )
    if args.overwrite:
        raise ValueError("--overwrite starts a new run: use it with --out, not --resume")
    expect = _given_settings(args)
    if "beta" in expect:
        saved = run_config(args.resume).get("beta")
        if saved is not None and _same_beta(saved, expect["beta"]):
            expect["beta"] = saved
    return resume_run(
        args.resume,
        expect=expect,
        device=args.device,
        progress=False if args.no_progress else None,
        threads=args.threads,
        checkpoint_every=args.checkpoint_every,
        data_dir=args.data_dir,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from ppl_vae.elbo import parse_schedule
    from ppl_vae.runs import train_run
    from ppl_vae.training import TrainConfig

    if args.resume is not None:
        run = _resume(args)
    else:
        if args.out is None:
            raise ValueError(
                "say where the run goes: --out FOLDER for a new run, or --resume FOLDER to "
                "continue a stopped one"
            )
        last = Path(args.out) / "checkpoints" / "last.ckpt"
        if last.exists() and not args.overwrite:
            raise ValueError(
                f"{args.out} already holds a run ({last}): continue it with --resume "
                f"{args.out}, choose another --out, or pass --overwrite to start it again"
            )
        if args.overwrite:  # the old run's checkpoints must not be resumed by mistake
            for old in ("last.ckpt", "best.ckpt"):
                (last.parent / old).unlink(missing_ok=True)
        for dest, (_, default) in _TRAIN_SETTINGS.items():
            if getattr(args, dest) is None:
                setattr(args, dest, default)
        schedule = parse_schedule(args.beta)
        constant = getattr(schedule, "beta", None)
        vae_config = vae_config_from_args(args)
        train_config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            elbo=args.elbo,
            num_particles=args.particles,
            beta=1.0 if constant is None else constant,
            seed=args.seed,
            device=args.device or "auto",
            progress=not args.no_progress,
            threads=args.threads,
            checkpoint_every=args.checkpoint_every,
            precision=args.precision,
            free_bits=args.free_bits,
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
    from ppl_vae.runs import evaluate_run

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
    from ppl_vae.runs import sample_run

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
    demo.add_argument("--threads", type=thread_count, default=None, help=THREADS_HELP)
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
    check.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    check.set_defaults(handler=_cmd_check)

    train = sub.add_parser(
        "train",
        help="train a VAE on real images with Pyro's SVI, or resume a stopped run",
        description="Train a Gaussian VAE (encoder outputs mu and log sigma^2; p(z) = N(0, I))\n"
        "by SVI, validating the ELBO (beta = 1) every epoch. Writes a run folder: config.json,\n"
        "history.csv/json, checkpoints/best.ckpt and last.ckpt, samples.png,\n"
        "reconstructions.png. A stopped run (killed, Ctrl-C, SIGTERM) continues with\n"
        "--resume FOLDER, to the same final weights as a run never stopped.",
        epilog="example:\n  ppl-vae train --dataset fashion-mnist --z-dim 20 --beta 1 --epochs 10 "
        "--out runs/fmnist\n  ppl-vae train --resume runs/fmnist    # after a stop\n\n"
        f"{TRAIN_EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(train, defaults=False)
    train.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="fixed s.d. of the gaussian likelihood (default: learned)",
    )
    train.add_argument(
        "--arch",
        choices=("mlp", "conv"),
        default=None,
        help="network architecture (default: mlp)",
    )
    train.add_argument(
        "--batch-size", type=int, default=None, help="images per step (default: 128)"
    )
    train.add_argument("--lr", type=float, default=None, help="Adam's rate (default: 0.001)")
    train.add_argument(
        "--lr-schedule",
        choices=("cosine", "exponential"),
        default=None,
        help="learning-rate schedule, stepped per epoch (default: none)",
    )
    train.add_argument(
        "--epochs", type=int, default=None, help="passes over the data (default: 10)"
    )
    train.add_argument(
        "--beta",
        default=None,
        help="KL weight: a number, warmup:STEPS[:END] (linear KL warm-up) or "
        "cyclical:PERIOD[:RATIO[:END]] (default: 1); evaluation always reports beta = 1",
    )
    train.add_argument(
        "--free-bits",
        type=float,
        default=None,
        metavar="LAMBDA",
        help="train on reconstruction - max(LAMBDA, KL) per image (free bits, in nats): no "
        "pressure on the rate below LAMBDA, against posterior collapse; validation and "
        "evaluation still report the ELBO (default: 0, off)",
    )
    train.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default=None,
        help="dtype of the networks' matrix products in training steps: bfloat16 = mixed "
        "precision by torch.autocast (about 1.2x faster per epoch on CPUs with AVX-512 BF16; "
        "the ELBO's sums, the parameters and evaluation stay float32; not with jit-*) "
        "(default: float32)",
    )
    train.add_argument(
        "--elbo",
        choices=ELBOS,
        default=None,
        help="Pyro ELBO: meanfield = TraceMeanField_ELBO (closed-form KL), trace = Trace_ELBO; "
        "jit-* compile model and guide once (about 10%% faster per epoch on a CPU; fixed model "
        "structure, --beta a number, not a schedule) (default: meanfield)",
    )
    train.add_argument(
        "--particles",
        type=int,
        default=None,
        help="samples of z per image and step, vectorised (default: 1)",
    )
    train.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="train on the first N training images only (quick runs)",
    )
    train.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    train.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or auto (CUDA when present; default: auto, or the run's own with --resume)",
    )
    train.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="CPU threads for torch (default: torch's); resume with the same number for "
        "bitwise-equal results",
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="also write checkpoints/last.ckpt every STEPS steps, so a killed run loses at "
        "most that many (default: at the end of each epoch)",
    )
    train.add_argument("--out", default=None, help="run folder to write, e.g. runs/NAME")
    train.add_argument(
        "--resume",
        default=None,
        metavar="FOLDER",
        help="continue the stopped run in FOLDER from checkpoints/last.ckpt with its own "
        "settings (config.json); settings given as well must match them",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out folder that already holds one (its checkpoints "
        "are replaced)",
    )
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

    from ppl_vae.cli import report, sweep  # their subcommands: ppl-vae sweep, ppl-vae report

    sweep.add_parser(sub)
    report.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ppl-vae``; returns the exit code, with a one-line message for every
    failure: 2 bad input, 3 training diverged, 4 a file could not be written, 5 a resumed
    run's settings differ, 130/143 interrupted by SIGINT/SIGTERM (see ``ppl_vae.errors``)."""
    args = build_parser().parse_args(argv)
    pyro.enable_validation(True)
    try:
        return args.handler(args)
    except TrainingInterrupted as stop:
        print(f"ppl-vae {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"ppl-vae {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except PplVaeError as error:
        print(f"ppl-vae {args.command}: error: {_message(args, error)}", file=sys.stderr)
        return error.exit_code
    except (ValueError, FileNotFoundError) as error:
        print(f"ppl-vae {args.command}: error: {_message(args, error)}", file=sys.stderr)
        return EXIT_INPUT


def _message(args: argparse.Namespace, error: BaseException) -> str:
    # check runs the user's code, whose errors (Pyro's among them) span lines: keep one.
    return " ".join(str(error).split()) if args.command == "check" else str(error)


if __name__ == "__main__":
    sys.exit(main())
