"""Example 3: a beta sweep and the rate-distortion plane, with the rate split by ELBO surgery.

Training with a KL weight beta minimises D + beta R, distortion D = -E_q[log p(x | z)] and rate
R = KL(q(z | x) || p(z)). One run per beta (same seed, same budget), each evaluated at beta = 1,
gives one point (R, D) per beta; points on a line D + R = const have the same ELBO = -(D + R),
and beta moves the model along the curve (Alemi et al. 2018): small beta buys information in z
with rate, large beta drives the rate, and then the active units, towards zero. ELBO surgery
(Hoffman & Johnson 2016) splits each rate as I_q(x; z) + KL(q(z) || p(z)).

    python examples/03_beta_sweep.py --dataset digits --out runs/example03
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ppl_vae import (
    TrainConfig,
    VAEConfig,
    format_table,
    parse_betas,
    run_sweep,
    write_report,
)


def main(args: argparse.Namespace) -> None:
    vae_config = VAEConfig(dataset=args.dataset, z_dim=args.z_dim, hidden=tuple(args.hidden))
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=not args.no_progress,
    )
    # 1. One run per beta into OUT/beta=<b>/, each evaluated at beta = 1 on the test images.
    rows = run_sweep(
        args.out,
        parse_betas(args.beta),
        vae_config,
        train_config,
        iwae_k=args.iwae_k,
        test_images=args.test_images,
        train_subset=args.train_subset,
        on_row=lambda row: print(
            f"beta = {row.beta:g}: R = {row.rate:.3f}, D = {row.distortion:.3f}"
        ),
    )
    print(f"\n{format_table(rows)}\n")

    # 2. What beta did: the best ELBO, and where the code collapsed.
    best = max(rows, key=lambda r: r.elbo)
    print(f"best ELBO {best.elbo:.3f} nats at beta = {best.beta:g}")
    for row in rows:
        if row.active_units == 0:
            print(f"beta = {row.beta:g}: no active unit, rate {row.rate:.3f}: posterior collapse")
    out = Path(args.out)
    print(f"figure: {out / 'rate_distortion.png'} (D against R, lines of equal ELBO)")

    # 3. The page with every figure of the sweep and of each run.
    if not args.no_report:
        index = write_report(out, iwae_k=args.report_iwae_k, iwae_images=args.report_images)
        print(f"report: {index}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dataset",
        default="fashion-mnist",
        choices=("fashion-mnist", "mnist", "digits"),
        help="data set",
    )
    parser.add_argument(
        "--beta", default="0.1,0.25,0.5,1,2,4,8", help="comma-separated KL weights, one run each"
    )
    parser.add_argument("--z-dim", type=int, default=20, help="latent size")
    parser.add_argument("--hidden", type=int, nargs="+", default=[400], help="hidden sizes")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs per run")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--train-subset", type=int, default=None, help="first N train images")
    parser.add_argument("--iwae-k", type=int, default=100, help="IWAE importance samples")
    parser.add_argument("--test-images", type=int, default=1000, help="test images evaluated")
    parser.add_argument("--report-iwae-k", type=int, default=1000, help="largest K in the report")
    parser.add_argument("--report-images", type=int, default=100, help="images of the IWAE curve")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    parser.add_argument("--seed", type=int, default=0, help="random seed, the same for every run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", default="runs/example03", help="sweep folder")
    main(parser.parse_args())
