"""The labelled subset of a semi-supervised run: ``count`` training images keep their label,
the same number from every class (the remainder, when C does not divide ``count``, one more
for the first classes of a seeded order), drawn from the seed alone; the others are marked
unlabelled (-1).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ppl_vae.errors import DataError

__all__ = ["UNLABELLED", "balanced_labelled_subset", "mask_labels"]

UNLABELLED = -1
"""The label value of an image whose label is hidden."""

_STREAM_LABELLED = 5  # the seed's stream of the labelled draw (as in ppl_vae.data.datasets)


def balanced_labelled_subset(labels: Tensor, count: int, seed: int) -> Tensor:
    """Indices (sorted, int64) of ``count`` images, balanced over the classes of ``labels``.

    :raises DataError: when ``count`` is below the number of classes or a class has fewer
        images than its share.
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    classes = sorted(set(labels.tolist()))
    if count < len(classes):
        raise DataError(
            f"--labels {count} is fewer than the {len(classes)} classes: a balanced draw needs "
            "at least one labelled image per class"
        )
    rng = np.random.default_rng([seed, _STREAM_LABELLED])
    share, extra = divmod(count, len(classes))
    lucky = set(rng.permutation(len(classes))[:extra].tolist())
    chosen = []
    for k, c in enumerate(classes):
        members = np.flatnonzero(labels.numpy() == c)
        want = share + (k in lucky)
        if want > members.size:
            raise DataError(
                f"--labels {count} asks {want} labelled images of class {c}, which has only "
                f"{members.size} training images"
            )
        chosen.append(rng.choice(members, size=want, replace=False))
    return torch.from_numpy(np.sort(np.concatenate(chosen))).to(torch.int64)


def mask_labels(labels: Tensor, keep: Tensor) -> Tensor:
    """``labels`` with every entry not indexed by ``keep`` set to -1 (int64)."""
    out = torch.full_like(torch.as_tensor(labels, dtype=torch.int64), UNLABELLED)
    out[keep] = torch.as_tensor(labels, dtype=torch.int64)[keep]
    return out
