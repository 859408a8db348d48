"""Example 5: your own model/guide pair trained on several processes with torchrun.

The pair is two plain Pyro functions: z ~ N(0, I), x ~ Bernoulli(decoder(z)) and
q(z | x) = N(mu(x), sigma(x)), the batch in a plate named "data". ``fit(...,
distributed=True)`` splits each step's batch across the processes torchrun starts and sums
their gradients: the parameters are those of one process (to float rounding), whatever the
number of processes. The same script runs on one process when started without torchrun.

    torchrun --nproc-per-node 2 examples/05_distributed_own_pair.py --out runs/example05
    python examples/05_distributed_own_pair.py --out runs/example05-one    # one process
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae import TrainConfig, fit, launched_by_torchrun, load, save


class Encoder(nn.Module):
    def __init__(self, pixels: int, hidden: int, z_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(pixels, hidden), nn.Softplus())
        self.mu = nn.Linear(hidden, z_dim)
        self.log_var = nn.Linear(hidden, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mu(h), (0.5 * self.log_var(h)).exp()


def model(x: torch.Tensor, decoder: nn.Module, z_dim: int, beta: float = 1.0) -> None:
    """p(z) p(x | z); ``beta`` weighs the prior term (KL warm-up) during training."""
    pyro.module("decoder", decoder)
    with pyro.plate("data", x.shape[0]):
        with pyro.poutine.scale(scale=beta):
            z = pyro.sample("z", dist.Normal(x.new_zeros(z_dim), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)


def guide(x: torch.Tensor, encoder: nn.Module, beta: float = 1.0) -> None:
    """q(z | x) = N(mu(x), diag sigma(x)^2)."""
    pyro.module("encoder", encoder)
    with pyro.plate("data", x.shape[0]):
        mu, sigma = encoder(x)
        with pyro.poutine.scale(scale=beta):
            pyro.sample("z", dist.Normal(mu, sigma).to_event(1))


def main(args: argparse.Namespace) -> None:
    data = load(args.dataset, binarize="dynamic")
    pixels = data.train.images[0].numel()
    flat = data.train.images.reshape(-1, pixels)[: args.train_subset]
    validation = data.validation.images.reshape(-1, pixels)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)  # every process builds the same networks
    encoder = Encoder(pixels, args.hidden, args.z_dim)
    decoder = nn.Sequential(
        nn.Linear(args.z_dim, args.hidden), nn.Softplus(), nn.Linear(args.hidden, pixels)
    )
    history = fit(
        lambda x, beta=1.0: model(x, decoder, args.z_dim, beta),
        lambda x, beta=1.0: guide(x, encoder, beta),
        flat,
        validation=validation,
        config=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            elbo="trace",  # the sampled KL: the pair names no closed form
            progress=not args.no_progress,
        ),
        modules={"encoder": encoder, "decoder": decoder},
        out_dir=args.out,
        dynamic_binarize=True,
        distributed=launched_by_torchrun(),
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 reports; every rank holds the same parameters
    world = os.environ.get("WORLD_SIZE", "1")
    for row in history:
        print(
            f"epoch {row['epoch']:>3}: validation ELBO {row['val_elbo']:9.2f} "
            f"± {row['val_elbo_se']:.2f} nats/image (a lower bound on log p(x))"
        )
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.2))
    epochs = [row["epoch"] for row in history]
    axes.plot(epochs, [row["val_elbo"] for row in history], marker="o")
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation ELBO (nats/image)")
    axes.set_title(f"own pair on {data.name}, {world} process(es)")
    path = save(figure, Path(args.out) / "validation_elbo.png")
    print(f"trained on {world} process(es); run folder {args.out}; figure {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, digits")
    parser.add_argument("--z-dim", type=int, default=10, help="latent size")
    parser.add_argument("--hidden", type=int, default=256, help="hidden units")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (global)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--train-subset", type=int, default=None, help="first N train images")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default="runs/example05", help="run folder")
    main(parser.parse_args())
