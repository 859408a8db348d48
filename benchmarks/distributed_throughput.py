"""Training throughput against the number of processes: `ppl-vae train` on 1 process and on
N processes (`--nproc N`, torch.distributed with gloo on the CPU, NCCL on CUDA), same global
batch and the same numbers, in images per second.

Each configuration is a fresh `python -m ppl_vae train` run (the user's path, launcher
included); rounds interleave the configurations so that a change in the machine's load hits
all of them alike. Throughput is the training images of epochs 2.. over their training
seconds from `history.csv` (epoch 1 holds start-up and, with `--engine compiled`, compiling).

    .venv/bin/python benchmarks/distributed_throughput.py                 # Fashion-MNIST, CPU
    .venv/bin/python benchmarks/distributed_throughput.py --quick         # digits, ~2 min
    .venv/bin/python benchmarks/distributed_throughput.py --device cuda --worlds 1,2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import cpu_model, load_average, markdown_table, usable_cores

_ROOT = Path(__file__).resolve().parent.parent
RESULTS = _ROOT / "benchmarks" / "results" / "distributed_throughput.json"


@dataclass(frozen=True)
class Config:
    """One way to run the same training: processes x torch threads each."""

    processes: int
    threads: int

    @property
    def name(self) -> str:
        processes = "process" if self.processes == 1 else "processes"
        threads = "thread" if self.threads == 1 else "threads"
        return f"{self.processes} {processes} x {self.threads} {threads}"


def images_per_second(config: Config, args: argparse.Namespace, out: Path) -> float:
    """Train once with ``config``; training images per second over epochs 2.."""
    command = [
        sys.executable,
        "-m",
        "ppl_vae",
        "train",
        *("--dataset", args.dataset, "--epochs", str(args.epochs)),
        *("--batch-size", str(args.batch_size), "--train-subset", str(args.train_subset)),
        *("--threads", str(config.threads), "--device", args.device, "--engine", args.engine),
        *("--out", str(out), "--no-progress", "--overwrite"),
    ]
    if config.processes > 1:
        command += ["--nproc", str(config.processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{config.name}: ppl-vae train failed:\n{done.stderr[-2000:]}")
    with open(out / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[1:]
    seconds = sum(float(r["train_seconds"]) for r in rows)
    return len(rows) * args.train_subset / seconds


def main(args: argparse.Namespace) -> None:
    worlds = [int(w) for w in args.worlds.split(",")]
    configs = [Config(w, args.threads) for w in worlds]
    if 1 in worlds and max(worlds) > 1:  # one process given all the cores the others use
        configs.append(Config(1, args.threads * max(worlds)))
    measured: dict[str, list[float]] = {c.name: [] for c in configs}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for config in configs:
                rate = images_per_second(config, args, Path(scratch) / f"r{round_}")
                measured[config.name].append(rate)
                print(f"round {round_ + 1}: {config.name}: {rate:,.0f} images/s", flush=True)
    base = statistics.median(measured[configs[0].name])
    rows = []
    for config in configs:
        rates = measured[config.name]
        rows.append(
            {
                "config": config.name,
                "processes": config.processes,
                "threads": config.threads,
                "images_per_second": statistics.median(rates),
                "all": rates,
                "ratio": statistics.median(rates) / base,
            }
        )
    hardware = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{cpu_model()}, {usable_cores()} usable cores"
    )
    result = {
        "hardware": hardware,
        "torch": torch.__version__,
        "load_average_after": load_average(),
        "settings": {k: v for k, v in vars(args).items() if k != "results"},
        "rows": rows,
    }
    table = markdown_table(
        ["configuration", "images/s (median)", "rounds", f"vs {configs[0].name}"],
        [
            [
                r["config"],
                f"{r['images_per_second']:,.0f}",
                str(len(r["all"])),
                f"{r['ratio']:.2f}x",
            ]
            for r in rows
        ],
    )
    print(
        f"\n{hardware}; {args.dataset}, {args.train_subset} images, batch {args.batch_size}, "
        f"{args.epochs} epochs, engine {args.engine}\n{table}"
    )
    if args.results:
        Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
        print(f"results: {args.results}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist", help="data set")
    parser.add_argument("--train-subset", type=int, default=12800, help="training images")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (1 is warm-up)")
    parser.add_argument("--worlds", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--engine", default="eager", choices=("eager", "compiled"))
    parser.add_argument(
        "--quick", action="store_true", help="digits, 1,024 images, 2 rounds, no results file"
    )
    parser.add_argument("--results", default=str(RESULTS), help="JSON file ('' for none)")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.dataset, arguments.train_subset, arguments.rounds = "digits", 1024, 2
        arguments.results = ""
    main(arguments)
