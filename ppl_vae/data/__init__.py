"""Datasets as in-memory tensors: loading, binarisation, batches, and the IDX reader."""

from ppl_vae.data.datasets import (
    BINARIZE_MODES,
    DATA_ENV_VAR,
    DATASETS,
    DEBIAN_DIRS,
    Dataset,
    Split,
    batches,
    binarize,
    cache_dir,
    default_search_dirs,
    download,
    from_tensors,
    load,
    read_idx,
)

__all__ = [
    "BINARIZE_MODES",
    "DATASETS",
    "DATA_ENV_VAR",
    "DEBIAN_DIRS",
    "Dataset",
    "Split",
    "batches",
    "binarize",
    "cache_dir",
    "default_search_dirs",
    "download",
    "from_tensors",
    "load",
    "read_idx",
]
