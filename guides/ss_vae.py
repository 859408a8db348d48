"""The guide of the semi-supervised VAE (M2): q(y | x) q(z | x, y).

q(y | x) = Cat(softmax(classifier(x))) proposes the label of each unlabelled row, its site
"y" marked for parallel enumeration, so ``TraceEnum_ELBO`` sums over the C classes exactly
(``Trace_ELBO`` samples it instead); q(z | x, y) = N(mu(x, y), diag(exp(log_var(x, y)))) for
every row, at the observed label where there is one. Pairs with ``ppl_vae.models.ss_vae.model``
(same plates, sites and step-time arguments).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae.elbo import kl_scale
from ppl_vae.models.ss_vae import check_labels, split_batch
from ppl_vae.models.vae import check_data as _check_images

__all__ = ["guide"]


def guide(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    encoder: nn.Module,
    classifier: nn.Module,
    labelled_weight: float = 1.0,
    beta: float = 1.0,
    check_data: bool = True,
) -> None:
    """q(y | x) for unlabelled rows (enumerated), q(z | x, y) for all; z scaled by beta.

    :param x: images ``(N, x_dim)``.
    :param y: ``(N,)`` int64 labels, -1 where unknown; ``None``: all unknown.
    :param encoder: (x, y) -> (mu, log_var); ``pyro.module("encoder", ...)``.
    :param classifier: x -> logits of q(y | x); ``pyro.module("classifier", ...)``.
    :param labelled_weight: the model's scale of labelled sites (the same here, so that it
        multiplies the labelled ELBO terms exactly).
    :raises DataError: for bad images or labels (the guide runs first in SVI).
    """
    if check_data:
        _check_images(x, x_dim=getattr(encoder, "x_dim", None))
        if y is not None:
            check_labels(y, x.shape[0], classifier.num_classes)
    pyro.module("encoder", encoder)
    pyro.module("classifier", classifier)
    x_l, y_l, x_u = split_batch(x, y)
    if x_l.shape[0]:
        with pyro.plate("labelled", x_l.shape[0]), pyro.poutine.scale(scale=labelled_weight):
            mu, log_var = encoder(x_l, y_l)  # (n_l, z_dim) each
            with kl_scale(beta):
                pyro.sample("z_labelled", dist.Normal(mu, torch.exp(0.5 * log_var)).to_event(1))
    if x_u.shape[0]:
        with pyro.plate("data", x_u.shape[0]):
            logits = classifier(x_u)  # (n_u, C)
            label = pyro.sample(
                "y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"}
            )  # enumerated: (C, 1); sampled: (..., n_u)
            mu, log_var = encoder(x_u, label)  # (..., n_u, z_dim)
            with kl_scale(beta):
                pyro.sample("z", dist.Normal(mu, torch.exp(0.5 * log_var)).to_event(1))
