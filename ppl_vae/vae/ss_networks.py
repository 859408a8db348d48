"""The networks of the semi-supervised VAE (M2 of Kingma et al. 2014): a classifier for
q(y | x), an encoder for q(z | x, y) and a decoder for p(x | y, z).

The label enters the encoder and the decoder as a one-hot vector concatenated to the input of
the first layer, ``W [x; onehot(y)] = W_x x + W_y[y]``: computed that way, the image's product
``W_x x`` is made once and shared by every class when y is enumerated (y of shape
``(C, 1)`` broadcasts against a batch of ``N`` images to ``(C, N, ...)``), instead of once per
class. Labels are int64 class indices of any shape that broadcasts with the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ppl_vae.vae.networks import ACTIVATIONS, _mlp

__all__ = ["Classifier", "LabelledDecoder", "LabelledEncoder", "make_ss_networks"]


def _check(x_dim: int, z_dim: int, num_classes: int, hidden: Sequence[int]) -> tuple[int, ...]:
    hidden = tuple(int(h) for h in hidden)
    if min(x_dim, z_dim) < 1 or num_classes < 2 or not hidden or min(hidden) < 1:
        raise ValueError(
            "need x_dim >= 1, z_dim >= 1, num_classes >= 2 and at least one hidden layer of "
            f"size >= 1; got x_dim={x_dim}, z_dim={z_dim}, num_classes={num_classes}, "
            f"hidden={hidden}"
        )
    return hidden


class _LabelledInput(nn.Module):
    """The first layer on [v; onehot(y)]: act(W_v v + W_y[y] + b), then the other layers."""

    def __init__(self, v_dim: int, num_classes: int, hidden: Sequence[int], activation: str):
        super().__init__()
        self.num_classes = num_classes
        self.input = nn.Linear(v_dim, hidden[0])
        self.label = nn.Parameter(torch.randn(num_classes, hidden[0]) * v_dim**-0.5)
        self.rest = _mlp(hidden, activation)  # checks the activation's name
        self.act = ACTIVATIONS[activation]()

    def forward(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.dtype != torch.int64:
            raise TypeError(f"labels must be int64 class indices, got {y.dtype}")
        h = self.input(v) + self.label[y]  # (..., hidden[0]), batch shapes broadcast
        return self.rest(self.act(h))


class Classifier(nn.Module):
    """x -> logits of q(y | x) = Categorical(softmax(f(x))), shape ``(..., num_classes)``."""

    def __init__(
        self,
        x_dim: int,
        num_classes: int,
        hidden: Sequence[int] = (500,),
        activation: str = "softplus",
    ) -> None:
        super().__init__()
        hidden = _check(x_dim, 1, num_classes, hidden)
        self.x_dim, self.num_classes = x_dim, num_classes
        self.body = _mlp([x_dim, *hidden], activation)
        self.head = nn.Linear(hidden[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).to(x.dtype)  # (..., num_classes)


class LabelledEncoder(nn.Module):
    """(x, y) -> (mu, log_var) of q(z | x, y) = N(mu, diag(exp(log_var)))."""

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        num_classes: int,
        hidden: Sequence[int] = (500,),
        activation: str = "softplus",
    ) -> None:
        super().__init__()
        hidden = _check(x_dim, z_dim, num_classes, hidden)
        self.x_dim, self.z_dim, self.num_classes = x_dim, z_dim, num_classes
        self.body = _LabelledInput(x_dim, num_classes, hidden, activation)
        self.head = nn.Linear(hidden[-1], 2 * z_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_var = self.head(self.body(x, y)).to(x.dtype).chunk(2, dim=-1)
        return mu, log_var  # (..., z_dim) each


class LabelledDecoder(nn.Module):
    """(z, y) -> logits (Bernoulli) or mean (Gaussian) of p(x | y, z), shape ``(..., x_dim)``."""

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        num_classes: int,
        hidden: Sequence[int] = (500,),
        activation: str = "softplus",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        hidden = _check(x_dim, z_dim, num_classes, hidden)
        self.x_dim, self.z_dim, self.num_classes = x_dim, z_dim, num_classes
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self.log_sigma = None  # a Gaussian p(x | y, z) takes a fixed sigma
        self.body = _LabelledInput(z_dim, num_classes, hidden, activation)
        self.head = nn.Linear(hidden[-1], x_dim)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(z, y)).to(z.dtype)


def make_ss_networks(
    x_dim: int,
    z_dim: int,
    num_classes: int,
    hidden: Sequence[int] = (500,),
    activation: str = "softplus",
    image_shape: Sequence[int] | None = None,
) -> tuple[Classifier, LabelledEncoder, LabelledDecoder]:
    """A matching ``(classifier, encoder, decoder)`` with the same hidden layers."""
    return (
        Classifier(x_dim, num_classes, hidden, activation),
        LabelledEncoder(x_dim, z_dim, num_classes, hidden, activation),
        LabelledDecoder(x_dim, z_dim, num_classes, hidden, activation, image_shape),
    )
