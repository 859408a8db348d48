"""The semi-supervised VAE, model M2 of Kingma et al. (2014), as a plain Pyro model:

    y ~ Cat(1/C),  z ~ N(0, I),  x ~ p(x | y, z)  (a decoder network of z and y).

Labelled images observe y; for unlabelled ones y is latent and the guide in
``ppl_vae.guides.ss_vae`` proposes q(y | x) (a classifier), which ``TraceEnum_ELBO`` sums out
exactly when the guide's "y" is enumerated. The ELBO of a batch is

    sum_labelled w * [L(x, y) + alpha * log q(y | x)] + sum_unlabelled U(x),
    L(x, y) = E_q(z|x,y)[log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y)],
    U(x) = sum_y q(y | x) L(x, y) + H(q(y | x)),

with ``alpha`` the weight of the classification term of the paper (its J^alpha) and ``w`` the
``labelled_weight`` a trainer uses to count each labelled image once per epoch when it shows
labelled images more often than unlabelled ones. beta scales the KL of z only (both branches).

Labels come as int64 class indices, ``-1`` marking an unlabelled row, so one batch may mix
both: rows with a label go to the plate ``"labelled"`` (sites ``y_labelled``, ``z_labelled``,
``x_labelled``), the others to the plate ``"data"`` (sites ``y``, ``z``, ``x``); with
``y=None`` every row is unlabelled and the pair is an ordinary latent-variable pair over
``"data"``. Bind networks and settings with ``functools.partial``::

    model = functools.partial(models.ss_vae.model, decoder=dec, classifier=clf, alpha=50.0)
    guide = functools.partial(guides.ss_vae.guide, encoder=enc, classifier=clf)
    svi = SVI(model, guide, Adam({"lr": 1e-3}), TraceEnum_ELBO(max_plate_nesting=1))
    svi.step(x, y=labels_or_minus_one)
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae.elbo import kl_scale
from ppl_vae.errors import DataError
from ppl_vae.models.vae import check_data as _check_images
from ppl_vae.models.vae import likelihood_distribution, likelihood_mean

__all__ = ["UNLABELLED", "check_labels", "classify", "generate", "model", "split_batch"]

UNLABELLED = -1
"""The label value of an unlabelled row."""


def check_labels(y: torch.Tensor, n: int, num_classes: int, name: str = "y") -> None:
    """Raise :class:`DataError` unless ``y`` is ``(n,)`` int64 in ``{-1, 0, ..., C - 1}``."""
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
        kind = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise DataError(f"{name} must be an int64 tensor of class indices, got {kind}")
    if tuple(y.shape) != (n,):
        raise DataError(f"{name} must have shape ({n},), one label per image, got {tuple(y.shape)}")
    if n and (int(y.min()) < UNLABELLED or int(y.max()) >= num_classes):
        raise DataError(
            f"{name} holds values in [{int(y.min())}, {int(y.max())}]; labels must be class "
            f"indices 0..{num_classes - 1}, or {UNLABELLED} for an unlabelled image"
        )


def split_batch(
    x: torch.Tensor, y: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_labelled, y_labelled, x_unlabelled)`` of a batch whose labels are -1 where unknown."""
    if y is None:
        return x[:0], torch.zeros(0, dtype=torch.int64, device=x.device), x
    labelled = y != UNLABELLED
    return x[labelled], y[labelled], x[~labelled]


def _num_classes(decoder: nn.Module, num_classes: int | None) -> int:
    if num_classes is None:
        num_classes = getattr(decoder, "num_classes", None)
        if num_classes is None:
            raise ValueError(f"pass num_classes=: {type(decoder).__name__} has none")
    return num_classes


def model(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    decoder: nn.Module,
    num_classes: int | None = None,
    likelihood: str = "bernoulli",
    sigma: float | None = None,
    classifier: nn.Module | None = None,
    alpha: float = 0.0,
    labelled_weight: float = 1.0,
    beta: float = 1.0,
    check_data: bool = True,
) -> None:
    """p(x, y, z) = Cat(y; 1/C) N(z; 0, I) p(x | y, z) per row, y observed where known.

    :param x: images ``(N, x_dim)``; 0/1 for "bernoulli".
    :param y: ``(N,)`` int64 labels, -1 where unknown; ``None``: all unknown.
    :param decoder: (z, y) -> logits / mean; registered as ``pyro.module("decoder", ...)``.
    :param num_classes: C; defaults to ``decoder.num_classes``.
    :param likelihood: "bernoulli", "continuous-bernoulli" or "gaussian" (with ``sigma``).
    :param classifier: x -> logits of q(y | x), needed when ``alpha`` > 0; registered as
        ``pyro.module("classifier", ...)``, the guide's own network.
    :param alpha: weight of alpha * log q(y | x) for each labelled image (a factor site
        ``"classification"``); 0 leaves the ELBO alone.
    :param labelled_weight: ``poutine.scale`` of every labelled site.
    :param beta: the KL weight of z (``kl_scale`` on "z" and "z_labelled").
    :raises DataError: for bad images or labels.
    """
    num_classes = _num_classes(decoder, num_classes)
    if check_data:
        _check_images(x, x_dim=getattr(decoder, "x_dim", None), likelihood=likelihood)
        if y is not None:
            check_labels(y, x.shape[0], num_classes)
    if alpha and classifier is None:
        raise ValueError("alpha > 0 needs the classifier of q(y | x): pass classifier=")
    pyro.module("decoder", decoder)
    x_l, y_l, x_u = split_batch(x, y)
    prior_y = dist.Categorical(logits=x.new_zeros(num_classes))
    loc = x.new_zeros(decoder.z_dim)  # (z_dim,)
    prior_z = dist.Normal(loc, torch.ones_like(loc)).to_event(1)
    log_sigma = getattr(decoder, "log_sigma", None)
    if x_l.shape[0]:
        with pyro.plate("labelled", x_l.shape[0]), pyro.poutine.scale(scale=labelled_weight):
            pyro.sample("y_labelled", prior_y, obs=y_l)
            with kl_scale(beta):
                z = pyro.sample("z_labelled", prior_z)  # (..., n_l, z_dim)
            out = decoder(z, y_l)
            pyro.sample(
                "x_labelled", likelihood_distribution(out, likelihood, sigma, log_sigma), obs=x_l
            )
            if alpha:
                pyro.module("classifier", classifier)
                log_q = dist.Categorical(logits=classifier(x_l)).log_prob(y_l)  # (n_l,)
                pyro.factor("classification", alpha * log_q)
    if x_u.shape[0]:
        with pyro.plate("data", x_u.shape[0]):
            label = pyro.sample("y", prior_y)  # enumerated: (C, 1); sampled: (..., n_u)
            with kl_scale(beta):
                z = pyro.sample("z", prior_z)  # (..., n_u, z_dim)
            out = decoder(z, label)  # (..., n_u, x_dim)
            p_x = likelihood_distribution(out, likelihood, sigma, log_sigma)
            pyro.sample("x", p_x, obs=x_u)


def generate(decoder: nn.Module, z: torch.Tensor, *, likelihood: str = "bernoulli") -> torch.Tensor:
    """Mean images E[x | y, z] for every class y and each code in ``z`` (n, z_dim): shape
    ``(C, n, x_dim)``, row c the codes decoded as class c (same style, class changed)."""
    classes = torch.arange(decoder.num_classes, device=z.device).unsqueeze(-1)  # (C, 1)
    with torch.no_grad():
        return likelihood_mean(decoder(z, classes), likelihood)  # (C, n, x_dim)


def classify(classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """q(y | x) as probabilities ``(N, C)``."""
    with torch.no_grad():
        return torch.softmax(classifier(x), dim=-1)
