"""Training the semi-supervised VAE (M2): the balanced labelled draw, batches that mix labelled
and unlabelled images with the right weights, accuracy above chance on digits, and the
reliability promises of the VAE (exact resume, signals, the NaN guard) for M2 runs."""

from __future__ import annotations

import math
import os
import signal

import pyro
import pytest
import torch

from ppl_vae import M2Config, TrainConfig, VAEConfig, build_m2, load, train_run
from ppl_vae.data import balanced_labelled_subset, mask_labels
from ppl_vae.errors import DataError, TrainingDivergedError, TrainingInterrupted
from ppl_vae.training import fit
from ppl_vae.training.order import BatchOrder


def test_balanced_draw_per_class_from_the_seed():
    labels = torch.arange(10).repeat_interleave(30)[
        torch.randperm(300, generator=torch.Generator().manual_seed(3))
    ]
    keep = balanced_labelled_subset(labels, 40, seed=1)
    assert torch.bincount(labels[keep], minlength=10).tolist() == [4] * 10
    assert len(set(keep.tolist())) == 40
    assert torch.equal(keep, balanced_labelled_subset(labels, 40, seed=1))
    assert not torch.equal(keep, balanced_labelled_subset(labels, 40, seed=2))
    # 43 = 4 per class and one more for 3 classes.
    counts = torch.bincount(labels[balanced_labelled_subset(labels, 43, seed=1)], minlength=10)
    assert sorted(counts.tolist()) == [4] * 7 + [5] * 3
    masked = mask_labels(labels, keep)
    assert int((masked >= 0).sum()) == 40 and torch.equal(masked[keep], labels[keep])
    with pytest.raises(DataError, match="fewer than the 10 classes"):
        balanced_labelled_subset(labels, 9, seed=0)
    with pytest.raises(DataError, match="has only 30"):
        balanced_labelled_subset(labels, 320, seed=0)


def _order(images, labels, batch, m_l, **settings):
    """The batch order of a mixed set on the CPU, seed 0, no binarisation."""
    return BatchOrder(
        images,
        batch_size=batch,
        seed=0,
        device=torch.device("cpu"),
        dynamic_binarize=False,
        labels=labels,
        labelled_batch=m_l,
        **settings,
    )


def test_each_batch_mixes_both_kinds_and_an_epoch_counts_each_labelled_image_once():
    n, n_l, batch, m_l = 103, 10, 16, 4
    images = torch.rand(n, 3)
    labels = torch.full((n,), -1)
    labelled = torch.arange(0, n, 10)[:n_l]
    labels[labelled] = torch.arange(n_l) % 3
    order = _order(images, labels, batch, m_l)
    steps = math.ceil((n - n_l) / batch)
    assert order.steps_per_epoch == steps
    perm = order.permutation(1)
    seen_unlabelled, weight_of = [], torch.zeros(n, dtype=torch.float64)
    total_images = 0.0
    for index in range(steps):
        b = order.batch(perm, index)
        y, w = b.kwargs["y"], b.kwargs["labelled_weight"]
        rows = [int(torch.nonzero((images == r).all(1))) for r in b.x]
        assert torch.equal(y, labels[rows])  # each row brings its own label, -1 if unknown
        assert int((y >= 0).sum()) == m_l
        seen_unlabelled += [r for r in rows if labels[r] < 0]
        for r in rows:
            if labels[r] >= 0:
                weight_of[r] += w
        total_images += b.images
    assert sorted(seen_unlabelled) == sorted(int(i) for i in torch.nonzero(labels < 0))
    # The labelled images' weights sum to N_l over the epoch: once each in expectation, and
    # exactly once each here, as every labelled image is shown steps * m_l / N_l times
    # (a whole number of permutations when it divides).
    assert math.isclose(float(weight_of.sum()), n_l, rel_tol=1e-12)
    assert math.isclose(total_images, n, rel_tol=1e-12)
    # The order depends on (seed, epoch) only.
    again = order.permutation(1)
    assert all(torch.equal(a, b) for a, b in zip(perm, again, strict=True))


def test_a_given_labelled_weight_weighs_each_labelled_image_in_its_batch():
    """labelled_weight=1: every labelled row of every batch weighs 1, so an epoch counts the
    labelled set steps * m_l times in all (each image steps * m_l / N_l times), and the
    images a step stands for are simply its rows. The M2 setting reads and writes as
    before when it is not set."""
    n, n_l, batch, m_l = 103, 10, 16, 4
    labels = torch.full((n,), -1)
    labels[torch.arange(0, n, 10)[:n_l]] = 1
    order = _order(torch.rand(n, 3), labels, batch, m_l, labelled_weight=1.0)
    perm = order.permutation(1)
    batches = [order.batch(perm, i) for i in range(order.steps_per_epoch)]
    assert all(b.kwargs["labelled_weight"] == 1.0 for b in batches)
    assert sum(b.images for b in batches) == (n - n_l) + order.steps_per_epoch * m_l
    assert "labelled_weight" not in M2Config(labels=10).to_dict()
    assert (
        M2Config.from_dict(M2Config(labels=10, labelled_weight=1.0).to_dict()).labelled_weight == 1
    )
    with pytest.raises(ValueError, match="labelled_weight must be a finite number > 0"):
        M2Config(labels=10, labelled_weight=0.0)


@pytest.fixture(scope="module")
def digits():
    return load("digits", binarize="dynamic", seed=0)


def _m2(digits, seed: int = 0, alpha: float = 10.0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    config = VAEConfig(
        dataset="digits",
        z_dim=4,
        hidden=(64,),
        activation="softplus",
        image_shape=digits.image_shape,
    )
    return build_m2(config, M2Config(labels=50, alpha=alpha), 10, digits.train.images.shape[0])


def _labels(digits):
    keep = balanced_labelled_subset(digits.train.labels, 50, seed=0)
    return mask_labels(digits.train.labels, keep)


def test_accuracy_on_digits_above_chance(tmp_path):
    """Three epochs on digits with 100 labels: test accuracy of q(y | x) above chance (0.1)
    by 5 binomial standard deviations, sqrt(0.1 * 0.9 / 359) = 0.016 (chance passes with
    probability < 3e-7)."""
    run = train_run(
        tmp_path,
        VAEConfig(dataset="digits", z_dim=8, hidden=(128,), activation="softplus"),
        TrainConfig(epochs=3, batch_size=64, elbo="enum", progress=False, threads=1),
        m2=M2Config(labels=100, alpha=10.0),
    )
    test = run.dataset.test
    accuracy = float((run.vae.predict(test.images) == test.labels).double().mean())
    sd = math.sqrt(0.1 * 0.9 / test.labels.numel())
    assert accuracy > 0.1 + 5 * sd, accuracy
    # The run folder's config names the M2 section, and a reload gives the same classifier.
    from ppl_vae import load_run

    again = load_run(tmp_path, checkpoint="last")
    assert again.semi_supervised
    assert torch.equal(again.vae.predict(test.images), run.vae.predict(test.images))


class _SignalAt(torch.nn.Module):
    """The decoder, raising SIGINT in this process at its ``at``-th call in training mode."""

    def __init__(self, decoder, at: int | None = None, poison_after: int | None = None):
        super().__init__()
        self.decoder, self.at, self.poison_after, self.calls = decoder, at, poison_after, 0
        self.z_dim, self.x_dim, self.num_classes = decoder.z_dim, decoder.x_dim, decoder.num_classes
        self.log_sigma = None

    def forward(self, z, y):
        out = self.decoder(z, y)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGINT)
            if self.poison_after is not None and self.calls >= self.poison_after:
                out = out * float("nan")
        return out


def _fit(digits, out, *, wrap=None, resume=None, seed=0):
    m2 = _m2(digits, seed=seed)
    decoder = (wrap or _SignalAt)(m2.decoder)  # the same module names in every run
    model = m2.model.func

    def model_fn(x, **kw):
        return model(x, decoder=decoder, classifier=m2.classifier, alpha=m2.alpha, **kw)

    modules = {**m2.modules, "decoder": decoder}
    config = TrainConfig(epochs=2, batch_size=64, elbo="enum", progress=False, threads=1, seed=3)
    fit(
        model_fn,
        m2.guide,
        digits.train.images[:400],
        config=config,
        modules=modules,
        out_dir=out,
        dynamic_binarize=True,
        train_labels=_labels(digits)[:400],
        labelled_batch=8,
        validation=digits.validation.images[:100],
        resume=resume,
        step_kwargs={"check_data": False},
    )
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def test_m2_interrupted_then_resumed_is_bitwise_exact(digits, tmp_path):
    """SIGINT during step 3 (of 2 x 6): last.ckpt at that step boundary; the resumed run,
    from other initial weights, ends with the uninterrupted run's parameters."""
    expected = _fit(digits, tmp_path / "ref")
    # Decoder calls in training mode: 1 to register the parameters (no labels: the unlabelled
    # branch only), then 2 per step (the labelled and the unlabelled branch): call 6 is in
    # step 3.
    with pytest.raises(TrainingInterrupted):
        _fit(digits, tmp_path / "run", wrap=lambda d: _SignalAt(d, at=6))
    got = _fit(
        digits, tmp_path / "run", resume=tmp_path / "run" / "checkpoints" / "last.ckpt", seed=9
    )
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_m2_nan_stops_and_names_the_site(digits, tmp_path):
    """NaN decoder outputs from call 4 on (step 2's first: see above): the run stops at step
    2 and names an observed site."""
    with pytest.raises(TrainingDivergedError) as info:
        _fit(digits, tmp_path, wrap=lambda d: _SignalAt(d, poison_after=4))
    assert info.value.step == 2
    assert info.value.site in ("x", "x_labelled")


def test_fit_refuses_bad_labels(digits):
    m2 = _m2(digits)
    images = digits.train.images[:100]
    config = TrainConfig(epochs=1, batch_size=32, elbo="enum", progress=False)
    for labels, message in (
        (torch.zeros(99, dtype=torch.int64), "99 labels for 100"),
        (torch.zeros(100), "int64"),
        (torch.full((100,), -2), "-1 for an unlabelled"),
    ):
        with pytest.raises(DataError, match=message):
            fit(m2.model, m2.guide, images, config=config, train_labels=labels)
    with pytest.raises(ValueError, match="free bits"):
        fit(
            m2.model,
            m2.guide,
            images,
            config=TrainConfig(free_bits=1.0),
            train_labels=torch.zeros(100, dtype=torch.int64),
        )
