"""The re-implementation of Pyro's SS-VAE M2 example used by the semi-supervised benchmark:
it learns on the digits, never reads the labels of unlabelled images, computes the M2 bound
it claims, and refuses bad input."""

import importlib
import math
import sys
from pathlib import Path

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

from ppl_vae.errors import ArgumentError, DataError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
m2 = importlib.import_module("pyro_ss_vae_m2")


@pytest.fixture
def one_thread():
    # two torch threads on the two shared cores made the same epoch up to 10x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    # 1,497 training images (10 per class labelled), the last 300 for testing
    return m2.digits_data(labelled_per_class=10, test_size=300, seed=0)


@pytest.mark.slow
def test_learns_to_classify_the_digits(digits, one_thread):
    # 16 epochs of 8 batches: seeds 0-4 then reached 0.38-0.53 (the accuracy swings from epoch
    # to epoch, one labelled batch in eight); two epochs gave 0.09-0.24
    result = m2.train_pyro_m2(*digits, epochs=16, seed=0)
    # A classifier blind to x is right with probability 0.1 per test image (balanced classes):
    # accuracy ~ 0.1 +- sqrt(0.1 * 0.9 / 300) = 0.017; beyond 5 s.d. by chance: p < 3e-7.
    chance, n_test = 0.1, digits[3].shape[0]
    assert result["test_accuracy"] > chance + 5 * math.sqrt(chance * (1 - chance) / n_test)
    assert math.isfinite(result["test_elbo"]) and result["test_elbo"] < 0
    assert len(result["seconds_per_epoch"]) == result["epochs"] == 16
    assert result["settings"]["n_labelled"] == 100
    assert result["settings"]["periodic_interval_batches"] == 1497 // 100


def test_labels_of_unlabelled_images_are_never_read(digits, one_thread):
    x_train, y_train, labelled, x_test, y_test = digits
    scrambled = y_train.clone()
    scrambled[~labelled] = (y_train[~labelled] + 3) % 10
    small = {"epochs": 1, "seed": 1, "hidden": 16, "z_dim": 4}
    first = m2.train_pyro_m2(x_train, y_train, labelled, x_test, y_test, **small)
    second = m2.train_pyro_m2(x_train, scrambled, labelled, x_test, y_test, **small)
    assert (first["test_accuracy"], first["test_elbo"]) == (
        second["test_accuracy"],
        second["test_elbo"],
    )


def _gauss(z, loc, scale):
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def test_unlabelled_bound_sums_the_classes_exactly():
    # ELBO(x) = sum_y q(y|x) [log p(x|y,z_y) + log p(z_y) - log q(z_y|x,y) + log 1/10
    # - log q(y|x)], written out here with the z_y the enumerated guide drew (same seed)
    vae = m2.SSVAEM2(input_size=6, z_dim=3, hidden=[8], aux_loss_multiplier=46.0)
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    guide = config_enumerate(vae.guide, "parallel", expand=True)
    elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    pyro.set_rng_seed(3)
    loss = elbo.loss(vae.model, guide, x)
    pyro.set_rng_seed(3)
    z = poutine.trace(poutine.enum(guide, first_available_dim=-2)).get_trace(x).nodes["z"]
    z = z["value"]  # (10, 5, 3): one z per class
    with torch.no_grad():
        (q,) = vae.encoder_y(x)
        total = torch.zeros(5)
        for c in range(10):
            y = torch.eye(10)[c].expand(5, 10)
            loc, scale = vae.encoder_z(x, y)
            (p,) = vae.decoder(z[c], y)
            log_px = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
            log_pz = _gauss(z[c], torch.zeros(()), torch.ones(()))
            terms = log_px + log_pz - _gauss(z[c], loc, scale) + math.log(0.1) - q[:, c].log()
            total += q[:, c] * terms
    # float32 sums of ~25 nats: agreement to 1e-4 relative leaves room for rounding only
    assert -loss == pytest.approx(total.sum().item(), rel=1e-4)


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda d: d.update(labelled=torch.zeros_like(d["labelled"])), DataError),
        (lambda d: d.update(labelled=torch.arange(len(d["labelled"])) % 3 > 0), ArgumentError),
        (lambda d: d.update(x_train=d["x_train"] * 2), DataError),
        (lambda d: d.update(y_test=d["y_test"].float()), DataError),
        (lambda d: d.update(epochs=0), ArgumentError),
    ],
    ids=["no-labels", "too-many-labels", "not-grey", "float-labels", "zero-epochs"],
)
def test_bad_input_is_refused(digits, change, error):
    names = ("x_train", "y_train", "labelled", "x_test", "y_test")
    call = dict(zip(names, digits, strict=True), epochs=1)
    change(call)
    with pytest.raises(error):
        m2.train_pyro_m2(**call)


def test_a_time_budget_stops_at_the_first_epoch_boundary_past_it(digits, one_thread):
    # budget 0: the first epoch may not start; a budget met after epoch k stops there, so the
    # epochs run take at least the budget and at most one epoch more
    small = {"seed": 1, "hidden": 16, "z_dim": 4}
    none = m2.train_pyro_m2(*digits, epochs=5, max_seconds=0.0, **small)
    assert none["epochs"] == 0 and none["seconds_per_epoch"] == []
    capped = m2.train_pyro_m2(*digits, epochs=3, max_seconds=1e9, **small)
    assert capped["epochs"] == 3
    first = capped["seconds_per_epoch"][0]
    budgeted = m2.train_pyro_m2(*digits, epochs=50, max_seconds=first, **small)
    spent = sum(budgeted["seconds_per_epoch"])
    assert 1 <= budgeted["epochs"] < 50
    assert spent >= first and spent - budgeted["seconds_per_epoch"][-1] < first
