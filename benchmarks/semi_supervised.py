"""Semi-supervised classification on Fashion-MNIST with N labelled training images: ppl-vae's
M2 (``ppl_vae.runs.train_run(..., m2=M2Config(labels=N))``) against (a) the same classifier
network q(y | x) trained on the N labelled images alone, and (b) Pyro's ``ss_vae_M2`` example
re-implemented (``pyro_ss_vae_m2.py``: its networks, optimiser and auxiliary loss weight),
on the same labels (drawn per class, balanced, from the seed) and the same data, in this
process, one after the other.

Every method trains on ppl-vae's 50,000 training images (10,000 held out for validation),
each batch a fresh Bernoulli draw of the grey levels, and is scored on the 10,000 test images
binarised once: test accuracy of argmax_y q(y | x) with its binomial s.e., and for the two M2s
the test ELBO with the label summed out (nats per image, s.e. over images). Seconds per epoch
are training time only (median over epochs), ratio = ppl-vae / Pyro. With ``--equal-time``
Pyro's example trains not for ``--epochs`` but until it has used ppl-vae's training time at
the same labels (whole epochs, so at least that long): accuracy at equal time.

Results go to a JSON file row by row; a rerun skips the rows it holds, so a long run that is
stopped continues where it was (``--fresh`` starts over). Usage::

    python benchmarks/semi_supervised.py --labels 100,600,1000,3000 --epochs 5 --threads 1
    python benchmarks/semi_supervised.py --labels 100,600 --epochs 40 --equal-time \\
        --labelled-batch 100 --labelled-weight 1 --alpha 50   # Pyro given ppl-vae's time
    python benchmarks/semi_supervised.py --quick        # digits, a smoke run of the table
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
from _common import hardware_lines, markdown_table
from pyro_ss_vae_m2 import train_pyro_m2

from ppl_vae import TrainConfig, VAEConfig, train_run
from ppl_vae.data import balanced_labelled_subset, binarize, load
from ppl_vae.runs.semi_supervised import evaluate_m2
from ppl_vae.vae import Classifier, M2Config

RESULTS = Path(__file__).resolve().parent / "results" / "semi_supervised.json"


def _accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    right = (predicted.cpu() == labels.cpu()).double()
    a = float(right.mean())
    return a, math.sqrt(a * (1 - a) / right.numel())


def run_ppl_vae(data, n_labels: int, args: argparse.Namespace) -> dict:
    """ppl-vae's M2 through the run-folder API a user calls."""
    vae = VAEConfig(
        dataset=args.dataset, z_dim=args.z_dim, hidden=(args.hidden,), activation="softplus"
    )
    train = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        elbo="enum",
        beta=args.beta,
        seed=args.seed,
        progress=False,
        threads=args.threads,
    )
    m2 = M2Config(
        labels=n_labels,
        alpha=args.alpha,
        labelled_batch=args.labelled_batch,
        labelled_weight=args.labelled_weight,
    )
    with tempfile.TemporaryDirectory() as out:
        run = train_run(out, vae, train, m2=m2)
        evaluation = evaluate_m2(
            run.vae, data.test.images, data.test.labels, iwae_samples=1, progress=False
        )
    seconds = [row["train_seconds"] for row in run.history.rows]
    return {
        "accuracy": evaluation.accuracy,
        "accuracy_se": evaluation.accuracy_se,
        "test_elbo": evaluation.elbo,
        "test_elbo_se": evaluation.elbo_se,
        "seconds_per_epoch": statistics.median(seconds),
        "train_seconds": sum(seconds),
        "epochs": len(seconds),
        "settings": {
            "vae": vae.to_dict(),
            "m2": m2.to_dict(),
            "alpha": run.vae.alpha,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "beta": args.beta,
        },
    }


def run_pyro(
    data, labelled: torch.Tensor, args: argparse.Namespace, budget: float | None = None
) -> dict:
    """Pyro's example, re-implemented, at its own defaults: ``args.epochs`` epochs, or with a
    ``budget`` (seconds of training) epochs until the budget is spent, at most 10x as many."""
    mask = torch.zeros(data.train.images.shape[0], dtype=torch.bool)
    mask[labelled] = True
    result = train_pyro_m2(
        data.train.images,
        data.train.labels,
        mask,
        data.test.images,
        data.test.labels,
        epochs=args.epochs if budget is None else 10 * args.epochs,
        seed=args.seed,
        max_seconds=budget,
    )
    n = data.test.images.shape[0]
    a = result["test_accuracy"]
    return {
        "accuracy": a,
        "accuracy_se": math.sqrt(a * (1 - a) / n),
        "test_elbo": result["test_elbo"],
        "test_elbo_se": None,
        "seconds_per_epoch": statistics.median(result["seconds_per_epoch"]),
        "train_seconds": sum(result["seconds_per_epoch"]),
        "epochs": result["epochs"],
        "budget_seconds": budget,
        "settings": result["settings"],
    }


def run_classifier(data, labelled: torch.Tensor, args: argparse.Namespace) -> dict:
    """ppl-vae's q(y | x) network alone: cross-entropy on the labelled images, Adam, a fixed
    number of steps, each batch a fresh binarisation."""
    pyro.set_rng_seed(args.seed)
    x, y = data.train.images[labelled], data.train.labels[labelled]
    net = Classifier(x.shape[1], data.num_classes, (args.hidden,), "softplus")
    optimiser = torch.optim.Adam(net.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    batch = min(args.classifier_batch, x.shape[0])
    started = time.perf_counter()
    for _ in range(args.classifier_steps):
        rows = torch.randint(0, x.shape[0], (batch,), generator=generator)
        loss = torch.nn.functional.cross_entropy(net(binarize(x[rows], generator)), y[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        accuracy, se = _accuracy(net(data.test.images).argmax(-1), data.test.labels)
    return {
        "accuracy": accuracy,
        "accuracy_se": se,
        "test_elbo": None,
        "test_elbo_se": None,
        "seconds_per_epoch": None,
        "seconds": seconds,
        "settings": {"steps": args.classifier_steps, "batch": batch, "lr": args.lr},
    }


def _table(rows: list[dict]) -> str:
    def fmt(value, digits=2, scale=1.0):
        return "–" if value is None else f"{scale * value:.{digits}f}"

    body = []
    by_labels: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_labels.setdefault(row["labels"], {})[row["method"]] = row
    for n, methods in sorted(by_labels.items()):
        pyro_time = (methods.get("pyro") or {}).get("seconds_per_epoch")
        base = (methods.get("classifier") or {}).get("accuracy")
        for name in ("classifier", "pyro", "ppl-vae"):
            r = methods.get(name)
            if r is None:
                continue
            ratio = (
                r["seconds_per_epoch"] / pyro_time
                if r.get("seconds_per_epoch") and pyro_time
                else None
            )
            gain = None if base is None else r["accuracy"] - base
            body.append(
                [
                    str(n),
                    name,
                    f"{fmt(r['accuracy'], 2, 100)} ± {fmt(r['accuracy_se'], 2, 100)}",
                    fmt(gain, 2, 100),
                    f"{fmt(r['test_elbo'])}"
                    + (f" ± {fmt(r['test_elbo_se'])}" if r.get("test_elbo_se") else ""),
                    str(r.get("epochs", "–")) if name != "classifier" else "–",
                    fmt(r.get("train_seconds", r.get("seconds")), 0),
                    fmt(r.get("seconds_per_epoch"), 1),
                    fmt(ratio, 2),
                ]
            )
    headers = [
        "labels",
        "method",
        "test accuracy % ± s.e.",
        "vs classifier (points)",
        "test ELBO (nats)",
        "epochs",
        "training s",
        "s / epoch",
        "time vs Pyro",
    ]
    return markdown_table(headers, body)


def main(args: argparse.Namespace) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results = Path(args.results)
    rows = [] if args.fresh or not results.exists() else json.loads(results.read_text())["rows"]
    data = load(args.dataset, binarize="dynamic", seed=args.seed)
    header = hardware_lines(torch.device("cpu"))
    print("\n".join(header), flush=True)
    done = {(r["labels"], r["method"]) for r in rows}
    for n in args.labels:
        labelled = balanced_labelled_subset(data.train.labels, n, args.seed)
        for method in args.methods:
            if (n, method) in done:
                continue
            started = time.perf_counter()
            if method == "ppl-vae":
                row = run_ppl_vae(data, n, args)
            elif method == "pyro":
                ours = next((r for r in rows if (r["labels"], r["method"]) == (n, "ppl-vae")), {})
                if args.equal_time and "train_seconds" not in ours:
                    raise SystemExit("--equal-time: run ppl-vae first at these labels")
                budget = ours["train_seconds"] if args.equal_time else None
                row = run_pyro(data, labelled, args, budget)
            else:
                row = run_classifier(data, labelled, args)
            row.update(
                labels=n,
                method=method,
                wall_seconds=time.perf_counter() - started,
                dataset=args.dataset,
            )
            rows.append(row)
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(json.dumps({"hardware": header, "rows": rows}, indent=1))
            print(
                f"{n} labels, {method}: accuracy {100 * row['accuracy']:.2f}% "
                f"({row['wall_seconds']:.0f} s)",
                flush=True,
            )
    print(_table(rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", default="100,600,1000,3000")
    parser.add_argument("--methods", default="classifier,ppl-vae,pyro")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each M2 (default 5)")
    parser.add_argument(
        "--equal-time",
        action="store_true",
        help="Pyro's example trains for as long as ppl-vae's M2 took at the same labels "
        "(epochs until that budget is spent) instead of --epochs",
    )
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--z-dim", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--labelled-batch", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=None, help="default: ppl-vae's")
    parser.add_argument(
        "--labelled-weight",
        type=float,
        default=None,
        help="ppl-vae's weight of each labelled image in its batch (default: once an epoch)",
    )
    parser.add_argument("--beta", type=float, default=1.0, help="ppl-vae's KL weight of z")
    parser.add_argument("--classifier-steps", type=int, default=3000)
    parser.add_argument("--classifier-batch", type=int, default=64)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--fresh", action="store_true", help="ignore the rows already saved")
    parser.add_argument("--quick", action="store_true", help="digits, 50 and 100 labels")
    args = parser.parse_args(argv)
    args.labels = [int(v) for v in args.labels.split(",")]
    args.methods = args.methods.split(",")
    if args.quick:
        args.dataset, args.labels = "digits", [50, 100]
        args.results = str(Path(args.results).with_name("semi_supervised_quick.json"))
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
