"""``ppl-vae train``: train a VAE on real images by SVI into a run folder, or continue a
stopped run with ``--resume`` (:func:`ppl_vae.runs.train_run`, :func:`ppl_vae.runs.resume_run`).

Training maximises the beta-ELBO E_q[log p(x|z)] - beta KL(q(z|x) || p(z)); every epoch
reports the ELBO (beta = 1) on validation images, in nats per image and bits per dimension
(-ELBO / (D log 2) for D pixels).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ppl_vae.cli.config_flags import (
    BATCH_SIZE,
    EPOCHS,
    LR,
    MODEL_FLAGS,
    SEED,
    ConfigFlag,
    add_flags,
    add_model_arguments,
    build_config,
    config_default,
    given_settings,
    settings_places,
    vae_config_from_args,
)
from ppl_vae.cli.launch import add_process_arguments, on_processes
from ppl_vae.cli.m2_flags import M2_FLAGS, MODELS, check_model, m2_config
from ppl_vae.cli.options import add_device_argument, add_no_progress_argument, add_threads_argument
from ppl_vae.elbo import ELBOS, canonical_beta
from ppl_vae.runs import TrainedRun, resume_run, train_run
from ppl_vae.training import ENGINES, LR_SCHEDULES, PRECISIONS, Distributed, TrainConfig
from ppl_vae.vae import ACTIVATIONS, ARCHITECTURES, VAEConfig

__all__ = ["TRAIN_EXIT_CODES", "add_parser"]

TRAIN_EXIT_CODES = """\
exit codes:
  0    done
  2    bad input: data, arguments, a checkpoint that cannot be read
  3    training diverged: the loss or a gradient became NaN or inf; the message names the
       step and the site or parameter, and the last good checkpoint stays
  4    a checkpoint or another run file could not be written (read-only folder, full disk)
  5    --resume with settings that differ from the run's own (the message lists them)
  6    --nproc / torchrun: another process of the job stopped or did not answer (this
       rank exits instead of waiting; the last checkpoint stays)
  130  interrupted by Ctrl-C (SIGINT), 143 by SIGTERM, after writing a checkpoint:
       continue with 'ppl-vae train --resume FOLDER'"""

_NETWORK_FLAGS = (
    ConfigFlag(
        VAEConfig,
        "sigma",
        "fixed s.d. of the gaussian likelihood (default: {default})",
        none="learned",
    ),
    ConfigFlag(
        VAEConfig,
        "arch",
        "network architecture: mlp, gated (the MLP with gated dense layers "
        "act(W h) * sigmoid(V h), as in the VampPrior's networks: use --activation identity "
        "for theirs) or conv (default: {default})",
        choices=ARCHITECTURES,
    ),
    ConfigFlag(
        VAEConfig,
        "activation",
        "hidden layers' activation (default: {default})",
        choices=tuple(ACTIVATIONS),
    ),
    ConfigFlag(
        VAEConfig,
        "prior",
        "p(z): normal = N(0, I); mog:K = a learned mixture of K Gaussians; vamp:K = the "
        "VampPrior, the mixture of the encoder's posteriors at K learned pseudo-inputs (Tomczak "
        "& Welling 2018). A learned prior has no closed-form KL: the KL term is then sampled, "
        "and the reports say so (default: {default})",
        metavar="normal|mog:K|vamp:K",
    ),
)


def _beta(text: str) -> float | str:
    """argparse type of ``--beta``: the one form TrainConfig holds, so that the value given
    with ``--resume`` and the saved one compare by equality."""
    try:
        return canonical_beta(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_BETA = ConfigFlag(
    TrainConfig,
    "beta",
    "KL weight: a number, warmup:STEPS[:END] (linear KL warm-up) or "
    "cyclical:PERIOD[:RATIO[:END]] (default: {default}); evaluation always reports beta = 1",
    parse=_beta,
)
_SCHEDULE_FLAGS = (
    BATCH_SIZE,
    LR,
    ConfigFlag(
        TrainConfig,
        "lr_schedule",
        "learning-rate schedule, stepped per epoch (default: {default})",
        choices=LR_SCHEDULES,
    ),
    EPOCHS,
)
_OBJECTIVE_FLAGS = (
    ConfigFlag(
        TrainConfig,
        "free_bits",
        "train on reconstruction - max(LAMBDA, KL) per image (free bits, in nats): no pressure "
        "on the rate below LAMBDA, against posterior collapse; validation and evaluation still "
        "report the ELBO (default: {default}, off)",
        metavar="LAMBDA",
    ),
    ConfigFlag(
        TrainConfig,
        "precision",
        "dtype of the networks' matrix products in training steps: bfloat16 = mixed precision "
        "by torch.autocast (about 1.2x faster per epoch on CPUs with AVX-512 BF16; the ELBO's "
        "sums, the parameters and evaluation stay float32; not with jit-*) "
        "(default: {default})",
        choices=PRECISIONS,
    ),
    ConfigFlag(
        TrainConfig,
        "elbo",
        "Pyro ELBO: meanfield = TraceMeanField_ELBO (closed-form KL), trace = Trace_ELBO; "
        "jit-* compile model and guide once (about 10%% faster per epoch on a CPU; fixed model "
        "structure, --beta a number, not a schedule) (default: {default})",
        choices=ELBOS,
    ),
    ConfigFlag(
        TrainConfig,
        "num_particles",
        "samples of z per image and step, vectorised (default: {default})",
        option="particles",
    ),
    ConfigFlag(
        TrainConfig,
        "objective",
        "what training maximises: elbo (the ELBO, by --elbo), iwae:K (the K-sample "
        "importance-weighted bound, Burda et al. 2015) or dreg:K (the same bound with the "
        "doubly reparameterised encoder gradient, Tucker et al. 2018); iwae/dreg need beta = 1, "
        "one particle, no free bits; validation still reports the ELBO (default: {default})",
        metavar="elbo|iwae:K|dreg:K",
    ),
    ConfigFlag(
        TrainConfig,
        "patience",
        "stop early once N epochs have passed without a better validation ELBO; "
        "checkpoints/best.ckpt holds the best epoch (default: {default}: every epoch)",
        metavar="N",
    ),
)
_RUN_FLAGS = (
    *MODEL_FLAGS,
    *_NETWORK_FLAGS,
    *_SCHEDULE_FLAGS,
    _BETA,
    *_OBJECTIVE_FLAGS,
    SEED,
    *M2_FLAGS,
)
"""The flags of the settings that define a run, besides --train-subset: with --resume, the
ones given must match the run's own."""

# Where each run-defining setting sits in config.json (--train-subset sets no dataclass
# field). Their parser defaults are None, so that with --resume the ones given on the
# command line are known and compared with the run's own.
_PLACES: dict[str, tuple[str, ...]] = {
    **settings_places(_RUN_FLAGS),
    "train_subset": ("data", "train_subset"),
}


def _resume(args: argparse.Namespace, group: Distributed | None) -> TrainedRun:
    if args.out is not None and Path(args.out) != Path(args.resume):
        raise ValueError(
            f"--out {args.out} and --resume {args.resume} name different folders: a resumed "
            "run continues in its own folder (drop --out)"
        )
    if args.overwrite:
        raise ValueError("--overwrite starts a new run: use it with --out, not --resume")
    if args.model is not None:
        check_model(args.resume, args.model)
    return resume_run(
        args.resume,
        expect=given_settings(args, _PLACES),
        device=args.device,
        progress=False if args.no_progress else None,
        threads=args.threads,
        checkpoint_every=args.checkpoint_every,
        data_dir=args.data_dir,
        engine=args.engine,
        flush_subnormals=False if args.keep_subnormals else None,
        distributed=group,
    )


def _start(args: argparse.Namespace, group: Distributed | None) -> TrainedRun:
    """A new run in ``--out`` (refusing a folder that holds one, unless ``--overwrite``)."""
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
    m2 = m2_config(args)
    if args.overwrite:  # the old run's checkpoints must not be resumed by mistake
        for old in ("last.ckpt", "best.ckpt"):
            (last.parent / old).unlink(missing_ok=True)
    if m2 is not None and args.objective not in (None, "elbo"):
        raise ValueError(
            f"--objective {args.objective} trains a VAE; M2 sums its label out with the "
            "enumerated ELBO (--elbo enum): drop --objective"
        )
    # M2 sums its label out exactly unless another ELBO is asked for.
    elbo = {"elbo": "enum"} if m2 is not None and args.elbo is None else {}
    train_config = build_config(
        TrainConfig,
        args,
        _RUN_FLAGS,
        device=args.device or config_default(TrainConfig, "device"),
        progress=not args.no_progress,
        threads=args.threads,
        checkpoint_every=args.checkpoint_every,
        engine=args.engine or config_default(TrainConfig, "engine"),
        flush_subnormals=not args.keep_subnormals,
        **elbo,
    )
    return train_run(
        args.out,
        vae_config_from_args(args, _NETWORK_FLAGS),
        train_config,
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        m2=m2,
        distributed=group,
    )


def _run(args: argparse.Namespace) -> int:
    def train(group: Distributed | None) -> int:
        run = _resume(args, group) if args.resume is not None else _start(args, group)
        return _report(run) if group is None or group.is_main else 0  # one report: rank 0's

    return on_processes(args, train)


def _report(run: TrainedRun) -> int:
    last = run.history[-1]
    best = max(run.history, key=lambda row: row["val_elbo"])
    dim = run.dataset.data_dim
    print(
        f"trained {len(run.history)} epochs on {run.dataset.name} ({run.dataset.source})\n"
        f"validation ELBO (lower bound on log p(x), beta = 1): last {last['val_elbo']:.2f} "
        f"± {last['val_elbo_se']:.2f} nats/image, best {best['val_elbo']:.2f} "
        f"({-best['val_elbo'] / (dim * math.log(2)):.4f} bits/dim) at epoch {best['epoch']}\n"
        f"  reconstruction {last['val_reconstruction']:.2f} nats, KL {last['val_kl']:.2f} nats"
    )
    if run.semi_supervised:  # the classifier q(y | x) on the validation images
        validation = run.dataset.validation
        acc, se = run.vae.accuracy(validation.images, validation.labels)
        n = validation.labels.numel()
        print(
            f"validation accuracy of q(y | x): {100 * acc:.2f}% ± {100 * se:.2f} (s.e.) on {n} "
            f"images; test numbers: ppl-vae evaluate {run.path}"
        )
    if run.history.stopped_early is not None:
        print(
            f"stopped early after epoch {run.history.stopped_early}: no better validation "
            f"ELBO in the {run.train_config.patience} epochs since epoch "
            f"{run.history.best_epoch} (checkpoints/best.ckpt)"
        )
    print(f"run folder: {run.path} (history.csv, checkpoints/, samples.png, reconstructions.png)")
    return 0


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that define the run, in the order --help lists them."""
    parser.add_argument(
        "--model",
        choices=MODELS,
        default=None,
        help="vae: the Gaussian VAE; m2: the semi-supervised VAE of Kingma et al. (2014), "
        "y ~ Cat(1/C), z ~ N(0, I), x ~ p(x | y, z), the label summed out exactly where it is "
        "not given (default: vae)",
    )
    add_model_arguments(parser, defaults=False)
    add_flags(
        parser,
        (*_NETWORK_FLAGS, *_SCHEDULE_FLAGS, _BETA, *_OBJECTIVE_FLAGS, *M2_FLAGS),
        defaults=False,
    )
    parser.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="train on the first N training images only (quick runs)",
    )
    SEED.add(parser, defaults=False)


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how the run goes: device, threads, checkpoints, its folder."""
    device = config_default(TrainConfig, "device")
    add_device_argument(
        parser,
        default=None,
        help=f"cpu, cuda or auto (CUDA when present; default: {device}, or the run's own "
        "with --resume)",
    )
    add_threads_argument(
        parser,
        help="CPU threads for torch (default: torch's); resume with the same number for "
        "bitwise-equal results",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="also write checkpoints/last.ckpt every STEPS steps, so a killed run loses at "
        "most that many (default: at the end of each epoch)",
    )
    engine = parser.add_mutually_exclusive_group()
    engine.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="eager: each step through Pyro's handlers; compiled: the step's loss and "
        "gradients captured once per batch shape and replayed as a compiled graph (CUDA "
        "graphs on a GPU), the same noise and numbers to float rounding, after a few seconds "
        "of compiling per batch shape; a pair that cannot be captured trains eagerly after a "
        f"warning (default: {config_default(TrainConfig, 'engine')}, or the run's own with "
        "--resume)",
    )
    engine.add_argument(
        "--compile",
        dest="engine",
        action="store_const",
        const="compiled",
        help="the same as --engine compiled",
    )
    parser.add_argument(
        "--keep-subnormals",
        action="store_true",
        help="keep float results below 2^-126 in training, as IEEE arithmetic does; by "
        "default they are read as 0 on the CPU (Adam's moments of rarely-active weights "
        "decay through that range, where arithmetic is ~100x slower; the parameters measured "
        "bitwise the same; with --resume: from here on)",
    )
    parser.add_argument("--out", default=None, help="run folder to write, e.g. runs/NAME")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="FOLDER",
        help="continue the stopped run in FOLDER from checkpoints/last.ckpt with its own "
        "settings (config.json); settings given as well must match them",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out folder that already holds one (its checkpoints "
        "are replaced)",
    )
    add_no_progress_argument(parser, "no progress bar")
    add_process_arguments(parser, "each step's batch is split across them")


def add_parser(subparsers: Any) -> None:
    """Add the ``train`` subcommand to ``subparsers`` (from ``add_subparsers``); its handler
    is ``args.handler(args) -> int``."""
    train = subparsers.add_parser(
        "train",
        help="train a VAE on real images with Pyro's SVI, or resume a stopped run",
        description="Train a Gaussian VAE (encoder outputs mu and log sigma^2; p(z) = N(0, I)\n"
        "or a learned prior, --prior)\n"
        "by SVI, validating the ELBO (beta = 1) every epoch. Writes a run folder: config.json,\n"
        "history.csv/json, checkpoints/best.ckpt and last.ckpt, samples.png,\n"
        "reconstructions.png. A stopped run (killed, Ctrl-C, SIGTERM) continues with\n"
        "--resume FOLDER, to the same final weights as a run never stopped.",
        epilog="example:\n  ppl-vae train --dataset fashion-mnist --z-dim 20 --beta 1 --epochs 10 "
        "--out runs/fmnist\n  ppl-vae train --resume runs/fmnist    # after a stop\n"
        "  ppl-vae train --model m2 --labels 1000 --dataset fashion-mnist --out runs/m2\n"
        "  ppl-vae train --nproc 2 --dataset fashion-mnist --out runs/ddp    # 2 processes\n"
        "  torchrun --nproc-per-node 2 -m ppl_vae train --dataset fashion-mnist --out runs/ddp"
        "\n\n"
        f"{TRAIN_EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_arguments(train)
    _add_runtime_arguments(train)
    train.set_defaults(handler=_run)
