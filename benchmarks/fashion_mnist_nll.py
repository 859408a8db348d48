"""Test log-likelihood of the reference VAE on dynamically binarised Fashion-MNIST.

The reference configuration of the Exemplar-VAE paper's table (Norouzi et al. 2020): an MLP
encoder and decoder with 2 x 300 hidden units, z = 40, a standard Gaussian prior, Adam 5e-4,
batch 100, linear KL warm-up; test log p(x) estimated by the IWAE bound with K = 5000
importance samples per image. The paper's VAE with the standard prior reaches -228.70 nats.

We train on 50,000 images (10,000 held out for validation and checkpoint selection) within a
fixed budget of epochs, evaluate the best checkpoint on all 10,000 test images, and print the
numbers with the wall time of each phase and the hardware.

    python benchmarks/fashion_mnist_nll.py --epochs 30 --out runs/nll-bench
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ppl_vae.runs import evaluate_run, train_run
from ppl_vae.training import TrainConfig
from ppl_vae.vae import VAEConfig

PUBLISHED = -228.70  # Exemplar VAE paper, VAE with a standard Gaussian prior (nats)


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


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    vae_config = VAEConfig(
        dataset="fashion-mnist",
        likelihood="bernoulli",
        binarize="dynamic",
        z_dim=40,
        hidden=(300, 300),
    )
    steps_per_epoch = 50_000 // 100
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=100,
        lr=5e-4,
        beta=f"warmup:{args.warmup_epochs * steps_per_epoch}",  # KL warm-up, linear from 0
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    start = time.perf_counter()
    run = train_run(args.out, vae_config, train_config)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate_run(
        run.path,
        iwae_samples=args.iwae_k,
        limit=args.test_images,
        device=args.device,
        progress=not args.no_progress,
    )
    eval_seconds = time.perf_counter() - start
    best = max(run.history, key=lambda row: row["val_elbo"])
    summary = {
        "hardware": hardware(),
        "epochs": args.epochs,
        "warmup_epochs": args.warmup_epochs,
        "best_epoch": best["epoch"],
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "test_images": result.n_images,
        "iwae_k": result.iwae_k,
        "test_log_px_iwae": round(result.iwae, 2),
        "test_log_px_iwae_se": round(result.iwae_se, 2),
        "test_elbo": round(result.elbo, 2),
        "published": PUBLISHED,
    }
    (Path(args.out) / "benchmark.json").write_text(json.dumps(summary, indent=2))
    print(result)
    print(
        f"\n| quantity | value |\n|---|---|\n"
        f"| hardware | {summary['hardware']} |\n"
        f"| training | {args.epochs} epochs (KL warm-up over {args.warmup_epochs}), "
        f"{train_seconds / 60:.1f} min; best validation ELBO at epoch {best['epoch']} |\n"
        f"| evaluation | {result.n_images} test images, K = {result.iwae_k}, "
        f"{eval_seconds / 60:.1f} min |\n"
        f"| test log p(x) >= IWAE bound | {result.iwae:.2f} ± {result.iwae_se:.2f} nats |\n"
        f"| test ELBO | {result.elbo:.2f} ± {result.elbo_se:.2f} nats |\n"
        f"| published (Exemplar VAE table, VAE + N(0, I) prior) | {PUBLISHED:.2f} nats |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (the budget)")
    parser.add_argument("--warmup-epochs", type=int, default=10, help="KL warm-up epochs")
    parser.add_argument("--iwae-k", type=int, default=5000, help="importance samples")
    parser.add_argument("--test-images", type=int, default=None, help="first N test images")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", default="runs/nll-bench", help="run folder")
    main(parser.parse_args())
