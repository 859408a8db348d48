"""The VAE training of ``train_speed.py``'s hand-written loop through pythae's own trainer:
pythae's ``VAE`` (``reconstruction_loss="bce"``, closed-form KL) with a 784-400-20 ReLU encoder
and a 20-400-784 decoder ending in a sigmoid, ``BaseTrainer`` (its DataLoader over its
``BaseDataset``, batch 128, shuffled, no workers; Adam 1e-3), one ``train_step`` (pythae's epoch,
its loss read every step) per round on a trainer built once.

Dynamic binarisation: a fresh Bernoulli draw of every grey image before each epoch, inside the
timed epoch (each image is drawn once per epoch, as per batch in the other rows).

Needs the ``peers`` extra (``pip install -e '.[peers]'``); the row is skipped otherwise.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from _common import PeerRow
from torch import Tensor, nn

X_DIM, HIDDEN, Z_DIM, BATCH, LR = 784, 400, 20, 128, 1e-3


class PythaeRow(PeerRow):
    """A ``train_speed.Row``: setup, one epoch per call, the test ELBO."""

    key = "pythae"
    label = "pythae BaseTrainer + VAE (bce)"
    note = "pythae's DataLoader and loop, loss read every step; a fresh draw per epoch"

    def setup(self, data: Any, device: torch.device, seed: int) -> None:
        try:
            from pythae.data.datasets import BaseDataset
            from pythae.models import VAE, VAEConfig
            from pythae.models.base.base_utils import ModelOutput
            from pythae.models.nn import BaseDecoder, BaseEncoder
            from pythae.trainers import BaseTrainer, BaseTrainerConfig
        except ImportError:
            self.skipped = "pythae not installed: pip install -e '.[peers]'"
            return

        class Encoder(BaseEncoder):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Sequential(nn.Linear(X_DIM, HIDDEN), nn.ReLU())
                self.mu, self.log_var = nn.Linear(HIDDEN, Z_DIM), nn.Linear(HIDDEN, Z_DIM)

            def forward(self, x: Tensor) -> Any:
                h = self.body(x.reshape(x.shape[0], -1))
                return ModelOutput(embedding=self.mu(h), log_covariance=self.log_var(h))

        class Decoder(BaseDecoder):
            def __init__(self) -> None:
                super().__init__()
                self.net = nn.Sequential(
                    nn.Linear(Z_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, X_DIM), nn.Sigmoid()
                )

            def forward(self, z: Tensor) -> Any:
                return ModelOutput(reconstruction=self.net(z))

        torch.manual_seed(seed)
        config = VAEConfig(input_dim=(X_DIM,), latent_dim=Z_DIM, reconstruction_loss="bce")
        self.model = VAE(config, encoder=Encoder(), decoder=Decoder())
        self.grey = data.train
        self.binary = torch.bernoulli(self.grey)
        dataset = BaseDataset(self.binary, torch.zeros(len(self.binary)))
        self.folder = tempfile.TemporaryDirectory(prefix="pythae-")
        trainer_config = BaseTrainerConfig(
            output_dir=self.folder.name,
            num_epochs=10_000,
            learning_rate=LR,
            per_device_train_batch_size=BATCH,
            optimizer_cls="Adam",
            seed=seed,
            no_cuda=device.type != "cuda",
        )
        self.trainer = BaseTrainer(self.model, dataset, training_config=trainer_config)
        self.trainer.prepare_training()
        self.device = device

    def epoch(self, index: int) -> dict[str, float]:
        import time

        wall, cpu = time.perf_counter(), time.process_time()
        self.binary.copy_(torch.bernoulli(self.grey))  # the dataset's own tensor
        self.train_loss = self.trainer.train_step(index + 1)
        return {"seconds": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

    def test_elbo(self, images: Tensor) -> float:
        """Mean single-sample ELBO per test image (nats), z ~ q(z | x) once per image."""
        model, total = self.model.eval(), 0.0
        gen = torch.Generator(device=images.device).manual_seed(0)
        with torch.no_grad():
            for start in range(0, images.shape[0], 1000):
                x = images[start : start + 1000]
                out = model.encoder(x)
                mu, std = out.embedding, torch.exp(0.5 * out.log_covariance)
                z = mu + std * torch.randn(mu.shape, generator=gen, device=mu.device)
                probs = model.decoder(z).reconstruction
                loglik = -F.binary_cross_entropy(probs, x, reduction="none").sum(-1)
                kl = 0.5 * (mu.pow(2) + std.pow(2) - 1.0 - 2.0 * std.log()).sum(-1)
                total += float((loglik - kl).sum())
        model.train()
        return total / images.shape[0]
