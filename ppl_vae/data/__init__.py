"""Datasets as in-memory tensors: loading, binarisation, batches, and the IDX reader."""
