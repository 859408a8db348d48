"""What a semi-supervised (M2) run folder adds to a VAE's: the labelled subset, the M2 pair
built from the ``"m2"`` section, samples one row per class, and the test numbers.

Test numbers at beta = 1, per image, in nats with standard errors over images:

- accuracy of argmax_y q(y | x) against the test labels, s.e. sqrt(a (1 - a) / N);
- ELBO = U(x) = sum_y q(y | x) L(x, y) + H(q(y | x)), the label summed out exactly, z drawn
  once per class; its terms: reconstruction (distortion's negative) and KL over y and z (rate);
- IWAE_K = log sum_y p(y) (1/K) sum_k p(x, z_k | y) / q(z_k | x, y), the label summed out
  exactly (:func:`~ppl_vae.vae.m2_iwae`); both are lower bounds on log p(x).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ppl_vae.data import Dataset, balanced_labelled_subset, mask_labels
from ppl_vae.models import ss_vae as ss_model
from ppl_vae.models.vae import likelihood_mean
from ppl_vae.rng import forked_rng
from ppl_vae.runs.evaluate import evaluate
from ppl_vae.runs.evaluation import Evaluation
from ppl_vae.runs.image_plots import class_rows_figure, reconstructions_figure, save
from ppl_vae.vae import M2, M2Config, VAEConfig, build_m2, m2_iwae

__all__ = [
    "build_run_m2",
    "evaluate_m2",
    "m2_figures",
    "training_labels",
]


def training_labels(
    data: Dataset, m2: M2Config, seed: int, train_subset: int | None = None
) -> Tensor:
    """The training labels of a run: those of ``m2.labels`` images drawn per class, balanced,
    from ``seed`` (among the first ``train_subset`` when given), -1 for the others."""
    labels = data.train.labels[:train_subset] if train_subset else data.train.labels
    keep = balanced_labelled_subset(labels, m2.labels, seed)
    return mask_labels(labels.cpu(), keep).to(labels.device)


def build_run_m2(sections: dict[str, Any], data: Dataset, num_train: int) -> M2:
    """The M2 pair of a run's configuration sections (``"vae"`` and ``"m2"``)."""
    return build_m2(
        VAEConfig.from_dict(sections["vae"]),
        M2Config.from_dict(sections["m2"]),
        data.num_classes,
        num_train,
    )


def evaluate_m2(
    m2: M2,
    images: Tensor,
    labels: Tensor,
    *,
    iwae_samples: int = 1000,
    progress: bool = True,
    seed: int = 0,
) -> Evaluation:
    """The test ELBO and IWAE bound (label summed out) and the accuracy of q(y | x) against
    ``labels``. Active units and KL per dimension are those of q(z | x, y) at the predicted
    label."""
    for net in m2.modules.values():
        net.eval()

    def log_evidence(x: Tensor, num_samples: int, show: bool) -> Tensor:
        return m2_iwae(m2, x, num_samples=num_samples, progress=show).double().cpu()

    result = evaluate(
        m2.model,
        m2.guide,
        images,
        encoder=m2.code_encoder(),
        iwae_samples=iwae_samples,
        seed=seed,
        progress=progress,
        log_evidence=log_evidence,
    )
    accuracy, se = m2.accuracy(images, labels)
    return dataclasses.replace(
        result, accuracy=accuracy, accuracy_se=se, num_classes=m2.num_classes
    )


def m2_figures(
    m2: M2, data: Dataset, path: Path, *, per_class: int = 10, seed: int = 0
) -> list[Path]:
    """samples.png: one row per class, the same codes z ~ N(0, I) in every column (style
    kept, class changed), rows named by class; reconstructions.png: test images and
    E[x | y, z = mu(x, y)] at the predicted label y."""
    for net in m2.modules.values():
        net.eval()
    with forked_rng(seed=seed):
        param = next(m2.decoder.parameters())
        z = torch.randn(per_class, m2.decoder.z_dim, device=param.device, dtype=param.dtype)
    samples = ss_model.generate(m2.decoder, z, likelihood=m2.config.likelihood)
    title = f"{m2.config.dataset}: E[x | y, z], one z ~ N(0, I) per column, one class per row"
    inputs = data.test.images[:50]
    with torch.no_grad():
        predicted = m2.classifier(inputs).argmax(-1)
        mu, _ = m2.encoder(inputs, predicted)
        recons = likelihood_mean(m2.decoder(mu, predicted), m2.config.likelihood)
    return [
        save(
            class_rows_figure(samples, data.image_shape, data.class_names, title=title),
            path / "samples.png",
        ),
        save(
            reconstructions_figure(
                inputs,
                recons,
                data.image_shape,
                title="inputs (odd rows) and E[x | y, mu(x, y)] at the predicted y (even rows)",
            ),
            path / "reconstructions.png",
        ),
    ]
