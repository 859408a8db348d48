"""Datasets as in-memory tensors: loading, binarisation, batches, and the IDX reader.

- :mod:`ppl_vae.data.datasets`: the Split and Dataset containers, :func:`load` (digits,
  MNIST, Fashion-MNIST) and :func:`from_tensors`: validation carved by a seeded permutation,
  "static" or "dynamic" binarisation x ~ Bernoulli(grey level); :data:`CLASS_NAMES`, the
  class names of each dataset by name (``Dataset.class_names`` holds a dataset's own).
- :mod:`ppl_vae.data.batching`: :func:`binarize` and :func:`batches` (one epoch of slices of
  a permutation).
- :mod:`ppl_vae.data.idx`: :func:`read_idx`, the checked IDX reader.
- :mod:`ppl_vae.data.files`: where the IDX files are looked for, what a missing dataset
  says, and :func:`download`.
"""

from ppl_vae.data.batching import batches, binarize
from ppl_vae.data.datasets import (
    BINARIZE_MODES,
    CLASS_NAMES,
    Dataset,
    Split,
    from_tensors,
    load,
)
from ppl_vae.data.files import (
    DATA_ENV_VAR,
    DATASETS,
    DEBIAN_DIRS,
    cache_dir,
    default_search_dirs,
    download,
)
from ppl_vae.data.idx import read_idx
from ppl_vae.data.labelled import UNLABELLED, balanced_labelled_subset, mask_labels

__all__ = [
    "BINARIZE_MODES",
    "CLASS_NAMES",
    "DATASETS",
    "DATA_ENV_VAR",
    "DEBIAN_DIRS",
    "UNLABELLED",
    "Dataset",
    "Split",
    "balanced_labelled_subset",
    "batches",
    "binarize",
    "cache_dir",
    "default_search_dirs",
    "download",
    "from_tensors",
    "load",
    "mask_labels",
    "read_idx",
]
