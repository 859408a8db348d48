"""What :func:`~ppl_vae.training.loop.fit` checks of its arguments before anything runs: the
images are 2-D float tensors (N, D) of one width, and beta comes from the configuration or a
schedule function, never from the step's keywords.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ppl_vae.errors import DataError
from ppl_vae.training.config import TrainConfig

__all__ = ["check_arguments"]


def _check_images(images: Tensor, name: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 2 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DataError(f"{name} must be a 2-D float tensor (N, D) of flattened images, got {got}")
    if images.shape[0] == 0:
        raise DataError(f"{name} holds no images")


def check_arguments(
    train_images: Tensor,
    validation: Tensor | None,
    config: TrainConfig,
    step_kwargs: Mapping[str, Any] | None,
    beta_schedule: Callable[[int], float] | None,
    train_labels: Tensor | None = None,
) -> None:
    """Refuse images that are not (N, D) float tensors of one D, a ``beta`` in ``step_kwargs``,
    a ``beta_schedule`` function with a Jit ELBO, and labels that are not one int64 per
    training image (-1 or a class index), or that come with a Jit ELBO or free bits.

    :raises DataError: for the images; ``ValueError`` for the rest.
    """
    _check_images(train_images, "train_images")
    if validation is not None:
        _check_images(validation, "validation")
        if validation.shape[1] != train_images.shape[1]:
            raise DataError(
                f"validation images have {validation.shape[1]} values each, training images "
                f"{train_images.shape[1]}: they must come from the same dataset"
            )
    if config.patience is not None and validation is None:
        raise ValueError(
            f"patience={config.patience} stops on the validation ELBO: pass validation images"
        )
    if "beta" in (step_kwargs or {}):
        raise ValueError("pass beta through TrainConfig.beta or beta_schedule, not step_kwargs")
    if config.elbo.startswith("jit") and beta_schedule is not None:
        raise ValueError(
            f"elbo={config.elbo!r} compiles once per distinct keyword value, so a beta schedule "
            "would recompile at every step: use elbo='meanfield' or 'trace' with a schedule"
        )
    if train_labels is not None:
        _check_labels(train_labels, train_images.shape[0], config, step_kwargs)


def _check_labels(
    labels: Tensor, n: int, config: TrainConfig, step_kwargs: Mapping[str, Any] | None
) -> None:
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dim() != 1:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else labels
        raise DataError(f"train_labels must be a 1-D int64 tensor, got {got}")
    if labels.shape[0] != n:
        raise DataError(f"train_labels has {labels.shape[0]} labels for {n} training images")
    if n and int(labels.min()) < -1:
        raise DataError("train_labels must be class indices >= 0, or -1 for an unlabelled image")
    taken = {"y", "labelled_weight"} & set(step_kwargs or {})
    if taken:
        raise ValueError(f"with train_labels the loop passes {sorted(taken)}: not in step_kwargs")
    if config.elbo.startswith("jit"):
        raise ValueError(
            f"elbo={config.elbo!r} compiles for one batch structure, but labelled and "
            "unlabelled rows split each batch anew: use elbo='enum' with train_labels"
        )
    if config.free_bits > 0:
        raise ValueError(
            "free bits act on the one latent site of a VAE; they are not available with labels "
            "(--model m2)"
        )
