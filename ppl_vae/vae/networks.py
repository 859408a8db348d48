"""Encoder and decoder networks for the Gaussian VAE.

An encoder maps data to the parameters of q(z | x) = N(mu, diag(exp(log_var))); a decoder maps
a latent code to the parameters of p(x | z): logits for a Bernoulli or continuous Bernoulli, the
mean for a Gaussian (with an optional learned log-sigma, a scalar or per-pixel ``nn.Parameter``).

Data are flat, ``(..., x_dim)``; the conv networks reshape to ``(C, H, W)`` internally and also
accept ``(..., C, H, W)`` input. Every network exposes ``x_dim``, ``z_dim`` and ``image_shape``
(``None`` when unknown); decoders also expose ``log_sigma`` (``None`` unless learned).
Leading batch dimensions are kept, so a decoder can take ``z`` of shape
``(num_particles, batch, z_dim)``. Outputs have the input's dtype: under ``torch.autocast``
(``TrainConfig(precision="bfloat16")``) the layers compute in bfloat16 and the likelihood and
KL still see float32.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from ppl_vae.models.vae import LIKELIHOODS

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "LEARN_SIGMA",
    "ConvDecoder",
    "ConvEncoder",
    "Decoder",
    "Encoder",
    "GatedLinear",
    "make_networks",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}
"""Names accepted by ``activation=`` ("identity": none, e.g. for the gated layers of the
VampPrior's code, h = (W x + b) * sigmoid(V x + c))."""

LEARN_SIGMA = (None, "scalar", "pixel")
"""Values accepted by ``learn_sigma=``: no learned sigma, one for all pixels, one per pixel."""

ARCHITECTURES = ("mlp", "gated", "conv")
"""The network families of :func:`make_networks`: "gated" is the MLP with gated dense layers
(:class:`GatedLinear`, Dauphin et al. 2017; the VampPrior's networks, Tomczak & Welling 2018)."""


def _activation(name: str) -> type[nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


class GatedLinear(nn.Module):
    """A gated dense layer: act(W x + b) * sigmoid(V x + c), the two products as one matmul."""

    def __init__(self, d_in: int, d_out: int, activation: str = "identity") -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, 2 * d_out)
        self.act = _activation(activation)()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.linear(x).chunk(2, dim=-1)
        return self.act(h) * torch.sigmoid(gate)


def _mlp(sizes: Sequence[int], activation: str, *, gated: bool = False) -> nn.Sequential:
    """Linear layers between consecutive ``sizes``, each followed by the activation; with
    ``gated``, :class:`GatedLinear` layers (the activation inside each)."""
    act = _activation(activation)
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(sizes):
        if gated:
            layers.append(GatedLinear(d_in, d_out, activation))
        else:
            layers += [nn.Linear(d_in, d_out), act()]
    return nn.Sequential(*layers)


def _log_sigma(learn_sigma: str | None, x_dim: int) -> nn.Parameter | None:
    """log sigma of a Gaussian p(x | z), initialised at 0 (sigma = 1)."""
    if learn_sigma is None:
        return None
    if learn_sigma == "scalar":
        return nn.Parameter(torch.zeros(1))  # (1,), broadcasts over pixels
    if learn_sigma == "pixel":
        return nn.Parameter(torch.zeros(x_dim))  # (x_dim,)
    raise ValueError(f"unknown learn_sigma {learn_sigma!r}; choose one of {LEARN_SIGMA}")


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """(H, W) or (C, H, W) -> (C, H, W)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) or (H, W), got {shape}")
    return shape  # type: ignore[return-value]


class Encoder(nn.Module):
    """MLP encoder: x -> (mu, log_var) of q(z | x) = N(mu, diag(exp(log_var))); with
    ``gated``, its hidden layers are :class:`GatedLinear`."""

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        image_shape: Sequence[int] | None = None,
        gated: bool = False,
    ) -> None:
        super().__init__()
        _check_dims(x_dim=x_dim, z_dim=z_dim)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.image_shape = None if image_shape is None else _image_shape(image_shape)
        self.body = _mlp([x_dim, *hidden], activation, gated=gated)
        self.head = nn.Linear(([x_dim, *hidden])[-1], 2 * z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)  # (..., hidden[-1])
        # Back to the input's dtype: under torch.autocast the products ran in bfloat16.
        mu, log_var = self.head(h).to(x.dtype).chunk(2, dim=-1)  # (..., z_dim) each
        return mu, log_var


class Decoder(nn.Module):
    """MLP decoder: z -> logits (Bernoulli, continuous Bernoulli) or mean (Gaussian) of p(x | z).

    With ``learn_sigma`` ("scalar" or "pixel") it also holds ``log_sigma``, the log standard
    deviation of a Gaussian p(x | z); the model reads it, ``forward`` does not return it.
    With ``gated``, its hidden layers are :class:`GatedLinear`.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        learn_sigma: str | None = None,
        image_shape: Sequence[int] | None = None,
        gated: bool = False,
    ) -> None:
        super().__init__()
        _check_dims(x_dim=x_dim, z_dim=z_dim)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.image_shape = None if image_shape is None else _image_shape(image_shape)
        self.body = _mlp([z_dim, *hidden], activation, gated=gated)
        self.head = nn.Linear(([z_dim, *hidden])[-1], x_dim)
        self.log_sigma = _log_sigma(learn_sigma, x_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(z)  # (..., hidden[-1])
        return self.head(h).to(z.dtype)  # (..., x_dim); float32 again under autocast


def _conv_sizes(image_shape: tuple[int, int, int], n_layers: int) -> list[tuple[int, int]]:
    """Spatial sizes (H, W) before and after each stride-2 conv (kernel 4, padding 1)."""
    _, h, w = image_shape
    sizes = [(h, w)]
    for _ in range(n_layers):
        h, w = h // 2, w // 2  # floor((h + 2*1 - 4) / 2) + 1
        if h < 1 or w < 1:
            raise ValueError(
                f"image {image_shape} is too small for {n_layers} stride-2 conv layers; "
                "use fewer channels= entries"
            )
        sizes.append((h, w))
    return sizes


class ConvEncoder(nn.Module):
    """Conv encoder for (C, H, W) images: stride-2 convs, then an MLP, to (mu, log_var).

    Each conv (kernel 4, stride 2, padding 1) halves H and W (rounding down): 28 -> 14 -> 7,
    8 -> 4 -> 2. Input is flat ``(..., C*H*W)`` or ``(..., C, H, W)``.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        z_dim: int,
        hidden: Sequence[int] = (256,),
        activation: str = "relu",
        channels: Sequence[int] = (32, 64),
    ) -> None:
        super().__init__()
        _check_dims(z_dim=z_dim)
        self.image_shape = _image_shape(image_shape)
        self.x_dim, self.z_dim = math.prod(self.image_shape), z_dim
        act = _activation(activation)
        h, w = _conv_sizes(self.image_shape, len(channels))[-1]
        convs: list[nn.Module] = []
        for c_in, c_out in zip((self.image_shape[0], *channels), channels, strict=False):
            convs += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), act()]
        self.convs = nn.Sequential(*convs)
        flat = (channels[-1] if channels else self.image_shape[0]) * h * w
        self.body = _mlp([flat, *hidden], activation)
        self.head = nn.Linear(([flat, *hidden])[-1], 2 * z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() >= 3 and tuple(x.shape[-3:]) == self.image_shape:
            batch = x.shape[:-3]
        else:
            batch = x.shape[:-1]
        img = x.reshape(-1, *self.image_shape)  # (B, C, H, W), B = prod(batch)
        h = self.convs(img).flatten(start_dim=1)  # (B, channels[-1] * h * w)
        h = self.body(h)  # (B, hidden[-1])
        mu, log_var = self.head(h).to(x.dtype).chunk(2, dim=-1)  # (B, z_dim) each
        return mu.reshape(*batch, self.z_dim), log_var.reshape(*batch, self.z_dim)


class ConvDecoder(nn.Module):
    """Conv decoder mirroring :class:`ConvEncoder`: z -> MLP -> stride-2 transposed convs.

    Returns flat logits or means ``(..., C*H*W)``; ``output_padding`` restores odd sizes
    (e.g. 7 -> 14 -> 28, 5 -> 2 -> ... -> 5), so any H, W the encoder accepts round-trips.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        z_dim: int,
        hidden: Sequence[int] = (256,),
        activation: str = "relu",
        channels: Sequence[int] = (32, 64),
        learn_sigma: str | None = None,
    ) -> None:
        super().__init__()
        _check_dims(z_dim=z_dim)
        self.image_shape = _image_shape(image_shape)
        self.x_dim, self.z_dim = math.prod(self.image_shape), z_dim
        act = _activation(activation)
        sizes = _conv_sizes(self.image_shape, len(channels))
        c_first = channels[-1] if channels else self.image_shape[0]
        self._start = (c_first, *sizes[-1])  # (channels[-1], h, w)
        flat = math.prod(self._start)
        self.body = _mlp([z_dim, *hidden], activation)
        self.fc = nn.Linear(([z_dim, *hidden])[-1], flat)
        # Transposed convs go back up: channels reversed, ending at the image's C channels.
        c_path = [*reversed(channels), self.image_shape[0]]
        deconvs: list[nn.Module] = []
        for i in range(len(channels)):
            (h_in, w_in), (h_out, w_out) = sizes[-1 - i], sizes[-2 - i]
            deconvs.append(
                nn.ConvTranspose2d(
                    c_path[i],
                    c_path[i + 1],
                    kernel_size=4,
                    stride=2,
                    padding=1,
                    output_padding=(h_out - 2 * h_in, w_out - 2 * w_in),  # 0 or 1
                )
            )
            if i < len(channels) - 1:
                deconvs.append(act())
        self.deconvs = nn.Sequential(*deconvs)
        self.log_sigma = _log_sigma(learn_sigma, self.x_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        h = self.body(z.reshape(-1, self.z_dim))  # (B, hidden[-1]), B = prod(batch)
        h = self.fc(h).reshape(-1, *self._start)  # (B, channels[-1], h, w)
        out = self.deconvs(h)  # (B, C, H, W)
        return out.reshape(*batch, self.x_dim).to(z.dtype)  # (..., C*H*W)


def make_networks(
    x_shape: int | Sequence[int],
    z_dim: int,
    hidden: Sequence[int] = (400,),
    likelihood: str = "bernoulli",
    arch: str = "mlp",
    *,
    activation: str = "relu",
    learn_sigma: str | None = None,
    channels: Sequence[int] = (32, 64),
) -> tuple[nn.Module, nn.Module]:
    """Build a matching ``(encoder, decoder)`` pair.

    :param x_shape: ``x_dim`` (an int) or an image shape ``(C, H, W)`` / ``(H, W)``; the conv
        architecture needs the image shape.
    :param hidden: hidden layer sizes of the MLP (for ``arch="conv"``: of the dense layers
        between the convs and the latent code), e.g. ``[400]`` or ``[300, 300]``.
    :param likelihood: "bernoulli", "gaussian" or "continuous-bernoulli"; only checked here,
        and ``learn_sigma`` ("scalar" or "pixel") is allowed only with "gaussian".
    :param arch: "mlp", "gated" (the MLP with gated layers) or "conv".
    :param channels: conv channels, one stride-2 layer each (``arch="conv"`` only).
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")
    if learn_sigma not in LEARN_SIGMA:
        raise ValueError(f"unknown learn_sigma {learn_sigma!r}; choose one of {LEARN_SIGMA}")
    if learn_sigma is not None and likelihood != "gaussian":
        raise ValueError(
            f"learn_sigma={learn_sigma!r} needs likelihood='gaussian', got {likelihood!r}"
        )
    image_shape = None if isinstance(x_shape, int) else _image_shape(x_shape)
    hidden = tuple(int(h) for h in hidden)
    if arch in ("mlp", "gated"):
        x_dim = x_shape if isinstance(x_shape, int) else math.prod(image_shape)  # type: ignore[arg-type]
        gated = arch == "gated"
        enc = Encoder(x_dim, z_dim, hidden, activation, image_shape=image_shape, gated=gated)
        dec = Decoder(
            x_dim, z_dim, hidden, activation, learn_sigma, image_shape=image_shape, gated=gated
        )
        return enc, dec
    if arch == "conv":
        if image_shape is None:
            raise ValueError(f"arch='conv' needs an image shape (C, H, W), got x_shape={x_shape!r}")
        enc = ConvEncoder(image_shape, z_dim, hidden, activation, channels)
        dec = ConvDecoder(image_shape, z_dim, hidden, activation, channels, learn_sigma)
        return enc, dec
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHITECTURES}")
