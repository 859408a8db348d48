"""Test log-likelihood on dynamically binarised Fashion-MNIST: a table of training variants.

The reference configuration of the Exemplar-VAE paper's table (Norouzi et al. 2020): an MLP
encoder and decoder with 2 x 300 hidden units, z = 40, a standard Gaussian prior, Adam 5e-4,
batch 100, linear KL warm-up; test log p(x) estimated by the IWAE bound with K = 5000
importance samples per image. The paper's VAE with the standard prior reaches -228.70 nats.

Rows (``--rows``, each trained in its own folder under ``--out``):

- ``vae``: that configuration, trained on the ELBO with the KL warm-up;
- ``iwae:K`` / ``dreg:K``: the same networks trained on the K-sample importance-weighted
  bound, with its plain or doubly reparameterised gradient (``--objective``; no warm-up:
  the bound has no KL term to anneal);
- ``gated``: the VAE with the VampPrior's gated dense layers (``--arch gated
  --activation identity``);
- ``vamp:K`` / ``mog:K``: a learned prior (``--prior``), the VampPrior with K pseudo-inputs
  or a mixture of K Gaussians; parts combine with ``+``, e.g. ``gated+vamp:500``.

Each trains on 50,000 images (10,000 held out for validation and checkpoint selection) for
a fixed budget of epochs (``--patience`` stops earlier), and its best checkpoint is
evaluated on all 10,000 test images. Rows go to ``--results`` one by one; a rerun skips the
rows it holds (``--fresh`` starts over), so a stopped benchmark continues where it was.
``--max-hours H`` bounds a row's training by the clock: when H hours are spent the run stops
as on SIGTERM (a checkpoint), its best epoch so far is evaluated and the row says so.

    python benchmarks/fashion_mnist_nll.py --epochs 20 --warmup-epochs 5 --threads 2
    python benchmarks/fashion_mnist_nll.py --rows vae,iwae:5 --epochs 2 --test-images 500 \\
        --iwae-k 500 --results /tmp/nll.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from _common import markdown_table

from ppl_vae.errors import TrainingInterrupted
from ppl_vae.runs import evaluate_run, load_run, resume_run, train_run
from ppl_vae.training import TrainConfig
from ppl_vae.vae import VAEConfig, elbo_surgery, posterior_moments

PUBLISHED = -228.70  # Exemplar VAE paper, VAE with a standard Gaussian prior (nats)
PUBLISHED_VAMP = -227.35  # the same table, VAE with the VampPrior
RESULTS = Path(__file__).resolve().parent / "results" / "fashion_mnist_nll.json"
STEPS_PER_EPOCH = 50_000 // 100


def hardware() -> str:
    """CPU model, cores, torch threads, and the CUDA device when one is used."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def _configs(row: str, args: argparse.Namespace) -> tuple[VAEConfig, TrainConfig]:
    """The networks and training settings of one row: its parts joined by "+" (gated, an
    objective iwae:K / dreg:K, a prior vamp:K / mog:K), "vae" for none."""
    parts = set(row.split("+")) - {"vae"}
    gated = "gated" in parts
    objective = next((p for p in parts if p.startswith(("iwae:", "dreg:"))), "elbo")
    prior = next((p for p in parts if p.startswith(("vamp:", "mog:"))), "normal")
    unknown = parts - {"gated", objective, prior}
    if unknown:
        raise SystemExit(f"unknown row part(s) {sorted(unknown)} in {row!r}")
    vae = VAEConfig(
        dataset="fashion-mnist",
        likelihood="bernoulli",
        binarize="dynamic",
        z_dim=40,
        hidden=(300, 300),
        arch="gated" if gated else "mlp",
        activation="identity" if gated else "relu",
        prior=prior,
    )
    warmup = objective == "elbo" and args.warmup_epochs > 0
    train = TrainConfig(
        epochs=args.epochs,
        batch_size=100,
        lr=5e-4,
        beta=f"warmup:{args.warmup_epochs * STEPS_PER_EPOCH}" if warmup else 1.0,
        objective=objective,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        threads=args.threads,
        engine=args.engine,
        lr_schedule=args.lr_schedule,
        lr_min=args.lr_min,
    )
    return vae, train


def _train(out: Path, vae: VAEConfig, train: TrainConfig, args: argparse.Namespace) -> bool:
    """Train (or resume) the row's run folder; with ``--max-hours``, stop when the budget is
    spent as SIGTERM does: a checkpoint at the next step boundary. True when the budget
    stopped it."""
    spent, finished = threading.Event(), threading.Event()
    if args.max_hours is not None:

        def stop() -> None:
            if finished.wait(3600 * args.max_hours):
                return
            spent.set()
            # SIGTERM until training ends: one that lands while fit holds the handler stops
            # it at a step boundary; one that lands before or after it is ignored below
            while not finished.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
                finished.wait(0.5)

        def outside_training(signum: int, frame: object) -> None:
            if not spent.is_set():  # a SIGTERM from elsewhere ends the benchmark, as by default
                raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, outside_training)
        threading.Thread(target=stop, daemon=True).start()
    try:
        if (out / "checkpoints" / "last.ckpt").exists():
            resume_run(out, threads=args.threads, engine=args.engine)
        else:
            train_run(out, vae, train)
    except TrainingInterrupted:
        if not spent.is_set():
            raise  # a real Ctrl-C or SIGTERM, not the budget
        return True
    finally:
        finished.set()
        if args.max_hours is not None:
            signal.signal(signal.SIGTERM, previous)
    return False


def run_folder(row: str, args: argparse.Namespace) -> Path:
    """The row's run folder: its budget and learning-rate schedule name it, so that a rerun
    resumes only the same training."""
    schedule = f"_{args.lr_schedule}" if args.lr_schedule else ""
    return Path(args.out) / f"{row.replace(':', '-')}_{args.epochs}ep{schedule}"


def run_row(row: str, args: argparse.Namespace) -> dict:
    """Train one row (resuming its folder when it holds a stopped run) and evaluate it."""
    vae, train = _configs(row, args)
    out = run_folder(row, args)
    start = time.perf_counter()
    stopped_by_budget = _train(out, vae, train, args)
    train_seconds = time.perf_counter() - start
    saved = out / "history.json"
    history = json.loads(saved.read_text()) if saved.exists() else []
    if not history:
        raise SystemExit(f"{row}: no epoch finished within the budget; rerun to resume {out}")
    start = time.perf_counter()
    result = evaluate_run(
        out,
        iwae_samples=args.iwae_k,
        limit=args.test_images,
        device=args.device,
        progress=not args.no_progress,
    )
    eval_seconds = time.perf_counter() - start
    best = max(history, key=lambda r: r["val_elbo"])
    return {
        "row": row,
        "objective": train.objective,
        "arch": vae.arch,
        "prior": vae.prior,
        "budget_epochs": args.epochs,
        "patience": args.patience,
        "lr": train.lr,
        "lr_schedule": train.lr_schedule,
        "lr_min": train.lr_min if train.lr_schedule == "cosine" else None,
        "epochs": len(history),
        "stopped_by_time_budget_hours": args.max_hours if stopped_by_budget else None,
        "warmup_epochs": args.warmup_epochs if train.objective == "elbo" else 0,
        "best_epoch": best["epoch"],
        "train_seconds_per_epoch": sum(r["train_seconds"] for r in history) / len(history),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "test_images": result.n_images,
        "iwae_k": result.iwae_k,
        "test_log_px_iwae": result.iwae,
        "test_log_px_iwae_se": result.iwae_se,
        "test_elbo": result.elbo,
        "test_elbo_se": result.elbo_se,
        "hardware": hardware(),
        "run_path": str(out),
        **surgery(out),
    }


def surgery(path: Path, images: int = 10_000) -> dict:
    """ELBO surgery of a row's best checkpoint on the first ``images`` test images: the rate
    split into I_q(x; z) and KL(q(z) || p(z)), the prior's own (sampled for a learned one).
    I_q is at most log N (9.2 nats for the 10,000 test images); a code that carries more
    reads as log N, and KL(q(z) || p(z)) = rate - I_q as that much too large."""
    run = load_run(path)
    x = run.dataset.test.images[:images]
    with torch.no_grad():
        mu, log_var = posterior_moments(run.vae.encoder, x)
        split = elbo_surgery(mu, log_var, seed=0, prior=run.vae.prior_distribution())
    return {
        "surgery_images": split.n_images,
        "rate": split.avg_kl,
        "mutual_info": split.mutual_info,
        "mutual_info_se": split.mutual_info_se,
        "marginal_kl": split.marginal_kl,
        "marginal_kl_se": split.marginal_kl_se,
    }


def _published(row: dict) -> float:
    """The published figure a row is measured against: the VampPrior's for a VampPrior row,
    the standard-prior VAE's otherwise."""
    return PUBLISHED_VAMP if row.get("prior", "normal").startswith("vamp:") else PUBLISHED


def _surgery_cell(r: dict) -> str:
    if "marginal_kl" not in r:
        return ""
    se = r.get("marginal_kl_se")
    marginal = f"{r['marginal_kl']:.2f}" + ("" if se is None else f" ± {se:.2f}")
    return f"{r['rate']:.2f} = {r['mutual_info']:.2f} + {marginal}"


def table(rows: list[dict]) -> str:
    """One line per row: budget, cost, the bound with its s.e., and the gap to the paper."""
    lines = [
        [
            r["row"],
            f"{r['epochs']} of {r.get('budget_epochs', r['epochs'])} (best {r['best_epoch']}; "
            f"warm-up {r['warmup_epochs']}"
            + (
                f"; stopped by the {r['stopped_by_time_budget_hours']} h budget)"
                if r.get("stopped_by_time_budget_hours")
                else ")"
            ),
            f"{r['train_seconds_per_epoch']:.1f} s/epoch, eval {r['eval_seconds'] / 60:.1f} min",
            f"{r['test_log_px_iwae']:.2f} ± {r['test_log_px_iwae_se']:.2f}",
            f"{r['test_elbo']:.2f} ± {r['test_elbo_se']:.2f}",
            f"{r['test_log_px_iwae'] - _published(r):+.2f}",
            _surgery_cell(r),
            f"{r['test_images']} x K = {r['iwae_k']}",
        ]
        for r in rows
    ]
    headers = [
        "row",
        "epochs",
        "cost",
        "test log p(x) >= (IWAE), nats",
        "test ELBO, nats",
        f"vs published (VAE {PUBLISHED}, VampPrior {PUBLISHED_VAMP})",
        "rate = I_q(x; z) + KL(q(z) || p(z)), nats",
        "evaluated on",
    ]
    return markdown_table(headers, lines)


def _key(row: str, budget: int) -> tuple[str, int]:
    """A row is its variant at its budget: the same variant trained longer is another row."""
    return row, int(budget)


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    results = Path(args.results)
    rows = [] if args.fresh or not results.exists() else json.loads(results.read_text())["rows"]
    for r in rows if args.surgery else ():  # the surgery again, on the rows saved
        r.update(surgery(Path(r.get("run_path") or Path(args.out) / r["row"].replace(":", "-"))))
    done = {_key(r["row"], r.get("budget_epochs", r["epochs"])) for r in rows}
    print(hardware(), flush=True)
    for row in args.rows:
        if _key(row, args.epochs) in done:
            continue
        rows.append(run_row(row, args))
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps({"rows": rows}, indent=1))
        print(table(rows[-1:]), flush=True)
    print(table(rows))


def cli(argv: list[str] | None = None) -> int:
    """Parse the command line, run the rows; the exit code (143 after a SIGTERM from
    elsewhere, with one line saying where the checkpoint is)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows",
        default="vae,iwae:5,dreg:5,gated,vamp:500,gated+vamp:500",
        help="rows to run, comma-separated; parts of a row joined by + (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (the budget)")
    parser.add_argument("--warmup-epochs", type=int, default=10, help="KL warm-up epochs")
    parser.add_argument("--patience", type=int, default=None, help="early-stopping patience")
    parser.add_argument(
        "--max-hours",
        type=float,
        default=None,
        help="wall-clock budget of each row's training in this invocation: when spent, the "
        "run stops as on SIGTERM (a checkpoint) and its best epoch so far is evaluated; a "
        "rerun with --fresh or another --results resumes the training",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=("cosine", "exponential"),
        default=None,
        help="learning rate per epoch: cosine anneals 5e-4 towards --lr-min over --epochs "
        "(default: constant)",
    )
    parser.add_argument("--lr-min", type=float, default=0.0, help="the cosine schedule's last rate")
    parser.add_argument("--iwae-k", type=int, default=5000, help="importance samples")
    parser.add_argument("--test-images", type=int, default=None, help="first N test images")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--engine",
        default="eager",
        choices=("eager", "compiled"),
        help="training engine (compiled: the step captured and replayed through inductor)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", default="runs/nll-bench", help="folder of the rows' runs")
    parser.add_argument("--results", default=str(RESULTS), help="JSON file of the rows")
    parser.add_argument("--fresh", action="store_true", help="ignore the rows already saved")
    parser.add_argument(
        "--surgery", action="store_true", help="compute the saved rows' ELBO surgery again"
    )
    arguments = parser.parse_args(argv)
    arguments.rows = arguments.rows.split(",")
    try:
        main(arguments)
    except TrainingInterrupted as stop:  # Ctrl-C or a SIGTERM from elsewhere: one line
        print(f"fashion_mnist_nll.py: {stop}; or rerun this command", file=sys.stderr)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(cli())
