"""The training benchmark's own rows still run against the library they time: each in-process
row (no peer packages, no compiler) set up and trained for one epoch on a synthetic
"Fashion-MNIST" of a few batches, interleaved as ``run_rows`` does. A renamed class or a
changed signature in ``ppl_vae`` fails here instead of in the next benchmark run."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

from ppl_vae.training.subnormals import flushes_subnormals

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
speed = importlib.import_module("train_speed")
common = importlib.import_module("_common")

# rows that need nothing beyond the project's own dependencies and no compile
ROWS = ["torch", "torch-ftz", "svi-meanfield", "fit", "fit-loop"]


def _synthetic(images: int = 300) -> object:
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(images, 784, generator=gen)
    return common.BenchData(
        train=train,
        train_uint8=(train * 255).round().to(torch.uint8).reshape(-1, 28, 28),
        train_labels=torch.randint(0, 10, (images,), generator=gen),
        test=torch.bernoulli(torch.rand(64, 784, generator=gen), generator=gen),
        source="synthetic",
    )


@pytest.fixture(scope="module")
def timings():
    rows = {row.key: row for row in [*speed.all_rows(), *speed.extra_rows()]}
    chosen = [rows[key] for key in ROWS]
    data = _synthetic()
    result = speed.run_rows(chosen, data, torch.device("cpu"), epochs=1, warmup=0, seed=0)
    return chosen, data, result


def test_every_row_trains_an_epoch_and_is_timed(timings):
    chosen, _, result = timings
    assert [row.skipped for row in chosen] == [None] * len(chosen)
    for row in chosen:
        (epoch,) = result[row.key]
        assert epoch["seconds"] > 0, row.key


def test_every_row_reports_a_finite_test_elbo_below_zero(timings):
    # a Bernoulli likelihood: log p(x | z) <= 0 and KL >= 0, so the ELBO is negative
    chosen, data, _ = timings
    for row in chosen:
        row.enter()
        try:
            value = row.test_elbo(data.test)
        finally:
            row.leave()
        assert value == value and -784 * 10 < value < 0, (row.key, value)


def test_the_float_mode_of_a_row_does_not_leak_into_the_next(timings):
    # torch-ftz and fit-loop flush subnormals around their epochs only
    assert not flushes_subnormals()
