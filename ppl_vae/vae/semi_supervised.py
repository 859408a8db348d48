"""The semi-supervised VAE (M2) as an experiment: its settings, its networks and the
model/guide pair bound to them (``ppl_vae.models.ss_vae``, ``ppl_vae.guides.ss_vae``).

The settings are plain data (the ``"m2"`` section of a run's ``config.json``) beside the
:class:`~ppl_vae.vae.config.VAEConfig`, whose data, likelihood, z size, hidden layers and
activation M2 shares, so a run rebuilds from its folder without unpickling anything.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ppl_vae.errors import DataError
from ppl_vae.guides import ss_vae as ss_guide
from ppl_vae.models import ss_vae as ss_model
from ppl_vae.models.vae import likelihood_distribution
from ppl_vae.vae.config import VAEConfig
from ppl_vae.vae.ss_networks import Classifier, LabelledDecoder, LabelledEncoder, make_ss_networks

__all__ = [
    "M2",
    "M2Config",
    "build_m2",
    "default_alpha",
    "m2_iwae",
    "m2_log_weights",
    "paper_alpha",
]

PAPER_ALPHA_FRACTION = 0.1
"""Kingma et al. (2014) weight the classification term by alpha = 0.1 N on the mean over the
labelled images: 0.1 N / N_labelled for each one."""


def paper_alpha(num_train: int, num_labelled: int) -> float:
    """The paper's weight of log q(y | x) per labelled image: 0.1 * N / N_labelled."""
    return PAPER_ALPHA_FRACTION * num_train / num_labelled


def default_alpha(num_train: int, num_labelled: int) -> float:
    """ppl-vae's default weight of log q(y | x) per labelled image, N / N_labelled: over an
    epoch the classification term weighs as much as the N images' ELBO terms. Ten times the
    paper's: on Fashion-MNIST with 100 labels, one epoch, the paper's weight (5 per image)
    reached 22% test accuracy where 300 and 3,000 reached 70-71% (benchmarks/README.md)."""
    return num_train / num_labelled


@dataclass(frozen=True)
class M2Config:
    """What M2 adds to a VAE run: how many training images keep their label (drawn per class,
    balanced, from the run's seed), the weight ``alpha`` of the classification term per
    labelled image (``None``: :func:`default_alpha`, N / N_labelled), how many labelled
    images each training batch holds, and the weight of each in its batch
    (``labelled_weight``; ``None``: such that an epoch counts it once; 1: as much as an
    unlabelled image, the labelled set weighing more the more often it is shown). alpha
    multiplies the labelled weight: per batch the classification term is alpha * w * log q."""

    labels: int = 1000
    alpha: float | None = None
    labelled_batch: int = 32
    labelled_weight: float | None = None  # None: each labelled image counts once an epoch

    def __post_init__(self) -> None:
        if self.labels < 1:
            raise ValueError(f"labels must be >= 1, got {self.labels}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha}")
        if self.labelled_batch < 1:
            raise ValueError(f"labelled_batch must be >= 1, got {self.labelled_batch}")
        weight = self.labelled_weight
        if weight is not None and not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"labelled_weight must be a finite number > 0, got {weight}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values; ``labelled_weight`` (added later) only when set, so runs saved
        before it existed keep their configuration digest."""
        values = asdict(self)
        if values["labelled_weight"] is None:
            del values["labelled_weight"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> M2Config:
        return cls(**values)

    def alpha_for(self, num_train: int) -> float:
        """alpha per labelled image for a training set of ``num_train`` images."""
        return default_alpha(num_train, self.labels) if self.alpha is None else self.alpha


@dataclass(frozen=True)
class M2:
    """The networks of M2 and the plain Pyro pair bound to them."""

    config: VAEConfig
    m2: M2Config
    classifier: Classifier
    encoder: LabelledEncoder
    decoder: LabelledDecoder
    model: Callable
    guide: Callable
    alpha: float

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The networks by the names Pyro registers them under."""
        return {"classifier": self.classifier, "encoder": self.encoder, "decoder": self.decoder}

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def code_encoder(self) -> nn.Module:
        """x -> (mu, log_var) of q(z | x, y) at y = argmax q(y | x): the encoder the latent
        diagnostics (KL per dimension, active units, latent plots) read."""
        return _AtPredictedLabel(self.classifier, self.encoder)

    def accuracy(self, images: Tensor, labels: Tensor) -> tuple[float, float]:
        """Accuracy of argmax_y q(y | x) against ``labels`` and its binomial standard error
        sqrt(a (1 - a) / N) (NaN for one image)."""
        right = (self.predict(images).cpu() == labels.cpu()).double()
        n = right.numel()
        a = float(right.mean())
        return a, math.sqrt(a * (1 - a) / n) if n > 1 else math.nan

    def predict(self, images: Tensor, batch_size: int = 1000) -> Tensor:
        """argmax_y q(y | x) for each image, ``(N,)`` int64, in eval mode."""
        was = self.classifier.training
        self.classifier.eval()
        try:
            with torch.no_grad():
                parts = [
                    self.classifier(x).argmax(-1) for x in images.split(batch_size) if x.shape[0]
                ]
        finally:
            self.classifier.train(was)
        return torch.cat(parts) if parts else images.new_zeros(0, dtype=torch.int64)


class _AtPredictedLabel(nn.Module):
    def __init__(self, classifier: Classifier, encoder: LabelledEncoder) -> None:
        super().__init__()
        self.classifier, self.encoder = classifier, encoder
        self.x_dim, self.z_dim = encoder.x_dim, encoder.z_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(x, self.classifier(x).argmax(-1))


def build_m2(config: VAEConfig, m2: M2Config, num_classes: int, num_train: int) -> M2:
    """Fresh M2 networks (seed first for reproducible weights) and the bound pair; alpha is
    resolved for ``num_train`` training images."""
    if not config.image_shape:
        raise ValueError("VAEConfig.image_shape is empty: set it from the data (C, H, W)")
    if config.arch != "mlp":
        raise DataError(f"M2 has MLP networks only; --arch {config.arch} is not available for it")
    if config.likelihood == "gaussian" and config.sigma is None:
        raise DataError("M2 with a Gaussian likelihood needs a fixed --sigma (none is learned)")
    if config.prior != "normal":
        raise DataError(f"M2's z has the prior N(0, I); --prior {config.prior} is for --model vae")
    x_dim = math.prod(config.image_shape)
    classifier, encoder, decoder = make_ss_networks(
        x_dim, config.z_dim, num_classes, config.hidden, config.activation, config.image_shape
    )
    alpha = m2.alpha_for(num_train)
    model = functools.partial(
        ss_model.model,
        decoder=decoder,
        likelihood=config.likelihood,
        sigma=config.sigma,
        classifier=classifier,
        alpha=alpha,
    )
    guide = functools.partial(ss_guide.guide, encoder=encoder, classifier=classifier)
    return M2(config, m2, classifier, encoder, decoder, model, guide, alpha)


def m2_log_weights(m2: M2, x: Tensor, num_samples: int) -> Tensor:
    """log p(x, z_k | y) - log q(z_k | x, y) for z_k ~ q(z | x, y), every class y:
    shape ``(num_samples, C, N)``; summed over classes with log p(y) they bound log p(x)."""
    classes = torch.arange(m2.num_classes, device=x.device).unsqueeze(-1)  # (C, 1)
    mu, log_var = m2.encoder(x, classes)  # (C, N, z_dim)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * log_var))
    z = q.rsample((num_samples,))  # (K, C, N, z_dim)
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    out = m2.decoder(z, classes)  # (K, C, N, x_dim)
    config = m2.config
    log_lik = likelihood_distribution(out, config.likelihood, config.sigma).log_prob(x)
    return log_lik + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)  # (K, C, N)


def m2_iwae(
    m2: M2,
    images: Tensor,
    *,
    num_samples: int = 1000,
    chunk_size: int = 100,
    progress: bool = False,
) -> Tensor:
    """Per-image IWAE bound with the label summed out exactly, shape ``(N,)``:

        log p(x) >= E[log sum_y p(y) (1/K) sum_k p(x, z_k | y) / q(z_k | x, y)],

    z_k ~ q(z | x, y) drawn for each y (Jensen's inequality on the inner mean, for every y
    at once); it rises to log p(x) as K grows. Samples go ``chunk_size`` at a time; it costs
    C times the Gaussian VAE's bound (``progress``: a bar over the images)."""
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(
            f"num_samples and chunk_size must be >= 1, got {num_samples}, {chunk_size}"
        )
    log_prior = -math.log(m2.num_classes)
    parts = []
    # Images per pass: about 4 M decoder outputs, whatever K and C.
    per_pass = max(
        1, 4 * 2**20 // (min(chunk_size, num_samples) * m2.num_classes * images.shape[1])
    )
    with torch.no_grad():
        blocks = images.split(per_pass)
        bar = tqdm(
            blocks, desc=f"IWAE K={num_samples}, {m2.num_classes} classes", disable=not progress
        )
        for x in bar:
            sums, done = None, 0
            while done < num_samples:
                k = min(chunk_size, num_samples - done)
                lse = torch.logsumexp(m2_log_weights(m2, x, k), dim=0)  # (C, n)
                sums = lse if sums is None else torch.logaddexp(sums, lse)
                done += k
            per_class = sums - math.log(num_samples)  # (C, n): log p-hat(x | y)
            parts.append(torch.logsumexp(per_class + log_prior, dim=0))
    return torch.cat(parts)
