"""Pyro's semi-supervised VAE example (M2 of Kingma et al. 2014), re-implemented as a peer for
the semi-supervised benchmark.

Pyro's ``examples/vae/ss_vae_M2.py`` (as of Pyro 1.9.1) at its argparse defaults, run with the
auxiliary loss and parallel enumeration as its example command line does:

- networks (Pyro's ``utils/custom_mlp.MLP``): ``encoder_y`` x -> [500] -> 10, softmax;
  ``encoder_z`` (x ++ onehot y) -> [500] -> (loc, exp(scale)); ``decoder`` (z ++ onehot y) ->
  [500] -> D, sigmoid; Softplus hidden layers whose weights and biases start at N(0, 0.001^2),
  output layers at PyTorch's default; inputs concatenated after broadcasting their batch
  dimensions against each other (``allow_broadcast``), so the enumerated y (10, B, 10) meets x
  (B, D) as (10, B, D + 10);
- model: z ~ N(0, I_50), y ~ OneHot(1/10), x ~ Bernoulli(decoder(z, y)) in one plate; guide:
  y ~ OneHot(encoder_y(x)) when unlabelled, z ~ N(encoder_z(x, y)); the guide under
  ``config_enumerate(..., "parallel", expand=True)`` and ``TraceEnum_ELBO(max_plate_nesting=1)``,
  so an unlabelled image's bound sums over the 10 classes exactly with one z draw per class:
  ELBO(x) = sum_y q(y|x) [log p(x|y,z_y) + log p(z_y) - log q(z_y|x,y) + log p(y)] + H[q(y|x)];
- the auxiliary loss alpha * -log q(y|x) on labelled batches (alpha = ``aux_loss_multiplier``,
  default 46) as a second ``SVI`` over ``model_classify`` / ``guide_classify`` with
  ``Trace_ELBO``; both SVIs share ONE ``pyro.optim.Adam`` (lr 0.00042, betas (0.9, 0.999));
- the example's ``run_inference_for_epoch``: labelled and unlabelled batches of 200
  interleaved, batch i labelled when i % int(N / n_labelled) == 1 until the labelled batches run
  out, every loss stepped on every batch. As in the example, the auxiliary SVI also steps on
  unlabelled batches, where its loss is 0: Pyro leaves zeroed gradients on the parameters, so
  Adam still moves them by its momentum and counts the step.

On purpose, unlike the example: grey images in [0, 1], each batch a fresh Bernoulli draw of
them (the epoch's generator); the caller's labels and labelled subset; batches sliced from
in-memory tensors (no DataLoader); no validation set, logging or visdom. Before Pyro 0.2 the
example clipped its softmax / sigmoid (eps 1e-7) and used lr 0.0003, alpha 300: pass
``epsilon_scale=1e-7, lr=3e-4, aux_loss_multiplier=300`` for that configuration.

Smoke run on scikit-learn's 8x8 digits: ``python benchmarks/pyro_ss_vae_m2.py --epochs 5``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.optim import Adam
from torch import Tensor, nn

from ppl_vae.errors import ArgumentError, DataError
from ppl_vae.rng import sub_seed

NUM_CLASSES = 10  # the example's output_size
EXAMPLE_LR = 0.00042  # the example's argparse defaults (Pyro 1.9.1)
EXAMPLE_BETA_1 = 0.9
EXAMPLE_AUX_LOSS_MULTIPLIER = 46.0
EVAL_BATCH = 1000  # images per no-grad evaluation batch


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


class _Exp(nn.Module):
    """exp, the example's positive scale head."""

    def forward(self, value: Tensor) -> Tensor:
        return torch.exp(value)


class _Clipped(nn.Module):
    """An output squashed into [eps, 1 - (n - 1) eps]: p (1 - n eps) + eps, n the number of
    outcomes (2 for a sigmoid: [eps, 1 - eps]); eps = 0 is the plain function."""

    def __init__(self, squash: Callable[[Tensor], Tensor], n: int, epsilon: float) -> None:
        super().__init__()
        self.squash, self.n, self.epsilon = squash, n, epsilon

    def forward(self, value: Tensor) -> Tensor:
        out = self.squash(value)
        if self.epsilon == 0.0:
            return out
        return out * (1.0 - self.n * self.epsilon) + self.epsilon


class _MLP(nn.Module):
    """Concatenate the inputs (batch dimensions broadcast), Softplus hidden layers initialised
    at N(0, 0.001^2), then one linear head per (size, activation or None) of ``outs``."""

    def __init__(self, in_size: int, hidden: Sequence[int], outs: Sequence[tuple]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_size
        for size in hidden:
            linear = nn.Linear(width, size)
            # the example's initialisation "for numerical stability" (hidden layers only)
            with torch.no_grad():
                linear.weight.normal_(0.0, 0.001)
                linear.bias.normal_(0.0, 0.001)
            layers += [linear, nn.Softplus()]
            width = size
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(width, size), *([act] if act is not None else []))
            for size, act in outs
        )

    def forward(self, *inputs: Tensor) -> list[Tensor]:
        # (10, B, a) with (B, b) -> (10, B, a + b): the enumerated y against a batch of x
        batch = torch.broadcast_shapes(*(t.shape[:-1] for t in inputs))
        joined = torch.cat([t.expand(*batch, t.shape[-1]) for t in inputs], dim=-1)
        hidden = self.body(joined)
        return [head(hidden) for head in self.heads]


class SSVAEM2(nn.Module):
    """The example's ``SSVAE``: networks, model/guide, and the auxiliary classification pair.

    :param input_size: pixels per image (D).
    :param z_dim: size of the style latent z.
    :param hidden: hidden layer sizes of all three networks.
    :param aux_loss_multiplier: alpha, the scale of log q(y | x) on labelled images.
    :param epsilon_scale: 0 for the example's plain softmax / sigmoid; > 0 clips their outputs
        as the pre-0.2 example's ``ClippedSoftmax`` / ``ClippedSigmoid`` did.
    """

    def __init__(
        self,
        input_size: int,
        z_dim: int,
        hidden: Sequence[int],
        aux_loss_multiplier: float,
        epsilon_scale: float = 0.0,
    ) -> None:
        super().__init__()
        self.z_dim, self.aux_loss_multiplier = z_dim, aux_loss_multiplier
        softmax = _Clipped(lambda v: F.softmax(v, dim=-1), NUM_CLASSES, epsilon_scale)
        self.encoder_y = _MLP(input_size, hidden, [(NUM_CLASSES, softmax)])
        self.encoder_z = _MLP(input_size + NUM_CLASSES, hidden, [(z_dim, None), (z_dim, _Exp())])
        sigmoid = _Clipped(torch.sigmoid, 2, epsilon_scale)
        self.decoder = _MLP(z_dim + NUM_CLASSES, hidden, [(input_size, sigmoid)])

    def model(self, xs: Tensor, ys: Tensor | None = None) -> None:
        """p(z) p(y) p(x | y, z): z ~ N(0, I), y ~ OneHot(1/10) (observed when labelled),
        x ~ Bernoulli(decoder(z, y)) per pixel."""
        pyro.module("ss_vae", self)
        batch = xs.shape[0]
        with pyro.plate("data"):
            zero = xs.new_zeros(batch, self.z_dim)
            zs = pyro.sample("z", dist.Normal(zero, torch.ones_like(zero)).to_event(1))
            prior = xs.new_full((batch, NUM_CLASSES), 1.0 / NUM_CLASSES)
            ys = pyro.sample("y", dist.OneHotCategorical(prior), obs=ys)
            (probs,) = self.decoder(zs, ys)  # (10, B, D) when y is enumerated
            # the example turns the checks off so that grey-level x can be scored too
            pyro.sample("x", dist.Bernoulli(probs, validate_args=False).to_event(1), obs=xs)

    def guide(self, xs: Tensor, ys: Tensor | None = None) -> None:
        """q(y | x) q(z | x, y): y ~ OneHot(encoder_y(x)) only when unlabelled,
        z ~ N(encoder_z(x, y))."""
        with pyro.plate("data"):
            if ys is None:
                (alpha,) = self.encoder_y(xs)
                ys = pyro.sample("y", dist.OneHotCategorical(alpha))
            loc, scale = self.encoder_z(xs, ys)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def model_classify(self, xs: Tensor, ys: Tensor | None = None) -> None:
        """The auxiliary term: alpha * log q(y | x) on labelled batches, nothing otherwise."""
        pyro.module("ss_vae", self)
        with pyro.plate("data"):
            if ys is not None:
                (alpha,) = self.encoder_y(xs)
                with pyro.poutine.scale(scale=self.aux_loss_multiplier):
                    pyro.sample("y_aux", dist.OneHotCategorical(alpha), obs=ys)

    def guide_classify(self, xs: Tensor, ys: Tensor | None = None) -> None:
        """The auxiliary pair has no latent variables: an empty guide."""

    def classify(self, xs: Tensor) -> Tensor:
        """argmax_y q(y | x), as class indices (B,)."""
        (alpha,) = self.encoder_y(xs)
        return alpha.argmax(dim=-1)


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------


def _batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device):
    """One shuffled pass: index tensors of ``batch_size`` (the last may be shorter)."""
    perm = torch.randperm(n, generator=generator, device=device)
    return list(perm.split(batch_size))


def _schedule(sup_batches: int, unsup_batches: int, interval: int) -> list[bool]:
    """The example's order of an epoch's batches: True where a labelled batch goes."""
    order, used = [], 0
    for i in range(sup_batches + unsup_batches):
        labelled = i % interval == 1 and used < sup_batches
        used += labelled
        order.append(labelled)
    return order


def _run_epoch(
    losses: Sequence[SVI],
    data: dict[str, Tensor],
    order: Sequence[bool],
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """``run_inference_for_epoch``: each batch, freshly binarised, steps every loss; labelled
    ones with their one-hot labels."""
    device = data["x_sup"].device
    sup = _batches(data["x_sup"].shape[0], batch_size, generator, device)
    unsup = _batches(data["x_unsup"].shape[0], batch_size, generator, device)
    sup_iter, unsup_iter = iter(sup), iter(unsup)
    for labelled in order:
        if labelled:
            idx = next(sup_iter)
            xs = torch.bernoulli(data["x_sup"][idx], generator=generator)
            ys = data["y_sup"][idx]
            for svi in losses:
                svi.step(xs, ys)
        else:
            xs = torch.bernoulli(data["x_unsup"][next(unsup_iter)], generator=generator)
            for svi in losses:
                svi.step(xs)


@torch.no_grad()
def _evaluate(vae: SSVAEM2, x_test: Tensor, y_test: Tensor) -> tuple[float, float]:
    """(accuracy of argmax q(y | x), ELBO in nats per image with y summed out exactly)."""
    guide = config_enumerate(vae.guide, "parallel", expand=True)
    elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    correct, loss = 0, 0.0
    for xs, ys in zip(x_test.split(EVAL_BATCH), y_test.split(EVAL_BATCH), strict=True):
        correct += int((vae.classify(xs) == ys).sum())
        loss += elbo.loss(vae.model, guide, xs)
    n = x_test.shape[0]
    return correct / n, -loss / n


def _check_inputs(
    x_train: Tensor, y_train: Tensor, labelled: Tensor, x_test: Tensor, y_test: Tensor
) -> None:
    """Shapes, dtypes and ranges the example's pipeline needs; DataError naming the tensor."""
    for name, x in (("x_train", x_train), ("x_test", x_test)):
        if x.ndim != 2 or not x.is_floating_point():
            raise DataError(f"{name} must be a float (N, D) tensor; got {x.dtype} {tuple(x.shape)}")
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise DataError(f"{name} must hold grey levels in [0, 1] (no NaN or inf)")
    if x_test.shape[1] != x_train.shape[1]:
        raise DataError(f"x_test has {x_test.shape[1]} pixels, x_train {x_train.shape[1]}")
    for name, y, x in (("y_train", y_train, x_train), ("y_test", y_test, x_test)):
        if y.shape != (x.shape[0],) or y.dtype != torch.int64:
            raise DataError(
                f"{name} must be int64 of shape ({x.shape[0]},); got {y.dtype} {tuple(y.shape)}"
            )
    if labelled.shape != (x_train.shape[0],) or labelled.dtype != torch.bool:
        raise DataError(f"labelled must be a bool mask of shape ({x_train.shape[0]},)")
    for name, y in (("y_train[labelled]", y_train[labelled]), ("y_test", y_test)):
        if y.numel() and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise DataError(f"{name} must hold classes 0..{NUM_CLASSES - 1}")
    n_sup = int(labelled.sum())
    if n_sup == 0 or n_sup == labelled.numel() or x_test.shape[0] == 0:
        raise DataError(f"need labelled, unlabelled and test images; got {n_sup} labelled of "
                        f"{labelled.numel()}, {x_test.shape[0]} test")  # fmt: skip


def _prepare(
    x_train: Tensor, y_train: Tensor, labelled: Tensor, batch_size: int
) -> tuple[dict[str, Tensor], list[bool], int]:
    """The labelled and unlabelled sets (float32, one-hot labels as the example's), the order
    of an epoch's batches and periodic_interval_batches = int(N / n_labelled)."""
    data = {
        "x_sup": x_train[labelled].float(),
        "y_sup": F.one_hot(y_train[labelled], NUM_CLASSES).float(),
        "x_unsup": x_train[~labelled].float(),  # their labels are never read
    }
    n_sup, n_unsup = data["x_sup"].shape[0], data["x_unsup"].shape[0]
    interval = x_train.shape[0] // n_sup
    sup_batches, unsup_batches = math.ceil(n_sup / batch_size), math.ceil(n_unsup / batch_size)
    order = _schedule(sup_batches, unsup_batches, interval)
    if sum(order) != sup_batches:  # the example would run out of unlabelled batches
        raise ArgumentError(
            f"{n_sup} labelled of {x_train.shape[0]} images do not fit the example's "
            f"interleaving (a labelled batch every {interval} batches from batch 1, "
            f"{sup_batches} labelled and {unsup_batches} unlabelled batches of {batch_size}): "
            "label fewer images or use a smaller batch"
        )
    return data, order, interval


def train_pyro_m2(
    x_train: Tensor,
    y_train: Tensor,
    labelled: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    *,
    epochs: int,
    seed: int = 0,
    batch_size: int = 200,
    aux_loss_multiplier: float = EXAMPLE_AUX_LOSS_MULTIPLIER,
    lr: float = EXAMPLE_LR,
    beta_1: float = EXAMPLE_BETA_1,
    z_dim: int = 50,
    hidden: int = 500,
    epsilon_scale: float = 0.0,
    max_seconds: float | None = None,
    progress: bool = False,
) -> dict:
    """Train Pyro's SS-VAE M2 example on the caller's data and evaluate it on the test set.

    Maximises sum_unlabelled ELBO(x) + sum_labelled [ELBO(x, y) + alpha log q(y | x)] by the
    example's two SVIs over one Adam; every batch is a fresh Bernoulli draw of the grey images.

    :param x_train: (N, D) grey levels in [0, 1]; the networks take D from it.
    :param y_train: (N,) int64 classes 0..9; only the ``labelled`` entries are ever read.
    :param labelled: (N,) bool, which training images are labelled.
    :param x_test: (M, D) test images used as given (the caller binarises them, or not): the
        accuracy is argmax_y q(y | x) on them and the ELBO scores them as Bernoulli data.
    :param y_test: (M,) int64 test classes.
    :param epochs: passes over the training images.
    :param seed: ``pyro.set_rng_seed(seed)`` before building the networks; epoch e shuffles and
        binarises with a ``torch.Generator`` seeded by ``ppl_vae.rng.sub_seed(seed, e)``.
    :param epsilon_scale: 0 (the example since Pyro 0.2) or the clip of the older example.
    :param max_seconds: a training-time budget: no epoch starts once the epochs so far took
        this long (so the example gets at least this much time); ``epochs`` stays the cap.
    :param progress: print one line per epoch.
    :returns: ``test_accuracy``; ``test_elbo`` (nats per test image: the negated
        ``TraceEnum_ELBO`` loss with y enumerated, one z draw per class, no-grad batches of
        1,000); ``seconds_per_epoch`` (training time of each epoch, ``perf_counter``);
        ``epochs``; ``settings`` (the hyper-parameters used).
    :raises DataError: tensors of the wrong shape, dtype or range, or no labelled / unlabelled
        image. :raises ArgumentError: a bad count, or labels too many for the example's
        interleaving (it needs int(N / n_labelled) >= 2 and room for every labelled batch).
    """
    _check_inputs(x_train, y_train, labelled, x_test, y_test)
    counts = {"epochs": epochs, "batch_size": batch_size, "z_dim": z_dim, "hidden": hidden}
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ArgumentError(f"{name} must be a positive integer; got {value!r}")
    if not 0.0 <= epsilon_scale < 1.0 / NUM_CLASSES:
        raise ArgumentError(f"epsilon_scale must be in [0, 0.1); got {epsilon_scale}")
    device = x_train.device
    data, order, interval = _prepare(x_train, y_train, labelled, batch_size)

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = SSVAEM2(x_train.shape[1], z_dim, [hidden], aux_loss_multiplier, epsilon_scale)
    vae.to(device)
    optimizer = Adam({"lr": lr, "betas": (beta_1, 0.999)})
    guide = config_enumerate(vae.guide, "parallel", expand=True)
    elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    losses = [
        SVI(vae.model, guide, optimizer, loss=elbo),
        SVI(vae.model_classify, vae.guide_classify, optimizer, loss=Trace_ELBO()),
    ]

    seconds = []
    generator = torch.Generator(device=device)
    for epoch in range(epochs):
        if max_seconds is not None and sum(seconds) >= max_seconds:
            break
        generator.manual_seed(sub_seed(seed, epoch))
        start = time.perf_counter()
        _run_epoch(losses, data, order, batch_size, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: {seconds[-1]:.2f} s", flush=True)

    accuracy, test_elbo = _evaluate(vae, x_test.float(), y_test)
    settings = {
        "example": "pyro examples/vae/ss_vae_M2.py (1.9.1), --aux-loss -enum parallel",
        "lr": lr, "betas": [beta_1, 0.999], "batch_size": batch_size,
        "z_dim": z_dim, "hidden_layers": [hidden],
        "aux_loss_multiplier": aux_loss_multiplier, "epsilon_scale": epsilon_scale,
        "elbo": "TraceEnum_ELBO(max_plate_nesting=1) + aux Trace_ELBO, one pyro.optim.Adam",
        "binarisation": "dynamic: torch.bernoulli per batch (test images used as given)",
        "n_labelled": data["x_sup"].shape[0], "n_unlabelled": data["x_unsup"].shape[0],
        "periodic_interval_batches": interval, "seed": seed, "device": str(device),
    }  # fmt: skip
    return {
        "test_accuracy": accuracy,
        "test_elbo": test_elbo,
        "seconds_per_epoch": seconds,
        "epochs": len(seconds),
        "settings": settings,
    }


# ---------------------------------------------------------------------------------------------
# Smoke run on scikit-learn's digits
# ---------------------------------------------------------------------------------------------


def digits_data(
    labelled_per_class: int = 10, test_size: int = 300, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1,797 8x8 digits as (x_train, y_train, labelled, x_test, y_test): grey
    levels x / 16, the last ``test_size`` images for testing (binarised once with a generator
    seeded by ``seed``), ``labelled_per_class`` training images of each class labelled."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    x_train, y_train = x[:-test_size], y[:-test_size]
    generator = torch.Generator().manual_seed(seed)
    x_test = torch.bernoulli(x[-test_size:], generator=generator)
    labelled = torch.zeros(len(y_train), dtype=torch.bool)
    order = torch.randperm(len(y_train), generator=generator)
    for c in range(NUM_CLASSES):
        labelled[order[y_train[order] == c][:labelled_per_class]] = True
    return x_train, y_train, labelled, x_test, y[-test_size:]


def main(args: argparse.Namespace) -> dict:
    """Train on the digits with the flags' settings and print the result as JSON."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    flags = ("epochs", "seed", "batch_size", "aux_loss_multiplier", "lr", "beta_1", "z_dim")
    result = train_pyro_m2(
        *digits_data(args.labelled_per_class, seed=args.seed),
        **{name: getattr(args, name) for name in (*flags, "hidden", "epsilon_scale")},
        progress=True,
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labelled-per-class", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--aux-loss-multiplier", type=float, default=EXAMPLE_AUX_LOSS_MULTIPLIER)
    parser.add_argument("--lr", type=float, default=EXAMPLE_LR)
    parser.add_argument("--beta-1", type=float, default=EXAMPLE_BETA_1)
    parser.add_argument("--z-dim", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=500)
    parser.add_argument("--epsilon-scale", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    main(parser.parse_args())
