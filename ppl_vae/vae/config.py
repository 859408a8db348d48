"""A VAE experiment: its configuration, its networks, and the model/guide pair bound to them.

The configuration is plain data (JSON in the run folder), so a run can be rebuilt from its
folder without unpickling anything: ``build_vae(VAEConfig(**json))`` gives the same networks,
whose weights a checkpoint then restores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ppl_vae.errors import DataError
from ppl_vae.guides import vae as vae_guide
from ppl_vae.models import vae as vae_model
from ppl_vae.vae.networks import make_networks
from ppl_vae.vae.priors import make_prior, parse_prior

__all__ = ["VAE", "VAEConfig", "build_vae", "resolve_binarize"]

"""Values of ``VAEConfig.arch`` (built by :func:`~ppl_vae.vae.networks.make_networks`)."""

_ADDED = {"prior": "normal"}
"""VAEConfig fields added later, with the default that older configurations mean."""

BINARIZE_DEFAULT = {"bernoulli": "dynamic", "gaussian": "none", "continuous-bernoulli": "none"}
"""The binarisation each likelihood expects when the user does not say."""


@dataclass(frozen=True)
class VAEConfig:
    """What defines a VAE run's data and networks (training settings live in TrainConfig)."""

    dataset: str = "fashion-mnist"
    likelihood: str = "bernoulli"
    binarize: str | None = None  # None: the likelihood's default (BINARIZE_DEFAULT)
    z_dim: int = 20
    hidden: tuple[int, ...] = (400,)
    arch: str = "mlp"
    activation: str = "relu"
    sigma: float | None = None  # fixed Gaussian s.d.; None with "gaussian" learns one
    learn_sigma: str | None = None  # "scalar" or "pixel" (Gaussian only)
    image_shape: tuple[int, ...] = field(default=())  # filled from the data
    prior: str = "normal"  # one of PRIORS: N(0, I), "mog:K" or "vamp:K"

    def __post_init__(self) -> None:
        parse_prior(self.prior)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values. Settings added after runs were first saved are left out
        at their default, so those runs' configurations (and digests) stay what they were."""
        values = asdict(self)
        for name, default in _ADDED.items():
            if values[name] == default:
                del values[name]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VAEConfig:
        """Inverse of :meth:`to_dict` (lists back to tuples)."""
        values = dict(values)
        for key in ("hidden", "image_shape"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)


def resolve_binarize(likelihood: str, binarize: str | None) -> str:
    """The binarisation to use; refuses a Bernoulli likelihood on grey levels, naming the fix."""
    if binarize is None:
        return BINARIZE_DEFAULT[likelihood]
    if likelihood == "bernoulli" and binarize == "none":
        raise DataError(
            "a Bernoulli likelihood needs binary data, but --binarize none keeps grey levels: "
            f"{vae_model.BINARY_FIX}"
        )
    return binarize


@dataclass(frozen=True)
class VAE:
    """The networks and the plain Pyro model/guide pair bound to them."""

    config: VAEConfig
    encoder: nn.Module
    decoder: nn.Module
    model: Callable
    guide: Callable
    prior: nn.Module | None = None  # a learned p(z); None: N(0, I)

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The networks by the names Pyro registers them under."""
        modules = {"encoder": self.encoder, "decoder": self.decoder}
        if self.prior is not None:
            modules["prior"] = self.prior
        return modules

    def prior_distribution(self) -> torch.distributions.Distribution | None:
        """p(z) of a learned prior (batch (), event (z_dim,)); ``None`` for N(0, I)."""
        return None if self.prior is None else self.prior.distribution(self.encoder)


def build_vae(config: VAEConfig) -> VAE:
    """Fresh networks for ``config`` (seed first for reproducible weights) and the bound pair."""
    if not config.image_shape:
        raise ValueError("VAEConfig.image_shape is empty: set it from the data (C, H, W)")
    learn_sigma = config.learn_sigma
    if config.likelihood == "gaussian" and config.sigma is None and learn_sigma is None:
        learn_sigma = "scalar"
    encoder, decoder = make_networks(
        config.image_shape,
        config.z_dim,
        config.hidden,
        config.likelihood,
        config.arch,
        activation=config.activation,
        learn_sigma=learn_sigma,
    )
    prior = make_prior(config.prior, encoder.x_dim, config.z_dim)
    learned = {} if prior is None else {"prior": prior, "encoder": encoder}
    model = functools.partial(
        vae_model.model,
        decoder=decoder,
        likelihood=config.likelihood,
        sigma=config.sigma,
        **learned,
    )
    guide = functools.partial(vae_guide.guide, encoder=encoder)
    return VAE(
        config=config, encoder=encoder, decoder=decoder, model=model, guide=guide, prior=prior
    )
