"""Training with subnormal floats read as zero (``TrainConfig.flush_subnormals``).

The oracle for "flushes" is float32 arithmetic itself: 2^-127 is subnormal, so with the
CPU's modes a product that yields it, or reads it, gives exactly 0, and without them it
does not. The training check is on a real run: the parameters of a run with the modes are
those of a run without them, bit for bit, while Adam's first moments of the run without
them hold subnormals (the reason for the modes) and those of the run with them hold none.
"""

from __future__ import annotations

import functools
import json

import pyro
import pytest
import torch

from ppl_vae.checkpoint import load_checkpoint
from ppl_vae.data import datasets as data
from ppl_vae.guides import vae as vae_guide
from ppl_vae.models import vae as vae_model
from ppl_vae.training import TrainConfig, fit
from ppl_vae.training.subnormals import flushes_subnormals, flushing_subnormals
from ppl_vae.vae import make_networks

SUBNORMAL = 2.0**-127  # below float32's smallest normal, 2^-126
TINY = torch.finfo(torch.float32).tiny


def _subnormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < TINY)).sum())


def _this_thread_flushes() -> bool:
    # 2^-126 * 0.5 is the subnormal 2^-127 in IEEE arithmetic, 0 when results are flushed.
    return torch.tensor([TINY]).mul(0.5).item() == 0.0


def test_the_block_flushes_on_this_thread_and_puts_the_mode_back():
    assert not _this_thread_flushes()
    with flushing_subnormals() as flushing:
        assert flushing and _this_thread_flushes() and flushes_subnormals()
    assert not _this_thread_flushes() and not flushes_subnormals()
    with flushing_subnormals(False) as flushing:
        assert not flushing and not _this_thread_flushes()


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs two torch threads")
def test_torch_worker_threads_flush_too_and_are_put_back():
    """A parallel kernel splits the tensor between the threads: every element, whichever
    thread computes it, reads its subnormal input as 0 (with only the calling thread's mode
    set, the other thread's share would stay 2^-127). The digits come through scikit-learn,
    which loads an OpenMP runtime of its own beside torch's: the mode must reach torch's."""
    data.load("digits")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.full((1 << 22,), SUBNORMAL)  # written, not computed: subnormal in memory
        assert _subnormals(x) == x.numel()
        with flushing_subnormals():
            inside = x * 1.0
        outside = x * 1.0
    finally:
        torch.set_num_threads(before)
    assert int((inside == 0).sum()) == x.numel()
    assert torch.equal(outside, x)


def _digits_run(ds, tmp_path, *, flush: bool):
    """40 epochs of 20 steps of a small VAE on static-binarised digits; its parameters and
    Adam's first moments at the end. Edge pixels that are seldom on give weights whose
    gradient is seldom non-zero: their first moment decays by 0.9 a step into subnormals."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    encoder, decoder = make_networks(ds.image_shape, 4, (32,))
    config = TrainConfig(
        epochs=40,
        batch_size=64,
        lr=1e-2,
        progress=False,
        device="cpu",
        threads=1,
        flush_subnormals=flush,
    )
    out = tmp_path / ("flush" if flush else "keep")
    fit(
        functools.partial(vae_model.model, decoder=decoder),
        functools.partial(vae_guide.guide, encoder=encoder),
        ds.train.images[:1280],
        config=config,
        modules={"encoder": encoder, "decoder": decoder},
        step_kwargs={"check_data": False},
        out_dir=out,
    )
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    state = load_checkpoint(out / "checkpoints" / "last.ckpt").optimizer["state"]
    moments = [s["exp_avg"] for s in state.values()]
    return params, moments, json.loads((out / "config.json").read_text())


def test_flushing_changes_no_parameter_and_removes_the_subnormal_moments(tmp_path):
    ds = data.load("digits", binarize="static")
    kept, kept_moments, kept_config = _digits_run(ds, tmp_path, flush=False)
    flushed, flushed_moments, flushed_config = _digits_run(ds, tmp_path, flush=True)
    assert sum(_subnormals(m) for m in kept_moments) > 0  # the case the modes are for
    assert sum(_subnormals(m) for m in flushed_moments) == 0
    assert kept.keys() == flushed.keys()
    assert all(torch.equal(kept[k], flushed[k]) for k in kept)
    assert kept_config["train"]["flush_subnormals"] is False
    assert flushed_config["train"]["flush_subnormals"] is True
    assert not _this_thread_flushes()  # fit put the mode back


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_the_setting_is_a_bool(value):
    with pytest.raises(ValueError, match="flush_subnormals must be True or False"):
        TrainConfig(flush_subnormals=value)


def test_the_cli_flag_keeps_them_and_a_resume_may_change_it(tmp_path, capsys):
    from ppl_vae.cli import main

    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--z-dim", "2", "--hidden", "16"]

    def saved() -> bool:
        return json.loads((out / "config.json").read_text())["train"]["flush_subnormals"]

    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    assert saved() is True
    assert main(["train", "--resume", str(out), "--keep-subnormals", "--no-progress"]) == 0
    assert saved() is False
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert saved() is False  # not given: the run's own setting
    assert (
        main([*argv, "--no-progress", "--keep-subnormals", "--out", str(out), "--overwrite"]) == 0
    )
    assert saved() is False
    capsys.readouterr()
