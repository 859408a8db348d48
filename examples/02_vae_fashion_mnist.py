"""Example 2: a Gaussian VAE on Fashion-MNIST with Pyro's SVI, and honest test numbers.

The encoder outputs (mu, log sigma^2) of q(z | x), z = mu + sigma * eps; p(z) = N(0, I); the
decoder gives Bernoulli logits for dynamically binarised images. Training maximises the ELBO
with TraceMeanField_ELBO (closed-form KL); evaluation reports the test ELBO and the IWAE bound
with K importance samples, both lower bounds on log p(x), in nats and bits/dim.

    python examples/02_vae_fashion_mnist.py --epochs 10 --out runs/example02
"""

from __future__ import annotations

import argparse

from ppl_vae import (
    TrainConfig,
    VAEConfig,
    evaluate_run,
    train_run,
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
    run = train_run(args.out, vae_config, train_config, train_subset=args.train_subset)
    for row in run.history:
        print(
            f"epoch {row['epoch']:>3}: validation ELBO {row['val_elbo']:9.2f} nats/image "
            f"(reconstruction {row['val_reconstruction']:.2f}, KL {row['val_kl']:.2f})"
        )
    result = evaluate_run(
        run.path, iwae_samples=args.iwae_k, limit=args.test_images, progress=not args.no_progress
    )
    print(result)
    print(f"figures: {run.path / 'samples.png'}, {run.path / 'reconstructions.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dataset",
        default="fashion-mnist",
        choices=("fashion-mnist", "mnist", "digits"),
        help="data set",
    )
    parser.add_argument("--z-dim", type=int, default=20, help="latent size")
    parser.add_argument("--hidden", type=int, nargs="+", default=[400], help="hidden sizes")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--train-subset", type=int, default=None, help="first N train images")
    parser.add_argument("--iwae-k", type=int, default=1000, help="IWAE importance samples")
    parser.add_argument("--test-images", type=int, default=1000, help="test images evaluated")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", default="runs/example02", help="run folder")
    main(parser.parse_args())
