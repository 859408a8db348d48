"""Seconds per epoch of VAE training on Fashion-MNIST, ppl-vae against hand-written PyTorch.

Every row trains a VAE with a Bernoulli likelihood on dynamically binarised Fashion-MNIST (a
fresh binary draw of each grey image per batch) over the 60,000 training images (the train and
validation splits of ``ppl_vae.data.datasets`` together: ``validation_size=0``), with Adam at
1e-3. The network is the 784-400-20 MLP with ReLU at batch 128 unless a row says otherwise. Rows:

1. ``gemm``: the compute bound, the matrix products of one step alone (forward and backward
   of encoder and decoder, timed with ``torch.mm`` on the exact shapes), times steps per epoch;
2. ``torch``: hand-written PyTorch, the baseline (ratio 1.00): data in memory, batches by slicing
   a permutation, ``ppl_vae.vae.networks`` encoder and decoder, BCE-with-logits (sum) plus the
   closed-form KL, ``torch.optim.Adam``;
3. ``examples``: the pipeline of pytorch/examples' ``vae/main.py``: a torchvision-style dataset
   that turns each uint8 image into a PIL image and a tensor per item, a DataLoader (batch 128,
   shuffled), the fc1/fc21/fc22/fc3/fc4 model, sigmoid + BCE (sum) + KLD;
4. ``pyro-example``: the pipeline of Pyro's ``examples/vae/vae.py``: the whole set converted to
   floats once, a DataLoader indexing it per item (batch 256), Softplus encoder/decoder with 400
   hidden units and z of 50, SVI with Trace_ELBO and ``pyro.optim.Adam``; ``pyro-example-128``
   is the same pipeline at batch 128 with z of 20;
5. ``svi``: Pyro SVI + Trace_ELBO with the ppl-vae model/guide pair, batches in memory;
6. ``svi-meanfield``: the same with TraceMeanField_ELBO (closed-form KL);
7. ``svi-jit``: the same with JitTrace_ELBO (drops the last, partial batch);
8. ``fit``: ``ppl_vae.fit`` with its default ELBO and engine, one call per epoch, the
   epoch time read from its history; ``fit-val`` validates on the 10,000 test images after
   every epoch and reports the epoch time with validation; ``fit-jit`` uses
   ``elbo="jit-meanfield"`` with the data checked once, as ``ppl-vae train --elbo jit-meanfield``
   does (two traces per call: batch 128 and the last, smaller batch);
9. ``compile``: the hand-written loss under ``torch.compile`` (skipped when compiling takes
   more than 60 s);
10. ``torch-bf16`` and ``fit-bf16``: mixed precision, the hand-written loop's forward under
   ``torch.autocast(dtype=bfloat16)`` and ``fit`` with ``precision="bfloat16"`` (data checked
   once): matrix products with bfloat16 operands, everything else float32.

Rows run interleaved, one epoch each in turn (the order rotating every round), so that load
from other processes falls on every row alike; the first round is a warm-up and is not counted.
The ratio column divides a row's median by the baseline's; the paired ratio is the median over
rounds of the per-round ratio; on the CPU the CPU-time ratio (this process's CPU seconds, which
leave out the time spent waiting for a core) is the steadiest of the three. torch runs one
thread unless ``--threads`` says otherwise. The test ELBO (nats per image) is single-sample,
with the same draws for every row, on the 10,000 test images binarised once.

``--rows extra`` adds what-if rows for ``fit`` (per-step checks off, Pyro's validation off, the
Jit Trace_ELBO) and the baseline with fused Adam. The particle sweep times ``fit`` with
``num_particles`` = K (vectorised) on a subset of the training set and compares each K with
K = 1 against (1 + K) / 2; a hand-written vectorised loop gives the same ratios for reference.
``--profile ROW`` profiles one epoch of a row instead, and ``--stacks FILE`` summarises a
py-spy recording (``py-spy record --format raw``) per training step.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
import torch.nn.functional as F
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BenchData,
    Gemm,
    Summary,
    collapsed_stack_summary,
    device_generator,
    hardware_lines,
    linear_gemms,
    load_average,
    load_data,
    markdown_table,
    memory_batches,
    resolve_device,
    synchronize,
    time_gemm,
    timed,
)
from numpyro_vae import NumPyroRow
from pythae_vae import PythaeRow

from ppl_vae.guides import vae as vae_guide
from ppl_vae.models import vae as vae_model
from ppl_vae.vae import VAEConfig, build_vae, make_networks

X_DIM, HIDDEN, Z_DIM, BATCH, LR = 784, 400, 20, 128, 1e-3
IMAGE_SHAPE = (1, 28, 28)
COMPILE_LIMIT_S = 60.0


# ---------------------------------------------------------------------------------------------
# The test-set ELBO, the same computation for every row
# ---------------------------------------------------------------------------------------------


def bernoulli_logits_loglik(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x | z) summed over pixels, from logits: shape ``logits.shape[:-1]``."""
    bce = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    return -bce.sum(-1)


def bernoulli_probs_loglik(probs: Tensor, x: Tensor) -> Tensor:
    """log p(x | z) summed over pixels, from probabilities (torch's BCE clamps log at -100)."""
    return -F.binary_cross_entropy(probs, x.expand_as(probs), reduction="none").sum(-1)


def test_set_elbo(
    encode: Callable[[Tensor], tuple[Tensor, Tensor]],
    log_lik: Callable[[Tensor, Tensor], Tensor],
    images: Tensor,
    seed: int = 0,
    batch_size: int = 1000,
) -> float:
    """Single-sample ELBO per image: log p(x | z) - KL(q(z | x) || N(0, I)), z ~ q once, the
    draws fixed by ``seed``; ``encode`` gives the mean and standard deviation of q."""
    total = 0.0
    with torch.no_grad():
        gen = device_generator(images.device, seed)
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size]
            mu, std = encode(x)
            eps = torch.randn(mu.shape, generator=gen, device=mu.device)
            kl = 0.5 * (mu.pow(2) + std.pow(2) - 1.0 - 2.0 * std.log()).sum(-1)
            total += float((log_lik(mu + std * eps, x) - kl).sum())
    return total / images.shape[0]


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


class Row:
    """One configuration: ``setup`` builds it, ``epoch`` trains one epoch and returns its
    seconds (and, optionally, named extra timings), ``test_elbo`` evaluates it."""

    key = ""
    label = ""
    note = ""
    skipped: str | None = None  # why the row was dropped after setup

    def setup(self, data: BenchData, device: torch.device, seed: int) -> None:
        raise NotImplementedError

    def enter(self) -> None:
        """Make this row's state current (Pyro rows swap in their param store)."""

    def leave(self) -> None:
        """Put this row's state aside."""

    def epoch(self, index: int) -> dict[str, float]:
        raise NotImplementedError

    def test_elbo(self, images: Tensor) -> float:
        raise NotImplementedError


def _timed_epoch(fn: Callable[[], object], device: torch.device) -> dict[str, float]:
    return timed(fn, device)[0]


class GemmBound(Row):
    key, label = "gemm", "compute bound: the step's GEMMs alone"

    def setup(self, data: BenchData, device: torch.device, seed: int) -> None:
        self.device = device
        self.steps = data.train.shape[0] / BATCH  # a smaller last batch counts pro rata
        self.gemms = step_gemms(BATCH)
        flops = sum(g.flops for g in self.gemms)
        self.note = f"{len(self.gemms)} products, {flops / 1e6:.0f} MFLOP per step of {BATCH}"

    def epoch(self, index: int) -> dict[str, float]:
        per_call = [time_gemm(g, self.device, min_seconds=0.02, blocks=3) for g in self.gemms]
        return {
            "seconds": sum(wall for wall, _ in per_call) * self.steps,
            "cpu": sum(cpu for _, cpu in per_call) * self.steps,
        }

    def test_elbo(self, images: Tensor) -> float:
        return math.nan


def step_gemms(batch: int) -> list[Gemm]:
    """The matrix products of one training step of the 784-400-20 MLP VAE: the encoder's first
    layer needs no input gradient (the data), every other layer does."""
    return [
        *linear_gemms("enc hidden", batch, X_DIM, HIDDEN, input_grad=False),
        *linear_gemms("enc head", batch, HIDDEN, 2 * Z_DIM, input_grad=True),
        *linear_gemms("dec hidden", batch, Z_DIM, HIDDEN, input_grad=True),
        *linear_gemms("dec out", batch, HIDDEN, X_DIM, input_grad=True),
    ]


def handwritten_loss(encoder: nn.Module, decoder: nn.Module, x: Tensor) -> Tensor:
    """-ELBO summed over the batch: BCE with logits (sum) + closed-form KL, one z per image."""
    mu, log_var = encoder(x)
    std = torch.exp(0.5 * log_var)
    z = mu + std * torch.randn_like(std)
    rec = F.binary_cross_entropy_with_logits(decoder(z), x, reduction="sum")
    kl = -0.5 * torch.sum(1.0 + log_var - mu.pow(2) - log_var.exp())
    return rec + kl


class MemoryRow(Row):
    """Networks from ``ppl_vae.vae.networks`` (the same initial weights in every such row) and
    batches in memory."""

    drop_last = False

    def build(self, device: torch.device, seed: int) -> None:
        torch.manual_seed(seed)
        self.encoder, self.decoder = make_networks(IMAGE_SHAPE, Z_DIM, (HIDDEN,))
        self.encoder.to(device)
        self.decoder.to(device)
        self.data = None
        self.device = device
        self.gen = device_generator(device, seed + 1)

    def batches(self) -> Iterator[Tensor]:
        return memory_batches(self.data.train, BATCH, self.gen, drop_last=self.drop_last)

    def test_elbo(self, images: Tensor) -> float:
        def encode(x: Tensor) -> tuple[Tensor, Tensor]:
            mu, log_var = self.encoder(x)
            return mu, torch.exp(0.5 * log_var)

        return test_set_elbo(
            encode, lambda z, x: bernoulli_logits_loglik(self.decoder(z), x), images
        )


class TorchBaseline(MemoryRow):
    """The hand-written loop; ``fused`` selects torch's fused Adam kernel, ``flush`` the float
    mode ``fit`` trains in (subnormals read as zero) around each epoch (extra rows)."""

    def __init__(self, fused: bool = False, autocast: bool = False, flush: bool = False) -> None:
        self.fused, self.autocast, self.flush = fused, autocast, flush
        if flush:
            self.key, self.label = "torch-ftz", "hand-written PyTorch, subnormals flushed"
            self.note = "the baseline in fit's default float mode (flush_subnormals)"
        elif autocast:
            self.key, self.label = "torch-bf16", "hand-written PyTorch, bfloat16 autocast"
            self.note = "the baseline's forward under torch.autocast(bfloat16)"
        elif fused:
            self.key, self.label = "torch-fused", "hand-written PyTorch, Adam(fused=True)"
            self.note = "the baseline with one fused Adam kernel"
        else:
            self.key, self.label = "torch", "hand-written PyTorch, in memory (baseline)"
            self.note = "torch.optim.Adam defaults (single-tensor on CPU); loss read once per epoch"

    def setup(self, data: BenchData, device: torch.device, seed: int) -> None:
        self.build(device, seed)
        self.data = data
        params = [*self.encoder.parameters(), *self.decoder.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=LR, fused=True if self.fused else None)
        self.loss_fn = functools.partial(handwritten_loss, self.encoder, self.decoder)

    def epoch(self, index: int) -> dict[str, float]:
        from ppl_vae.training.subnormals import flushing_subnormals

        def run() -> None:
            total = torch.zeros((), device=self.device)
            for x in self.batches():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    loss = self.loss_fn(x)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += loss.detach()
            self.train_loss = float(total)

        with flushing_subnormals(self.flush):
            return _timed_epoch(run, self.device)


class CompiledBaseline(TorchBaseline):
    def __init__(self) -> None:
        super().__init__()
        self.key, self.label = "compile", "hand-written PyTorch, torch.compile'd loss"

    def setup(self, data: BenchData, device: torch.device, seed: int) -> None:
        super().setup(data, device, seed)
        # dynamic=False: one static graph per batch shape (128 and the last, smaller batch).
        compiled = torch.compile(self.loss_fn, dynamic=False)
        shapes = sorted({BATCH, data.train.shape[0] % BATCH} - {0}, reverse=True)
        seconds = []
        try:
            for rows in shapes:
                x = torch.bernoulli(data.train[:rows])
                synchronize(device)
                t0 = time.perf_counter()
                compiled(x).backward()
                synchronize(device)
                seconds.append(time.perf_counter() - t0)
                if sum(seconds) > COMPILE_LIMIT_S:
                    break
        except Exception as exc:  # a missing compiler toolchain, an unsupported backend
            self.skipped = f"torch.compile failed: {type(exc).__name__}: {exc}"[:200]
            return
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        self.compile_seconds = seconds
        if sum(seconds) > COMPILE_LIMIT_S:
            self.skipped = f"first compile took {sum(seconds):.0f} s (> {COMPILE_LIMIT_S:.0f} s)"
        self.note = "first compile " + " + ".join(f"{s:.1f} s" for s in seconds)
        self.note += f" (batch shapes {', '.join(map(str, shapes))}), dynamic=False"
        self.loss_fn = compiled


class ExamplesDataset(Dataset):
    """torchvision's MNIST dataset as pytorch/examples uses it: each item is a uint8 image
    turned into a PIL image, then into a (1, 28, 28) float tensor by ``to_tensor``."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image
        from torchvision.transforms.functional import to_tensor

        image = Image.fromarray(self.images[index].numpy())
        return to_tensor(image), int(self.labels[index])


class ExamplesVAE(nn.Module):
    """The model of pytorch/examples' ``vae/main.py``: fc1, fc21/fc22, fc3, fc4, ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(X_DIM, HIDDEN)
        self.fc21 = nn.Linear(HIDDEN, Z_DIM)
        self.fc22 = nn.Linear(HIDDEN, Z_DIM)
        self.fc3 = nn.Linear(Z_DIM, HIDDEN)
        self.fc4 = nn.Linear(HIDDEN, X_DIM)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, log_var = self.encode(x.view(-1, X_DIM))
        std = torch.exp(0.5 * log_var)
        z = mu + torch.randn_like(std) * std
        return self.decode(z), mu, log_var


class ExamplesPipeline(Row):
    key, label = "examples", "pytorch/examples vae/main.py pipeline"
    note = "per-item PIL + to_tensor in a DataLoader (num_workers 0 on CPU), loss.item() per step"

    def setup(self, data: BenchData, device: torch.device, seed: int) -> None:
        torch.manual_seed(seed)
        self.device = device
        self.model = ExamplesVAE().to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        loader_kwargs = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
        dataset = ExamplesDataset(data.train_uint8, data.train_labels)
        self.loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, **loader_kwargs)

    def epoch(self, index: int) -> dict[str, float]:
        def run() -> None:
            self.model.train()
            train_loss = 0.0
            for data, _ in self.loader:
                data = torch.bernoulli(data.to(self.device))  # dynamic binarisation
                self.optimizer.zero_grad()
                recon, mu, log_var = self.model(data)
                bce = F.binary_cross_entropy(recon, data.view(-1, X_DIM), reduction="sum")
                kld = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp())
                loss = bce + kld
                loss.backward()
                train_loss += loss.item()
                self.optimizer.step()

        return _timed_epoch(run, self.device)

    def test_elbo(self, images: Tensor) -> float:
        def encode(x: Tensor) -> tuple[Tensor, Tensor]:
            mu, log_var = self.model.encode(x)
            return mu, torch.exp(0.5 * log_var)

        return test_set_elbo(
            encode, lambda z, x: bernoulli_probs_loglik(self.model.decode(z), x), images
        )


class PyroRow(Row):
    """A row that trains through Pyro's global param store: it keeps its own store state and
    swaps it in around each of its epochs, so that rows can interleave."""

    def enter(self) -> None:
        store = pyro.get_param_store()
        store.clear()
        if getattr(self, "_state", None) is not None:
            store.set_state(self._state)

    def leave(self) -> None:
        store = pyro.get_param_store()
        self._state = store.get_state()
        store.clear()


class PyroExampleEncoder(nn.Module):
    """The encoder of Pyro's VAE example: Softplus hidden layer, scale = exp(fc22)."""

    def __init__(self, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(X_DIM, hidden)
        self.fc21 = nn.Linear(hidden, z_dim)
        self.fc22 = nn.Linear(hidden, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.softplus(self.fc1(x.reshape(-1, X_DIM)))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class PyroExampleDecoder(nn.Module):
    """The decoder of Pyro's VAE example: Softplus hidden layer, sigmoid output."""

    def __init__(self, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden)
        self.fc21 = nn.Linear(hidden, X_DIM)
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z: Tensor) -> Tensor:
        return self.sigmoid(self.fc21(self.softplus(self.fc1(z))))


class CachedImages(Dataset):
    """The whole training set converted to floats in [0, 1] and one-hot labels once, indexed
    per item by the DataLoader (what Pyro's example's cached MNIST dataset does)."""

    def __init__(self, images: Tensor, labels: Tensor, device: torch.device) -> None:
        self.images = (images.float() * (1.0 / 255)).reshape(images.shape[0], -1).to(device)
        self.labels = F.one_hot(labels, 10).float().to(device)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]


class PyroExample(PyroRow):
    """Pyro's ``examples/vae/vae.py`` pipeline, at its defaults (batch 256, z 50) or not."""

    def __init__(self, batch_size: int = 256, z_dim: int = 50) -> None:
        self.batch_size, self.z_dim = batch_size, z_dim
        if (batch_size, z_dim) == (256, 50):
            self.key, self.label = "pyro-example", "Pyro examples/vae/vae.py pipeline"
            self.note = "its defaults: batch 256, z 50, Softplus; DataLoader per-item indexing"
        else:
            self.key = f"pyro-example-{batch_size}"
            self.label = f"Pyro examples/vae/vae.py pipeline, batch {batch_size}, z {z_dim}"
            self.note = "like-for-like sizes; Softplus, sigmoid + Bernoulli(probs)"

    def setup(self, data: BenchData, device: torch.device, seed: int) -> None:
        torch.manual_seed(seed)
        self.device = device
        self.encoder = PyroExampleEncoder(self.z_dim, HIDDEN).to(device)
        self.decoder = PyroExampleDecoder(self.z_dim, HIDDEN).to(device)
        dataset = CachedImages(data.train_uint8, data.train_labels, device)
        self.loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=True)
        self.enter()
        self.svi = SVI(self.model, self.guide, pyro.optim.Adam({"lr": LR}), loss=Trace_ELBO())
        self.leave()

    def model(self, x: Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample(
                "obs",
                dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                obs=x.reshape(-1, X_DIM),
            )

    def guide(self, x: Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))

    def epoch(self, index: int) -> dict[str, float]:
        def run() -> None:
            epoch_loss = 0.0
            for x, _ in self.loader:
                x = torch.bernoulli(x.to(self.device))  # dynamic binarisation
                epoch_loss += self.svi.step(x)

        return _timed_epoch(run, self.device)

    def test_elbo(self, images: Tensor) -> float:
        return test_set_elbo(
            self.encoder, lambda z, x: bernoulli_probs_loglik(self.decoder(z), x), images
        )


class PyroSVI(PyroRow, MemoryRow):
    """``SVI.step`` on the ppl-vae model/guide pair, batches in memory."""

    def __init__(self, key: str, elbo: type, label: str) -> None:
        self.key, self.elbo_cls, self.label = key, elbo, label
        self.drop_last = elbo is JitTrace_ELBO
        self.note = "check_data=False, pyro.optim.Adam, loss read every step (SVI.step)"
        if self.drop_last:
            self.note += "; drops the last partial batch"

    def setup(self, data: BenchData, device: torch.device, seed: int) -> None:
        self.build(device, seed)
        self.data = data
        self.model = functools.partial(vae_model.model, decoder=self.decoder)
        self.guide = functools.partial(vae_guide.guide, encoder=self.encoder)
        kwargs = {"ignore_jit_warnings": True} if self.elbo_cls is JitTrace_ELBO else {}
        self.enter()
        self.svi = SVI(self.model, self.guide, pyro.optim.Adam({"lr": LR}), self.elbo_cls(**kwargs))
        self.leave()

    def epoch(self, index: int) -> dict[str, float]:
        def run() -> None:
            total = 0.0
            for x in self.batches():
                total += self.svi.step(x, check_data=False)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace's
            return _timed_epoch(run, self.device)


class FitRow(PyroRow, MemoryRow):
    """``ppl_vae.fit`` on the VAE of ``ppl_vae.vae.config.build_vae``, one call per
    epoch (so that rows interleave; each call starts a new Adam), timed by its history."""

    def __init__(
        self,
        key: str,
        label: str,
        note: str,
        *,
        validation: bool = False,
        elbo: str | None = None,
        step_kwargs: dict | None = None,
        pyro_validation: bool = True,
        precision: str | None = None,
    ) -> None:
        self.key, self.label, self.note = key, label, note
        self.precision = precision
        self.validation, self.elbo = validation, elbo
        self.step_kwargs, self.pyro_validation = step_kwargs, pyro_validation

    def setup(self, data: BenchData, device: torch.device, seed: int) -> None:
        self.device = device
        self.data = data
        torch.manual_seed(seed)
        self.vae = build_vae(VAEConfig(image_shape=IMAGE_SHAPE))
        self.encoder, self.decoder = self.vae.encoder, self.vae.decoder
        self.seed = seed

    def _fit(self, images: Tensor, seed: int, validation: Tensor | None) -> dict:
        from ppl_vae.training import TrainConfig, fit

        extra = {} if self.elbo is None else {"elbo": self.elbo}
        if self.precision is not None:
            extra["precision"] = self.precision
        config = TrainConfig(
            epochs=1, batch_size=BATCH, lr=LR, seed=seed, device=str(self.device), progress=False
        )
        config = TrainConfig.from_dict({**config.to_dict(), **extra})
        pyro.enable_validation(self.pyro_validation)
        try:
            history = fit(
                self.vae.model,
                self.vae.guide,
                images,
                config=config,
                validation=validation,
                modules=self.vae.modules,
                dynamic_binarize=True,
                step_kwargs=self.step_kwargs,
            )
        finally:
            pyro.enable_validation(True)
        return history[-1]

    def epoch(self, index: int) -> dict[str, float]:
        result = {}
        if self.elbo is not None and self.elbo.startswith("jit"):
            # fit builds its ELBO per call, so every call traces anew: time a one-step call
            # (trace + one step) to show what a single multi-epoch fit would pay only once.
            result["probe"] = self._fit(self.data.train[:BATCH], self.seed, None)["train_seconds"]
        validation = self.data.test if self.validation else None
        clocks, row = timed(
            lambda: self._fit(self.data.train, self.seed + index, validation), self.device
        )  # a new batch order each call
        seconds = row["seconds"] if self.validation else row["train_seconds"]
        return {
            **result,
            "seconds": seconds,
            "cpu": clocks["cpu"],  # the whole call: its set-up (~0.01 s) included
            "train_seconds": row["train_seconds"],
            "validation_seconds": row["seconds"] - row["train_seconds"],
            "call_overhead": clocks["seconds"] - row["seconds"],
        }


class LoopRow(PyroRow, MemoryRow):
    """``fit``'s own loop (engine, batch order, NaN guard; no files) built once and run one
    epoch per round, as one many-epoch ``fit`` call runs it, so that the compiled engine's
    graphs are captured once (in the warm-up round, timed there as its first compile). Each
    epoch runs in ``fit``'s floating-point mode (subnormals flushed by default), set around
    the epoch only, so that the interleaved rows keep theirs."""

    def __init__(self, key: str, label: str, note: str, engine: str) -> None:
        self.key, self.label, self.note, self.engine_name = key, label, note, engine

    def setup(self, data: BenchData, device: torch.device, seed: int) -> None:
        from ppl_vae.training import TrainConfig, run_configuration
        from ppl_vae.training.files import RunFiles
        from ppl_vae.training.loop import TrainingLoop
        from ppl_vae.training.signals import StopFlag

        self.device, self.data = device, data
        torch.manual_seed(seed)
        self.vae = build_vae(VAEConfig(image_shape=IMAGE_SHAPE))
        self.encoder, self.decoder = self.vae.encoder, self.vae.decoder
        config = TrainConfig(
            epochs=10_000,
            batch_size=BATCH,
            lr=LR,
            seed=seed,
            device=str(device),
            progress=False,
            engine=self.engine_name,
        )
        files = RunFiles(None, configuration=run_configuration(config), modules=self.vae.modules)
        self.enter()
        self.loop = TrainingLoop(
            self.vae.model,
            self.vae.guide,
            data.train,
            None,
            config=config,
            modules=self.vae.modules,
            files=files,
            device=device,
            dynamic_binarize=True,
            kwargs={"check_data": False},  # the data are checked once, as the CLI does
            beta_schedule=None,
            stop=StopFlag(),
        )
        self.flush_subnormals = config.flush_subnormals
        self.leave()

    def epoch(self, index: int) -> dict[str, float]:
        from ppl_vae.training.progress import Progress
        from ppl_vae.training.subnormals import flushing_subnormals

        progress = Progress(total=1, initial=0, enabled=False, label="elbo", last_row=None)
        with flushing_subnormals(self.flush_subnormals):
            clocks, row = timed(lambda: self.loop._epoch(index + 1, progress), self.device)
        compiled = self.loop.engine.compiled
        if compiled is not None and index == 0:
            self.first_compile = compiled.setup_seconds  # capture + inductor, both shapes
        return {"seconds": row["train_seconds"], "cpu": clocks["cpu"]}


def all_rows() -> list[Row]:
    return [
        GemmBound(),
        TorchBaseline(),
        ExamplesPipeline(),
        PyroExample(256, 50),
        PyroExample(BATCH, Z_DIM),
        PyroSVI("svi", Trace_ELBO, "Pyro SVI + Trace_ELBO, in memory"),
        PyroSVI("svi-meanfield", TraceMeanField_ELBO, "Pyro SVI + TraceMeanField_ELBO, in memory"),
        PyroSVI("svi-jit", JitTrace_ELBO, "Pyro SVI + JitTrace_ELBO, in memory"),
        FitRow("fit", "ppl_vae.fit (defaults)", "default elbo, engine, step kwargs"),
        LoopRow(
            "fit-loop",
            "ppl_vae.fit's loop, kept across epochs",
            "data checked once (as the CLI); the engine built once",
            "eager",
        ),
        LoopRow(
            "fit-compiled",
            "ppl_vae.fit's loop, engine=compiled",
            "the same loop; the step captured once per batch shape (128 and the last 96) "
            "and replayed through inductor",
            "compiled",
        ),
        NumPyroRow(),
        PythaeRow(),
        FitRow(
            "fit-val",
            "ppl_vae.fit, validation on",
            "epoch incl. validation on the 10,000 test images",
            validation=True,
        ),
        FitRow(
            "fit-jit",
            "ppl_vae.fit, elbo=jit-meanfield",
            "as `ppl-vae train --elbo jit-meanfield` calls it (data checked once); "
            "two traces per call (batch 128 and the last 96)",
            elbo="jit-meanfield",
            step_kwargs={"check_data": False},
        ),
        CompiledBaseline(),
        TorchBaseline(autocast=True),
        FitRow(
            "fit-bf16",
            "ppl_vae.fit, precision=bfloat16",
            "mixed precision (torch.autocast); data checked once, as `ppl-vae train "
            "--precision bfloat16` runs it",
            precision="bfloat16",
            step_kwargs={"check_data": False},
        ),
    ]


def extra_rows() -> list[Row]:
    """Rows run only when asked for (``--rows extra`` or by name): what-ifs for fit."""
    lean = {"check_data": False}
    return [
        TorchBaseline(fused=True),
        FitRow(
            "fit-nocheck",
            "fit, step_kwargs check_data=False",
            "data validated once instead of per step",
            step_kwargs=lean,
        ),
        FitRow(
            "fit-lean",
            "fit, check_data=False, Pyro validation off",
            "pyro.enable_validation(False) around the call",
            step_kwargs=lean,
            pyro_validation=False,
        ),
        FitRow(
            "fit-jit-trace",
            "fit, elbo=jit-trace, check_data=False",
            "two traces per call (batch 128 and the last 96)",
            elbo="jit-trace",
            step_kwargs=lean,
        ),
        TorchBaseline(flush=True),
    ]


ROW_KEYS = [row.key for row in all_rows()]
EXTRA_KEYS = [row.key for row in extra_rows()]


# ---------------------------------------------------------------------------------------------
# The interleaved run
# ---------------------------------------------------------------------------------------------


def run_rows(
    rows: list[Row], data: BenchData, device: torch.device, epochs: int, warmup: int, seed: int
) -> dict[str, list[dict[str, float]]]:
    """Set every row up, then ``warmup + epochs`` rounds of one epoch per row; the first
    ``warmup`` rounds are dropped. Returns each row's per-epoch timings."""
    for row in rows:
        t0 = time.perf_counter()
        row.setup(data, device, seed)
        status = (
            f"skipped: {row.skipped}"
            if row.skipped
            else f"ready in {time.perf_counter() - t0:.1f} s"
        )
        print(f"  setup {row.key}: {status}", flush=True)
    active = [row for row in rows if row.skipped is None]
    times: dict[str, list[dict[str, float]]] = {row.key: [] for row in active}
    for rnd in range(warmup + epochs):
        shift = rnd % len(active)
        order = active[shift:] + active[:shift]
        done = []
        for row in order:
            row.enter()
            try:
                result = row.epoch(rnd)
            finally:
                row.leave()
            if rnd >= warmup:
                times[row.key].append(result)
            done.append(f"{row.key} {result['seconds']:.2f}")
        tag = "warm-up" if rnd < warmup else f"epoch {rnd - warmup + 1}/{epochs}"
        print(f"  round {rnd + 1} ({tag}, load {load_average()}): " + ", ".join(done), flush=True)
    return times


def results_table(
    rows: list[Row],
    times: dict[str, list[dict[str, float]]],
    elbos: dict[str, float],
    cpu: bool,
) -> str:
    """The table: wall-clock median, range, ratio of medians and paired ratio to the baseline
    (``torch``), and with ``cpu`` the same ratio by CPU time."""
    base = times.get("torch")

    def ratios(key: str, clock: str) -> tuple[float, float]:
        values = [t[clock] for t in times[key]]
        if not base:
            return math.nan, math.nan
        reference = [t[clock] for t in base]
        paired = statistics.median(a / b for a, b in zip(values, reference, strict=True))
        return statistics.median(values) / statistics.median(reference), paired

    table = []
    for number, row in zip(_row_numbers(rows), rows, strict=True):
        if row.key not in times:
            table.append(
                [number, row.label, "skipped", "", "", ""] + ["", ""] * cpu + [row.skipped]
            )
            continue
        s = Summary.of([t["seconds"] for t in times[row.key]])
        ratio, paired = ratios(row.key, "seconds")
        cells = [f"{s.median:.2f}", f"{s.low:.2f}-{s.high:.2f}", f"{ratio:.2f}", f"{paired:.2f}"]
        if cpu:
            cpu_median = statistics.median(t["cpu"] for t in times[row.key])
            cells += [f"{cpu_median:.2f}", f"{ratios(row.key, 'cpu')[0]:.2f}"]
        elbo = elbos.get(row.key, math.nan)
        elbo_text = "n/a" if math.isnan(elbo) else f"{elbo:.1f}"
        table.append([number, row.label, *cells, elbo_text, row.note])
    headers = ["#", "configuration", "s/epoch", "min-max", "ratio", "paired"]
    headers += ["CPU s/epoch", "CPU ratio"] * cpu + ["test ELBO", "notes"]
    return markdown_table(headers, table)


def fit_breakdown(key: str, results: list[dict[str, float]]) -> str:
    """Where a fit row's epoch goes: the training loop, validation, the set-up of each call."""

    def median(name: str) -> float:
        return statistics.median(r[name] for r in results)

    text = (
        f"- {key}: training loop {median('train_seconds'):.2f} s, validation "
        f"{median('validation_seconds'):.2f} s, set-up of the call {median('call_overhead'):.2f} s"
    )
    if "probe" in results[0]:
        text += f", a one-step call (trace + 1 step) {median('probe'):.2f} s"
    return text + " (medians per epoch)"


def _row_numbers(rows: list[Row]) -> list[str]:
    numbers = {
        "gemm": "1",
        "torch": "2",
        "examples": "3",
        "pyro-example": "4",
        "svi": "5",
        "svi-meanfield": "6",
        "svi-jit": "7",
        "fit": "8",
        "fit-val": "8b",
        "fit-jit": "8c",
        "fit-loop": "8d",
        "fit-compiled": "8e",
        "numpyro": "11",
        "pythae": "12",
        "compile": "9",
        "torch-bf16": "10",
        "fit-bf16": "10b",
    }
    extras = {key: f"x{i}" for i, key in enumerate(EXTRA_KEYS, 1)}
    return [numbers.get(row.key, extras.get(row.key, "4b")) for row in rows]


# ---------------------------------------------------------------------------------------------
# Particles
# ---------------------------------------------------------------------------------------------


def particle_sweep(
    data: BenchData, device: torch.device, ks: list[int], n_images: int, reps: int, seed: int
) -> str:
    """Seconds per ``n_images`` (scaled to an epoch) of ``fit`` with ``num_particles`` = K,
    vectorised, and of a hand-written vectorised loop, interleaved over K; ratios to K = 1.
    On the CPU the times are CPU seconds of the whole fit call, else wall-clock seconds."""
    from ppl_vae.training import TrainConfig, fit

    use_cpu_time = device.type == "cpu"  # steadier on a shared machine (see timed())

    images = data.train[:n_images]
    scale = data.train.shape[0] / images.shape[0]
    store = pyro.get_param_store()
    fits, hands = {}, {}
    for k in ks:
        torch.manual_seed(seed)
        store.clear()
        fits[k] = [build_vae(VAEConfig(image_shape=IMAGE_SHAPE)), None]
        torch.manual_seed(seed)
        enc, dec = make_networks(IMAGE_SHAPE, Z_DIM, (HIDDEN,))
        enc.to(device)
        dec.to(device)
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=LR)
        hands[k] = (enc, dec, opt, device_generator(device, seed + k))
    store.clear()

    def fit_once(k: int, rnd: int) -> float:
        vae, state = fits[k]
        store.clear()
        if state is not None:
            store.set_state(state)
        config = TrainConfig(
            epochs=1,
            batch_size=BATCH,
            lr=LR,
            num_particles=k,
            seed=seed + rnd,
            device=str(device),
            progress=False,
        )
        clocks, history = timed(
            lambda: fit(
                vae.model,
                vae.guide,
                images,
                config=config,
                modules=vae.modules,
                dynamic_binarize=True,
            ),
            device,
        )
        fits[k][1] = store.get_state()
        store.clear()
        return clocks["cpu"] if use_cpu_time else history[-1]["train_seconds"]

    def hand_once(k: int) -> float:
        enc, dec, opt, gen = hands[k]

        def run() -> None:
            for x in memory_batches(images, BATCH, gen):
                mu, log_var = enc(x)
                std = torch.exp(0.5 * log_var)
                z = mu + std * torch.randn((k, *std.shape), device=std.device)  # (K, B, z)
                logits = dec(z)  # (K, B, 784)
                rec = F.binary_cross_entropy_with_logits(
                    logits, x.expand_as(logits), reduction="sum"
                )
                kl = -0.5 * torch.sum(1.0 + log_var - mu.pow(2) - log_var.exp())
                loss = rec / k + kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return _timed_epoch(run, device)["cpu" if use_cpu_time else "seconds"]

    fit_times = {k: [] for k in ks}
    hand_times = {k: [] for k in ks}
    for rnd in range(reps + 1):
        order = ks[rnd % len(ks) :] + ks[: rnd % len(ks)]
        for k in order:
            f, h = fit_once(k, rnd), hand_once(k)
            if rnd > 0:
                fit_times[k].append(f)
                hand_times[k].append(h)
        print(f"  particles round {rnd + 1}/{reps + 1} done (load {load_average()})", flush=True)

    table = []
    f1 = statistics.median(fit_times[ks[0]])
    h1 = statistics.median(hand_times[ks[0]])
    for k in ks:
        fk = statistics.median(fit_times[k])
        hk = statistics.median(hand_times[k])
        bound = (1 + k) / 2
        table.append(
            [
                str(k),
                f"{fk * scale:.2f}",
                f"{fk / f1:.2f}",
                f"{bound:.1f}",
                "yes" if fk / f1 <= bound else "NO",
                f"{hk * scale:.2f}",
                f"{hk / h1:.2f}",
                f"{fk / hk:.2f}",
            ]
        )
    headers = [
        "K",
        "fit s/epoch",
        "fit ratio to K=1",
        "(1+K)/2",
        "<= (1+K)/2",
        "hand-written s/epoch",
        "hand-written ratio",
        "fit / hand-written",
    ]
    return markdown_table(headers, table)


# ---------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------


def profile_row(row: Row, data: BenchData, device: torch.device, seed: int, top: int) -> None:
    """One warm-up epoch of ``row``, one plain epoch, then one epoch under cProfile (Python
    functions, by own time) and one under ``torch.profiler`` (operators, by self CPU time).
    Both profilers slow the epoch down; read the shares, not the absolute times."""
    import cProfile
    import io
    import pstats

    row.setup(data, device, seed)
    if row.skipped:
        raise SystemExit(f"{row.key} skipped: {row.skipped}")
    row.enter()
    try:
        row.epoch(0)  # warm-up
        plain = row.epoch(1)["seconds"]
        steps = math.ceil(data.train.shape[0] / BATCH)
        print(f"\n## Profile of {row.key}: {plain:.2f} s/epoch unprofiled, {steps} steps\n")
        profiler = cProfile.Profile()
        profiler.enable()
        seconds = row.epoch(2)["seconds"]
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
        print(f"### cProfile ({seconds:.2f} s under the profiler), top {top} by own time\n")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-6000:])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            seconds = row.epoch(3)["seconds"]
        print(f"\n### torch.profiler ({seconds:.2f} s under the profiler), top {top} by self CPU\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    finally:
        row.leave()


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def select_rows(spec: str) -> list[str]:
    """Row keys from ``--rows``: names, ``all`` (every default row and the particle sweep),
    ``extra`` (the what-if rows), comma-separated."""
    keys: list[str] = []
    for item in (k.strip() for k in spec.split(",")):
        if item == "all":
            keys += [*ROW_KEYS, "particles"]
        elif item == "extra":
            keys += EXTRA_KEYS
        elif item in ROW_KEYS or item in EXTRA_KEYS or item == "particles":
            keys.append(item)
        elif item:
            choices = ", ".join([*ROW_KEYS, "particles", *EXTRA_KEYS])
            raise SystemExit(f"unknown --rows entry {item!r}; choose from all, extra, {choices}")
    return keys


def main(args: argparse.Namespace) -> None:
    if args.threads > 0:
        # Every row on the same N cores, before any thread pool starts: XLA (NumPyro's) sizes
        # its own pool from the cores it may use, whatever its flags say.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
        torch.set_num_threads(args.threads)
    NumPyroRow.threads = args.threads  # XLA's, set before JAX is first imported
    device = resolve_device(args.device)
    if args.stacks:
        steps = args.stack_steps
        print(f"inclusive time per step over {steps} steps, stacks through {args.stack_anchor!r}")
        summary = collapsed_stack_summary(
            args.stacks, args.stack_anchor, steps, args.stack_rate, args.top
        )
        rows = [[f"{ms:.2f}", f"{share:.0%}", name] for name, ms, share in summary]
        print(markdown_table(["ms/step", "share", "function (file)"], rows))
        return
    keys = select_rows(args.rows)
    pyro.set_rng_seed(args.seed)  # torch, numpy and random
    if args.profile:
        rows = [row for row in all_rows() + extra_rows() if row.key == args.profile]
        if not rows:
            choices = ", ".join(ROW_KEYS + EXTRA_KEYS)
            raise SystemExit(f"unknown --profile {args.profile!r}; choose from {choices}")
        for line in hardware_lines(device):
            print(f"- {line}")
        profile_row(rows[0], load_data(device, quick=args.quick), device, args.seed, args.top)
        return
    pyro.clear_param_store()

    print("# train_speed: seconds per epoch of VAE training on Fashion-MNIST\n")
    for line in hardware_lines(device):
        print(f"- {line}")
    t_start = time.perf_counter()
    data = load_data(device, quick=args.quick)
    n = data.train.shape[0]
    print(
        f"- data: {data.source}, {n:,} training images (train + validation splits"
        f"{', --quick subset' if args.quick else ''}), {data.test.shape[0]:,} test images; "
        f"dynamic binarisation\n"
    )

    rows = [row for row in all_rows() + extra_rows() if row.key in keys]
    if rows:
        print(f"running {len(rows)} rows: {args.warmup} warm-up + {args.epochs} timed epochs each")
        times = run_rows(rows, data, device, args.epochs, args.warmup, args.seed)
        elbos = {}
        for row in rows:
            if row.key in times:
                row.enter()
                elbos[row.key] = row.test_elbo(data.test)
                row.leave()
        print(f"\n## Seconds per epoch ({n:,} images), median of {args.epochs} epochs\n")
        print(results_table(rows, times, elbos, cpu=device.type == "cpu"))
        lines = [fit_breakdown(key, t) for key, t in times.items() if "train_seconds" in t[0]]
        lines += [
            f"- {row.key}: first compile {row.first_compile:.1f} s (in its warm-up epoch)"
            for row in rows
            if getattr(row, "first_compile", None) is not None
        ]
        if lines:
            print("\n" + "\n".join(lines))

    if "particles" in keys:
        ks = [int(k) for k in args.particles.split(",")]
        n_images = min(args.particle_images, n)
        print(
            f"\n## Vectorised particles: fit (meanfield, fast engine) with num_particles=K, "
            f"{n_images:,} images per timing, {args.particle_reps} timings after a warm-up, "
            f"scaled to {n:,} images; {'CPU' if device.type == 'cpu' else 'wall-clock'} "
            "seconds\n"
        )
        print(particle_sweep(data, device, ks, n_images, args.particle_reps, args.seed))
    print(
        f"\nload average at the end: {load_average()}; total {time.perf_counter() - t_start:.0f} s"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per row (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up epochs per row (default 1)")
    parser.add_argument(
        "--rows",
        default="all",
        help=f"comma-separated: all (default: {', '.join(ROW_KEYS)} and particles), "
        f"extra ({', '.join(EXTRA_KEYS)}), or single names",
    )
    parser.add_argument("--quick", action="store_true", help="a 6,000-image subset (smoke run)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: steady on a shared machine; 0: torch's default)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--particles", default="1,4,16", help="K values of the particle sweep (default 1,4,16)"
    )
    parser.add_argument(
        "--particle-images",
        type=int,
        default=5120,
        help="training images per particle-sweep timing (default 5,120: 40 steps)",
    )
    parser.add_argument("--particle-reps", type=int, default=5, help="timings per K (default 5)")
    parser.add_argument(
        "--profile",
        metavar="ROW",
        help="instead of the table: profile one epoch of ROW (cProfile and torch.profiler)",
    )
    parser.add_argument("--top", type=int, default=15, help="lines per profile (default 15)")
    parser.add_argument(
        "--stacks",
        metavar="FILE",
        help="instead of the table: summarise py-spy raw output (record --format raw) of a run",
    )
    parser.add_argument(
        "--stack-anchor",
        default=".epoch (train_speed.py",
        help="count only stacks through this frame (default: a row's epoch)",
    )
    parser.add_argument("--stack-steps", type=int, default=938, help="steps the stacks cover")
    parser.add_argument("--stack-rate", type=float, default=200, help="py-spy samples per second")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
