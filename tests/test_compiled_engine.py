"""The compiled engine (``TrainConfig.engine="compiled"``) against the eager one, Pyro's own
``differentiable_loss`` and backward at every step, as the oracle.

The captured graph, replayed as it is (``CompiledStep.inductor = False``), must give the eager
run's parameters bitwise: the same operations in the same order, the same draws. Through
inductor, which fuses and reassociates arithmetic, the runs agree to rounding: in float64 the
bound below is derived from the unit roundoff. Pairs that cannot be captured train eagerly
after one warning, with the eager run's numbers exactly.
"""

from __future__ import annotations

import functools
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppl_vae.checkpoint import load_checkpoint
from ppl_vae.data import datasets as data
from ppl_vae.errors import EngineFallbackWarning, TrainingDivergedError
from ppl_vae.guides import vae as vae_guide
from ppl_vae.models import vae as vae_model
from ppl_vae.training import TrainConfig, fit
from ppl_vae.training.compiled import CompiledStep
from ppl_vae.training.engine import Engine
from ppl_vae.vae import make_networks

NO_CHECKS = {"check_data": False}


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("digits", binarize="static")


@pytest.fixture
def replay_only(monkeypatch):
    """The captured graphs replayed as captured, without inductor."""
    monkeypatch.setattr(CompiledStep, "inductor", False)


def _run(ds, engine, *, dtype=torch.float32, out_dir=None, resume=None, images=256, **settings):
    """Two epochs of 4 steps on digits from seed 0 (fresh param store); the final parameters
    and the history."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    encoder, decoder = make_networks(ds.image_shape, 4, (32,))
    encoder.to(dtype), decoder.to(dtype)
    model = functools.partial(vae_model.model, decoder=decoder)
    guide = functools.partial(vae_guide.guide, encoder=encoder)
    config = {"epochs": 2, "batch_size": 64, "lr": 1e-2, "progress": False, "threads": 1}
    history = fit(
        model,
        guide,
        ds.train.images[:images].to(dtype),
        config=TrainConfig(**{**config, **settings}, device="cpu", engine=engine),
        modules={"encoder": encoder, "decoder": decoder},
        dynamic_binarize=False,
        step_kwargs=NO_CHECKS,
        out_dir=out_dir,
        resume=resume,
    )
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    return params, history


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"beta": "warmup:5"},  # beta a tensor input, changing every step
        {"beta": 0.5},
        {"num_particles": 3},
        {"elbo": "trace"},
        {"objective": "iwae:4"},
        {"objective": "dreg:4"},  # the model run twice per step, one pass detached
        {"precision": "bfloat16"},
    ],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults",
)
def test_the_captured_graph_replays_the_eager_steps_bitwise(digits, replay_only, settings):
    """After 8 steps (the first eager, the others replayed, the last batch of each epoch its
    own graph when smaller) every parameter and the history's training objective are
    bitwise the eager run's: the graph holds Pyro's operations and draws from the same
    stream in the same order."""
    eager, eager_history = _run(digits, "eager", images=250, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)  # captured, not fallen back
        compiled, history = _run(digits, "compiled", images=250, **settings)
    assert _equal(eager, compiled)
    assert history.column("train_objective") == pytest.approx(
        eager_history.column("train_objective"), rel=1e-6
    )  # the loss's value: Pyro adds a float copy, here a float32 tensor


def test_inductor_graph_matches_the_eager_run_to_float64_rounding(digits):
    """Through inductor, in float64. Bound: the reassociated sums hold n <= 64 * 64 terms, so
    each gradient moves by at most n * u (u = 1.1e-16) relative; Adam's step is at most lr
    and scale-free, so S = 8 steps move a parameter by at most S * lr * n * u = 3.6e-14;
    the test allows 100 times that for Adam's 1/sqrt(v) on the smallest gradients."""
    eager, _ = _run(digits, "eager", dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)  # compiled, not fallen back
        compiled, _ = _run(digits, "compiled", dtype=torch.float64)
    bound = 100 * 8 * 1e-2 * 64 * 64 * 1.1e-16
    worst = max(float((eager[k] - compiled[k]).abs().max()) for k in eager)
    assert worst <= bound


def test_a_resumed_compiled_run_ends_where_the_uninterrupted_one_did(
    digits, replay_only, tmp_path, monkeypatch
):
    """The checkpoint after epoch 1 of an eager run, resumed with the compiled engine (a
    runtime setting), ends with the uninterrupted run's parameters."""
    import ppl_vae.training.files as files_module

    saved = []
    real_save = files_module.save_checkpoint

    def keep(path, **kwargs):
        out = real_save(path, **kwargs)
        copy = tmp_path / "kept" / f"{len(saved):02d}-{path.name}"
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(path.read_bytes())
        saved.append(copy)
        return out

    monkeypatch.setattr(files_module, "save_checkpoint", keep)
    expected, _ = _run(digits, "eager", out_dir=tmp_path / "run")
    first_epoch = load_checkpoint(next(p for p in saved if p.name.endswith("last.ckpt")))
    assert first_epoch.counters["step"] == 4
    resumed, history = _run(digits, "compiled", out_dir=tmp_path / "run", resume=first_epoch)
    assert _equal(expected, resumed) and len(history) == 2


class _Shifted(nn.Module):
    """A decoder that adds a tensor held outside the param store (a buffer)."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder, self.z_dim, self.x_dim = decoder, decoder.z_dim, decoder.x_dim
        self.register_buffer("shift", torch.zeros(decoder.x_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z) + self.shift


def _fallback_run(ds, engine, case):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    encoder, decoder = make_networks(ds.image_shape, 4, (32,))
    kwargs, settings = dict(NO_CHECKS), {}
    if case == "check_data":
        kwargs = {}  # the model's own per-step check reads the data's min and max
    elif case == "free_bits":
        settings = {"free_bits": 0.5}  # decides per step whether KL < lambda
    elif case == "buffer":
        decoder = _Shifted(decoder)
    model = functools.partial(vae_model.model, decoder=decoder)
    guide = functools.partial(vae_guide.guide, encoder=encoder)
    config = TrainConfig(
        epochs=1, batch_size=64, progress=False, threads=1, device="cpu", engine=engine, **settings
    )
    fit(
        model,
        guide,
        ds.train.images[:256],
        config=config,
        modules={"encoder": encoder, "decoder": decoder},
        step_kwargs=kwargs,
    )
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("check_data", r"reads a tensor's value in Python.*models/vae\.py"),
        ("free_bits", r"reads a tensor's value in Python.*elbo/beta\.py"),
        ("buffer", r"neither a parameter in Pyro's param store nor an argument"),
    ],
)
def test_a_step_that_cannot_be_captured_trains_eagerly_after_one_warning(digits, case, says):
    """A per-step data check, free bits' per-step branch, a module buffer the graph would
    freeze: one warning naming why (and where), then the eager run's numbers exactly."""
    expected = _fallback_run(digits, "eager", case)
    with pytest.warns(EngineFallbackWarning, match=says) as caught:
        got = _fallback_run(digits, "compiled", case)
    assert len([w for w in caught if issubclass(w.category, EngineFallbackWarning)]) == 1
    assert _equal(expected, got)


def test_boolean_indexing_is_refused_as_a_value_dependent_shape():
    """A model that selects rows by their values makes shapes no fixed graph has."""
    pyro.clear_param_store()
    loc = torch.zeros(3, requires_grad=True)

    def model(x):
        keep = x[x.sum(-1) > 0]
        with pyro.plate("rows", keep.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=keep)

    def loss_of(x):
        return pyro.infer.Trace_ELBO().differentiable_loss(model, lambda x: None, x)

    step = CompiledStep(loss_of, [loc], torch.device("cpu"))
    with pytest.raises(Exception, match="shape depends on values") as info:
        step(torch.randn(8, 3), {})
    assert type(info.value).__name__ == "CaptureRefused"


def test_a_nan_loss_from_the_compiled_step_stops_the_run(digits, replay_only, monkeypatch):
    """A parameter turned NaN in place after the third update: the graph reads it as it is,
    and the loop's guard stops the run with the eager engine's diagnosis."""
    update = Engine.update

    def poisoning(self, skip=None):
        update(self, skip)
        self.updates = getattr(self, "updates", 0) + 1
        if self.updates == 3:
            with torch.no_grad():
                self.params[0].fill_(float("nan"))

    monkeypatch.setattr(Engine, "update", poisoning)
    messages = []
    for engine in ("eager", "compiled"):
        with pytest.raises(TrainingDivergedError, match="training diverged at step 3") as info:
            _run(digits, engine)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_a_parameter_the_loss_never_reads_keeps_no_gradient(digits, replay_only):
    """A param registered but unused: the eager step leaves its ``.grad`` None (Adam skips
    it); the graph computes no gradient for it, and the rest trains bitwise as eagerly."""

    def run(engine):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        encoder, decoder = make_networks(digits.image_shape, 4, (32,))
        model = functools.partial(vae_model.model, decoder=decoder)

        def guide(x, **kwargs):
            pyro.param("unused", torch.ones(3))
            vae_guide.guide(x, encoder=encoder, **kwargs)

        config = TrainConfig(
            epochs=1, batch_size=64, progress=False, threads=1, device="cpu", engine=engine
        )
        fit(model, guide, digits.train.images[:256], config=config, step_kwargs=NO_CHECKS)
        return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    eager, compiled = run("eager"), run("compiled")
    assert torch.equal(compiled["unused"], torch.ones(3))
    assert _equal(eager, compiled)


def test_sigterm_during_a_compiled_run_checkpoints_and_resumes_to_the_same_end(
    digits, replay_only, tmp_path, monkeypatch
):
    """SIGTERM after the fifth update (a compiled step): the loop stops at that step
    boundary with one checkpoint and exit code 143; resumed, it ends bitwise where the run
    never stopped ends."""
    import os
    import signal

    from ppl_vae.errors import TrainingInterrupted

    expected, _ = _run(digits, "compiled")
    update = Engine.update

    def signalling(self, skip=None):
        update(self, skip)
        self.updates = getattr(self, "updates", 0) + 1
        if self.updates == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Engine, "update", signalling)
    with pytest.raises(TrainingInterrupted) as info:
        _run(digits, "compiled", out_dir=tmp_path)
    assert info.value.exit_code == 143
    monkeypatch.setattr(Engine, "update", update)  # (undo() would also drop replay_only)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint.counters["step"] == 5
    resumed, history = _run(digits, "compiled", out_dir=tmp_path, resume=checkpoint)
    assert _equal(expected, resumed) and len(history) == 2


def test_a_keyword_that_changes_every_step_is_refused_not_recompiled():
    """A Python number that differs at every call would need a graph per step: after
    MAX_GRAPHS graphs the step is refused, naming the keyword that changes."""
    from ppl_vae.training.compiled import MAX_GRAPHS, CaptureRefused

    pyro.clear_param_store()
    loc = torch.zeros(3, requires_grad=True)

    def loss_of(x, scale, check):
        return ((x - loc) ** 2).sum() * scale

    step = CompiledStep(loss_of, [loc], torch.device("cpu"))
    step.inductor = False
    x = torch.randn(4, 3)
    for call in range(MAX_GRAPHS):
        _, (grad,) = step(x, {"scale": 1.0 + call, "check": False})
        torch.testing.assert_close(grad, -2 * (1.0 + call) * (x - loc).sum(0).detach())
    with pytest.raises(CaptureRefused, match=r"keyword values \['scale'\] change"):
        step(x, {"scale": 100.0, "check": False})
    assert len(step.graphs) == MAX_GRAPHS


def test_the_command_line_compiles_and_says_a_fallback_in_one_line(tmp_path, capsys):
    """``ppl-vae train --compile`` records engine="compiled" in config.json; with free bits
    the step cannot be captured, and the command says so in one line, then trains eagerly."""
    import json

    from ppl_vae.cli.commands import main

    args = ["train", "--dataset", "digits", "--epochs", "1", "--threads", "1", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("default", EngineFallbackWarning)  # as outside pytest
        code = main([*args, "--compile", "--free-bits", "0.5", "--out", str(tmp_path / "a")])
    assert code == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("ppl-vae train: warning: engine='compiled'")
    assert "elbo/beta.py" in lines[0] and "training with the eager engine" in lines[0]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["train"]["engine"] == "compiled"
    with pytest.raises(SystemExit):  # one or the other
        main([*args, "--compile", "--engine", "eager", "--out", str(tmp_path / "b")])
