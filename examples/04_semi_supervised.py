"""Example 4: the semi-supervised VAE (M2 of Kingma et al. 2014) with a few labelled images.

y ~ Cat(1/C), z ~ N(0, I), x ~ p(x | y, z); the guide q(y | x) q(z | x, y). Labelled images
observe y; for the others TraceEnum_ELBO sums y out exactly while z is sampled. Training
adds alpha * log q(y | x) for each labelled image (the paper's classification term). Then:
the test accuracy of q(y | x), the test ELBO and IWAE bound with y summed out (lower bounds on
log p(x), nats), samples with one row per class and the same z in every row, and check_pair on
a small M2 pair: exact over y, sampled over z, the enumerated ELBO against the sampled one.

    python examples/04_semi_supervised.py --labels 1000 --epochs 5 --out runs/example04
    python examples/04_semi_supervised.py --dataset digits --labels 100 --epochs 20
"""

from __future__ import annotations

import argparse
import functools

import pyro
import torch

from ppl_vae import M2Config, TrainConfig, VAEConfig, check_pair, evaluate_run, train_run
from ppl_vae import make_ss_networks as networks
from ppl_vae.guides import ss_vae as m2_guide
from ppl_vae.models import ss_vae as m2_model


def small_pair_check(seed: int) -> None:
    """check_pair on an M2 of 6 pixels, 3 classes and z of size 2, on 8 random images."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    classifier, encoder, decoder = networks(6, 2, 3, (16,))
    model = functools.partial(m2_model.model, decoder=decoder)
    guide = functools.partial(m2_guide.guide, encoder=encoder, classifier=classifier)
    x = torch.bernoulli(torch.full((8, 6), 0.4))
    print(check_pair(model, guide, x))


def main(args: argparse.Namespace) -> None:
    vae_config = VAEConfig(
        dataset=args.dataset, z_dim=args.z_dim, hidden=tuple(args.hidden), activation="softplus"
    )
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        elbo="enum",
        seed=args.seed,
        progress=not args.no_progress,
    )
    m2 = M2Config(labels=args.labels, alpha=args.alpha)
    run = train_run(args.out, vae_config, train_config, m2=m2, train_subset=args.train_subset)
    for row in run.history:
        print(
            f"epoch {row['epoch']:>3}: validation ELBO {row['val_elbo']:9.2f} nats/image, "
            f"y summed out (reconstruction {row['val_reconstruction']:.2f}, "
            f"KL over y and z {row['val_kl']:.2f})"
        )
    result = evaluate_run(
        run.path, iwae_samples=args.iwae_k, limit=args.test_images, progress=not args.no_progress
    )
    print(result)
    print(f"samples, one row per class: {run.path / 'samples.png'}")
    small_pair_check(args.seed)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dataset",
        default="fashion-mnist",
        choices=("fashion-mnist", "mnist", "digits"),
        help="data set",
    )
    parser.add_argument("--labels", type=int, default=1000, help="labelled training images")
    parser.add_argument("--alpha", type=float, default=None, help="classification weight")
    parser.add_argument("--z-dim", type=int, default=50, help="latent size")
    parser.add_argument("--hidden", type=int, nargs="+", default=[500], help="hidden sizes")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=200, help="unlabelled images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--train-subset", type=int, default=None, help="first N train images")
    parser.add_argument("--iwae-k", type=int, default=100, help="IWAE importance samples")
    parser.add_argument("--test-images", type=int, default=1000, help="test images evaluated")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", default="runs/example04", help="run folder")
    main(parser.parse_args())
