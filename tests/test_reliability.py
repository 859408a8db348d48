"""Reliability: exact resume after SIGKILL, atomic saves, safe loading, clear errors, the NaN
guard, signals and the configuration guard.

The kill-and-resume tests run the ``ppl-vae`` command (``ppl_vae.cli.commands.main``) in processes
forked from one driver that has imported everything once, so that a dozen killed and resumed
runs take seconds; one test runs the installed console script end to end as well.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import functools
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pyro
import pytest
import torch
from torch import nn

import ppl_vae
from ppl_vae.checkpoint import load_checkpoint, restore
from ppl_vae.cli.commands import main
from ppl_vae.data import datasets as data
from ppl_vae.errors import (
    CheckpointError,
    CheckpointWriteError,
    ConfigMismatchError,
    TrainingDivergedError,
    TrainingInterrupted,
    WriteError,
)
from ppl_vae.guides import vae as vae_guide
from ppl_vae.models import vae as vae_model
from ppl_vae.training import TrainConfig, fit
from ppl_vae.training import loop as train_loop
from ppl_vae.training.guard import PENDING_FLAGS, LossGuard
from ppl_vae.vae import make_networks

ROOT = Path(__file__).resolve().parents[1]

# A tiny run on the digits: 6 steps per epoch, 2 epochs, last.ckpt every 2 steps. A cosine
# learning-rate schedule, a KL warm-up and dynamic binarisation make every piece of state
# matter (scheduler, step counter, the data-order generator, the global RNG).
TINY = [
    "--dataset", "digits", "--z-dim", "2", "--hidden", "16", "--epochs", "2",
    "--batch-size", "32", "--train-subset", "192", "--lr", "0.01", "--lr-schedule", "cosine",
    "--beta", "warmup:10", "--seed", "3", "--threads", "1", "--device", "cpu", "--no-progress",
    "--checkpoint-every", "2",
]  # fmt: skip
SAVES = 2 * (2 + 1)  # last.ckpt writes of the tiny run: 2 within each epoch and 1 at its end

# --------------------------------------------------------------------------------------------
# The driver: forks runs of the command, stops them (SIGKILL, SIGTERM, SIGINT) and resumes them
# --------------------------------------------------------------------------------------------

DRIVER = r'''
import json, os, random, shutil, signal, sys, time
from pathlib import Path

import torch

torch.set_num_threads(1)
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401  (imported once here, not in every run)
import sklearn.datasets  # noqa: F401

import ppl_vae.runs.folder
from ppl_vae.cli import commands as cli
args, root, plan = json.loads(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
# The figures are not part of what is compared; the end-to-end test draws them.
ppl_vae.runs.folder.write_figures = lambda run, **kwargs: []


def child(argv, trap, log):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if trap is not None:  # SIGKILL this process inside its n-th os.replace / os.fsync
        name, n = trap
        real = getattr(os, name)
        calls = [0]

        def trapped(*a, **k):
            if name == "replace" and not str(a[1]).endswith(".ckpt"):
                return real(*a, **k)
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)

        setattr(os, name, trapped)
    try:
        code = cli.main(argv)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(argv, trap, log):
    pid = os.fork()
    if pid == 0:
        child(argv, trap, log)
    return pid


def saves_seen(last, seen):
    try:
        st = os.stat(last)
    except FileNotFoundError:
        return seen
    seen.add((st.st_ino, st.st_mtime_ns))
    return seen


def run_until(pid, stop, rng, last):
    """Wait for the process, sending ``stop`` = [signal name, saves, max delay] once that
    many saves of last.ckpt have been seen; the process's wait status."""
    seen, sent = set(), False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, sent
        if stop is not None and not sent and len(saves_seen(last, seen)) >= stop[1]:
            time.sleep(rng.uniform(0.0, stop[2]))
            os.kill(pid, getattr(signal, stop[0]))
            sent = True
        time.sleep(0.001)


# The uninterrupted reference runs here, in the driver: it also warms every lazy import and
# cache, which the forked runs then share.
t0 = time.perf_counter()
code = cli.main(["train", *args, "--out", str(root / "reference")])
report = [{"name": "reference", "events": [{"code": code, "signal": None, "stop": None,
                                             "seconds": time.perf_counter() - t0}]}]
for item in plan:
    rng = random.Random(item["seed"])
    run = root / item["name"]
    last = run / "checkpoints" / "last.ckpt"
    log = str(root / (item["name"] + ".log"))
    events = []
    argv = ["train", *args, "--out", str(run)]
    for k, stop in enumerate(item["stops"] + [None]):
        trap = stop[1] if stop is not None and stop[0] == "trap" else None
        signal_stop = stop[1] if stop is not None and stop[0] == "signal" else None
        t0 = time.perf_counter()
        status, sent = run_until(launch(argv, trap, log), signal_stop, rng, last)
        event = {
            "stop": stop,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "seconds": time.perf_counter() - t0,
            "files": sorted(p.name for p in (run / "checkpoints").glob("*"))
            if (run / "checkpoints").exists() else [],
        }
        if stop is not None:  # keep what the stop left, to load it in the test
            snapshot = root / "snapshots" / f"{item['name']}-{k}"
            if (run / "checkpoints").exists():
                shutil.copytree(run / "checkpoints", snapshot)
            event["snapshot"] = str(snapshot)
        events.append(event)
        argv = ["train", "--resume", str(run), "--no-progress"]
    report.append({"name": item["name"], "events": events})
(root / "report.json").write_text(json.dumps(report, indent=1))
'''


def _plan() -> list[dict]:
    """10 seeds of SIGKILLs (at a random number of saves plus a random delay, or inside a
    save: in its os.replace or os.fsync; 3 runs killed twice), then one SIGTERM and one
    SIGINT, at points drawn from each seed."""
    plan: list[dict] = []
    kinds = ["timer", "replace", "fsync"]
    for seed in range(10):
        rng = random.Random(1000 + seed)
        stops = []
        for kind in [kinds[seed % 3], *([rng.choice(kinds)] if seed % 3 == 2 else [])]:
            if kind == "timer":
                stops.append(["signal", ["SIGKILL", rng.randint(1, SAVES - 1), 0.004]])
            else:
                # the n-th checkpoint rename (or n-th fsync of any run file) of that process
                stops.append(["trap", [kind, rng.randint(2, SAVES)]])
        plan.append({"name": f"kill{seed}", "seed": seed, "stops": stops})
    for seed, name in ((20, "SIGTERM"), (21, "SIGINT")):
        rng = random.Random(seed)
        stop = ["signal", [name, rng.randint(1, SAVES - 1), 0.004]]
        plan.append({"name": f"{name.lower()}{seed}", "seed": seed, "stops": [stop]})
    return plan


def _console() -> list[str]:
    script = Path(sys.executable).with_name("ppl-vae")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ppl_vae.cli.commands"]


@pytest.fixture(scope="module")
def processes(tmp_path_factory) -> dict:
    """The slow parts, run side by side: the kill-and-resume driver, the installed command
    (SIGTERM once its first checkpoint exists), and the ``python -O`` checks of bad data.
    Returns their results."""
    root = tmp_path_factory.mktemp("killed")
    (root / "driver.py").write_text(DRIVER)
    (root / "checks.py").write_text(UNDER_O)
    t0 = time.perf_counter()

    def start(name: str, command: list[str]) -> subprocess.Popen:
        # Output to files: a full pipe would stall a process nobody reads from yet.
        out, err = (open(root / f"{name}.{kind}", "w") for kind in ("out", "err"))
        with out, err:
            return subprocess.Popen(command, stdout=out, stderr=err, cwd=root)

    def output(name: str) -> tuple[str, str]:
        return tuple((root / f"{name}.{kind}").read_text() for kind in ("out", "err"))

    driver = start(
        "driver",
        [sys.executable, str(root / "driver.py"), json.dumps(TINY), str(root),
         json.dumps(_plan())],
    )  # fmt: skip
    checks = start("checks", [sys.executable, "-O", str(root / "checks.py"), str(root)])
    console_run = root / "console"
    last = console_run / "checkpoints" / "last.ckpt"
    console = start("console", [*_console(), "train", *TINY, "--out", str(console_run)])
    results: dict = {"root": root}
    deadline = time.monotonic() + 300
    while driver.poll() is None or checks.poll() is None or console is not None:
        if time.monotonic() > deadline:
            for process in (driver, checks, console):
                if process is not None:
                    process.kill()
            pytest.fail("the reliability processes did not finish in 300 s")
        if console is not None and "console-stopped" not in results and last.exists():
            console.send_signal(signal.SIGTERM)
            results["console-stopped"] = True
        if console is not None and console.poll() is not None:
            results["console"] = (console.returncode, output("console")[1])
            console = None
        if driver.poll() is not None and "driver-seconds" not in results:
            results["driver-seconds"] = time.perf_counter() - t0
        time.sleep(0.005)
    results.setdefault("driver-seconds", time.perf_counter() - t0)
    assert driver.returncode == 0, output("driver")[1]
    report = json.loads((root / "report.json").read_text())
    results["events"] = {item["name"]: item["events"] for item in report}
    assert checks.returncode == 0, output("checks")[1]
    results["checks"] = json.loads(output("checks")[0].strip().splitlines()[-1])
    results["seconds"] = time.perf_counter() - t0
    return results


@pytest.fixture(scope="module")
def driven(processes) -> tuple[Path, dict[str, list[dict]], float]:
    return processes["root"], dict(processes["events"]), processes["driver-seconds"]


def _state(run: Path, name: str = "last") -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds: parameters, optimizer state, random states."""
    ckpt = load_checkpoint(run / "checkpoints" / f"{name}.ckpt")
    out = {f"param/{k}": v for k, v in ckpt.params.items()}
    for index, state in ckpt.optimizer["state"].items():
        out.update({f"optim/{index}/{k}": v for k, v in state.items()})
    out["rng/torch"] = ckpt.rng["torch"]
    return out


def _history(run: Path) -> list[dict]:
    rows = json.loads((run / "history.json").read_text())
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


def _log(root: Path, name: str) -> str:
    return (root / f"{name}.log").read_text()


def test_sigkill_at_random_steps_then_resume_is_bitwise_exact(driven):
    """Promise 1: >= 10 seeds of SIGKILL (between steps and inside saves), resumed with
    ``ppl-vae train --resume``, end with final parameters (and Adam's state) torch.equal to
    an uninterrupted run's; the history has each epoch once, with the same numbers."""
    root, events, seconds = driven
    reference = events.pop("reference")
    assert reference[0]["code"] == 0, _log(root, "reference")
    expected, expected_best = _state(root / "reference"), _state(root / "reference", "best")
    expected_history = _history(root / "reference")
    assert [row["epoch"] for row in expected_history] == [1, 2]
    kills = 0
    for name, runs in events.items():
        if not name.startswith("kill"):
            continue
        *stopped, final = runs
        kills += sum(e["signal"] == signal.SIGKILL for e in stopped)
        assert final["code"] == 0, f"{name}: {final}\n{_log(root, name)}"
        got = _state(root / name)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"{name}: {key} differs after resuming"
        best = _state(root / name, "best")
        assert all(torch.equal(best[k], v) for k, v in expected_best.items()), name
        assert _history(root / name) == expected_history, name
        leftovers = [p.name for p in (root / name).rglob("*.tmp")]
        assert leftovers == [], f"{name}: temporary files left after resuming: {leftovers}"
    assert kills >= 10, f"only {kills} runs were killed"
    processes = sum(len(runs) for runs in events.values()) + 1
    print(f"kill-and-resume driver: {seconds:.1f} s, {processes} training processes")


def test_after_any_kill_the_checkpoints_under_final_names_load(driven):
    """Promise 2: after every SIGKILL, each ``*.ckpt`` under its final name loads (a kill
    inside a save leaves only a temporary file, which the resume removes), and at least
    two kills landed inside a save."""
    _, events, _ = driven
    inside_a_save = 0
    for runs in events.values():
        for event in runs[:-1]:
            if event["signal"] != signal.SIGKILL:
                continue
            snapshot = Path(event["snapshot"])
            finals = sorted(snapshot.glob("*.ckpt")) if snapshot.exists() else []
            for path in finals:
                load_checkpoint(path)  # raises if partial
            temporary = [p for p in snapshot.glob(".*.tmp")] if snapshot.exists() else []
            if temporary and finals:
                inside_a_save += 1
                # the interrupted save was of a checkpoint that still loads under its name
                assert all(".ckpt." in p.name for p in temporary), temporary
    assert inside_a_save >= 2, f"only {inside_a_save} kills landed inside a save"


@pytest.mark.parametrize("name,signum,code", [
    ("sigterm20", signal.SIGTERM, 143),
    ("sigint21", signal.SIGINT, 130),
])  # fmt: skip
def test_sigterm_and_sigint_checkpoint_and_exit_with_their_code(driven, name, signum, code):
    """Promise 6: SIGTERM / Ctrl-C write a checkpoint at the next step boundary and exit with
    128 + the signal's number; the run then resumes to the uninterrupted result."""
    root, events, _ = driven
    stopped, final = events[name]
    assert stopped["code"] == code, f"{stopped}\n{_log(root, name)}"
    assert f"interrupted by {signal.Signals(signum).name}" in _log(root, name)
    assert "--resume" in _log(root, name)
    snapshot = load_checkpoint(Path(stopped["snapshot"]) / "last.ckpt")
    assert snapshot.counters["step"] >= 1
    assert final["code"] == 0
    expected = _state(root / "reference")
    got = _state(root / name)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert _history(root / name) == _history(root / "reference")


def test_installed_command_sigterm_then_resume(processes, capsys):
    """The console script end to end: SIGTERM once the first checkpoint exists, exit 143
    with one line and no traceback; ``ppl-vae train --resume`` then runs to the end (figures
    included) with the reference's final parameters."""
    root = processes["root"]
    code, err = processes["console"]
    assert code == 143, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    assert main(["train", "--resume", str(root / "console"), "--no-progress"]) == 0
    assert "trained 2 epochs" in capsys.readouterr().out
    expected, got = _state(root / "reference"), _state(root / "console")
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert _history(root / "console") == _history(root / "reference")
    assert (root / "console" / "samples.png").stat().st_size > 0
    print(f"reliability processes: {processes['seconds']:.1f} s side by side")


# --------------------------------------------------------------------------------------------
# In-process runs: the NaN guard, failed saves, the configuration guard
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("digits", binarize="static")


def _vae(ds: data.Dataset, *, seed: int = 0, wrap=None):
    pyro.set_rng_seed(seed)
    encoder, decoder = make_networks(ds.image_shape, 2, (16,))
    if wrap is not None:
        decoder = wrap(decoder)
    model = functools.partial(vae_model.model, decoder=decoder, likelihood="bernoulli")
    guide = functools.partial(vae_guide.guide, encoder=encoder)
    return model, guide, {"encoder": encoder, "decoder": decoder}


def _config(**overrides) -> TrainConfig:
    settings = {"batch_size": 32, "lr": 1e-2, "progress": False, "device": "cpu", "threads": 1}
    return TrainConfig(**{**settings, **overrides})


class _Poisoned(nn.Module):
    """A decoder whose output turns NaN on its ``after``-th call in training mode and later."""

    def __init__(self, decoder: nn.Module, after: int) -> None:
        super().__init__()
        self.inner = decoder
        self.z_dim, self.x_dim = decoder.z_dim, decoder.x_dim
        self.after, self.calls = after, 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.inner(z)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                out = out * float("nan")
        return out


class _BadGradient(nn.Module):
    """A decoder with a scale parameter whose gradient is NaN at step ``at`` (1-based)."""

    def __init__(self, decoder: nn.Module, at: int) -> None:
        super().__init__()
        self.inner = decoder
        self.z_dim, self.x_dim = decoder.z_dim, decoder.x_dim
        self.scale = nn.Parameter(torch.ones(()))
        self.at, self.backwards = at, 0

        def hook(grad: torch.Tensor) -> torch.Tensor:
            self.backwards += 1
            return grad * float("nan") if self.backwards == self.at else grad

        self.scale.register_hook(hook)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner(z) * self.scale


def test_nan_loss_stops_at_its_step_names_the_site_and_keeps_the_checkpoint(digits, tmp_path):
    """Promise 5 (loss): NaN from step 9 on (epoch 2, position 3 of 6): the run stops at step
    9, names site 'x' (its reconstruction term is NaN), and keeps the checkpoint of step 8."""
    # Decoder calls in training mode: 1 to register the parameters, then 1 per step.
    model, guide, modules = _vae(digits, wrap=functools.partial(_Poisoned, after=9))
    with pytest.raises(TrainingDivergedError) as info:
        fit(
            model,
            guide,
            digits.train.images[:192],
            validation=digits.validation.images,
            config=_config(epochs=3, seed=1, checkpoint_every=4),
            modules=modules,
            out_dir=tmp_path,
            step_kwargs={"check_data": False},
        )
    error = info.value
    assert (error.step, error.epoch, error.site) == (9, 2, "x")
    message = str(error)
    assert "step 9 (epoch 2)" in message and "'x'" in message and "NaN" in message
    assert error.checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(error.checkpoint)
    assert saved.counters["step"] == 8 and saved.counters["position"] == 2
    assert all(torch.isfinite(v).all() for v in saved.params.values())


class _CountingPoisoned(_Poisoned):
    """``_Poisoned`` that also counts its calls with gradients on: the training steps run
    (the parameter set-up and the diagnosis run without)."""

    def __init__(self, decoder: nn.Module, after: int) -> None:
        super().__init__(decoder, after)
        self.steps = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.steps += torch.is_grad_enabled()
        return super().forward(z)


BAD_STEP = 27  # epoch 2, position 3 of 24: the end of epoch 1 (step 24) has a checkpoint


def _diverge_lazily(digits, tmp_path, *, device: str, checkpoint_every: int | None):
    """Train 8-image steps (24 per epoch) whose loss is NaN from step 27 on; the error, the
    steps run and the last checkpoint."""
    poison = functools.partial(_CountingPoisoned, after=BAD_STEP)
    model, guide, modules = _vae(digits, wrap=poison)
    config = _config(epochs=3, seed=1, batch_size=8, checkpoint_every=checkpoint_every)
    with pytest.raises(TrainingDivergedError) as info:
        fit(
            model,
            guide,
            digits.train.images[:192],
            validation=digits.validation.images[:64],
            config=TrainConfig.from_dict({**config.to_dict(), "device": device}),
            modules=modules,
            out_dir=tmp_path,
            step_kwargs={"check_data": False},
        )
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    return info.value, modules["decoder"].steps, saved


def _assert_stopped_at_the_bad_step(error, saved, tmp_path) -> None:
    assert (error.step, error.epoch, error.site) == (BAD_STEP, 2, "x")
    assert "step 27 (epoch 2)" in str(error) and "'x'" in str(error)
    assert error.checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert saved.counters["step"] == 24
    tensors = [*saved.params.values()]
    tensors += [v for state in saved.optimizer["state"].values() for v in state.values()]
    assert all(torch.isfinite(t).all() for t in tensors)


@pytest.mark.parametrize(
    ("checkpoint_every", "stops_at"),
    [(None, BAD_STEP + PENDING_FLAGS), (30, 30)],
)
def test_lazy_guard_stops_within_its_window_and_keeps_the_checkpoint(
    digits, tmp_path, monkeypatch, checkpoint_every, stops_at
):
    """Promise 5 (CUDA's path, on this CPU): the guard CUDA uses keeps the epoch's loss on the
    device and reads each step's finiteness flag late. Forced on here, with every flag read as
    late as it allows, a NaN loss at step 27 stops the run when that flag's slot is needed
    again, PENDING_FLAGS steps later, or at the next checkpoint (step 30), which is then not
    written; the error names step 27 and site 'x', and the last checkpoint is step 24's,
    finite."""
    monkeypatch.setattr(train_loop, "LossGuard", functools.partial(LossGuard, lazy=True))
    error, steps, saved = _diverge_lazily(
        digits, tmp_path, device="cpu", checkpoint_every=checkpoint_every
    )
    assert steps == stops_at
    _assert_stopped_at_the_bad_step(error, saved, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nan_loss_on_cuda_names_the_site_and_keeps_the_checkpoint(digits, tmp_path):
    """Promise 5 on CUDA: the guard reads the flags without a sync per step; a NaN loss at
    step 27 stops the run within PENDING_FLAGS steps, naming step 27 and site 'x', and the
    last checkpoint (step 24) holds only finite numbers."""
    error, steps, saved = _diverge_lazily(digits, tmp_path, device="cuda", checkpoint_every=None)
    assert BAD_STEP <= steps <= BAD_STEP + PENDING_FLAGS
    _assert_stopped_at_the_bad_step(error, saved, tmp_path)


def test_nan_gradient_names_the_parameter(digits, tmp_path):
    """Promise 5 (gradient): a NaN gradient of one parameter at step 5 with a finite loss:
    the next step's loss is NaN, and the run stops naming that parameter and step 5."""
    model, guide, modules = _vae(digits, wrap=functools.partial(_BadGradient, at=5))
    with pytest.raises(TrainingDivergedError) as info:
        fit(
            model,
            guide,
            digits.train.images[:192],
            config=_config(epochs=2, seed=2),
            modules=modules,
            out_dir=tmp_path,
            step_kwargs={"check_data": False},
        )
    error = info.value
    assert error.site == "decoder$$$scale" and error.step == 5
    assert "gradient" in str(error) and "'decoder$$$scale'" in str(error)
    assert error.checkpoint is None and "no checkpoint" in str(error)


def test_divergence_through_the_command_exits_3(tmp_path, capsys):
    """Promise 5 (command): an absurd learning rate: exit code 3, one line naming the step
    and the site or parameter, no traceback; the last good checkpoint loads."""
    code = main(["train", *TINY[:-2], "--lr", "1e30", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "training diverged at step" in err and ("site" in err or "parameter" in err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def _interrupting_replace(fail_at: int, error: int):
    """os.replace that fails (like a read-only folder or a full disk) on the n-th .ckpt."""
    real = os.replace
    calls = [0]

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".ckpt"):
            calls[0] += 1
            if calls[0] >= fail_at:
                raise OSError(error, os.strerror(error))
        return real(src, dst, *args, **kwargs)

    return replace


@pytest.mark.parametrize("error", [errno.EROFS, errno.ENOSPC])
def test_a_save_that_fails_stops_training(digits, tmp_path, monkeypatch, error):
    """Promise 2 (failures): a checkpoint that cannot be written raises an error saying so;
    training stops there; the previous checkpoint loads; no temporary file is left."""
    model, guide, modules = _vae(digits)
    monkeypatch.setattr(os, "replace", _interrupting_replace(3, error))
    with pytest.raises(CheckpointWriteError, match=os.strerror(error)) as info:
        fit(
            model,
            guide,
            digits.train.images[:192],
            config=_config(epochs=3, seed=4, checkpoint_every=2),
            modules=modules,
            out_dir=tmp_path,
            step_kwargs={"check_data": False},
        )
    monkeypatch.undo()
    assert "cannot write checkpoint" in str(info.value) and info.value.exit_code == 4
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert saved.counters["step"] == 4  # the second save; the third failed
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []


def test_unwritable_history_is_a_write_error(digits, tmp_path, monkeypatch):
    model, guide, modules = _vae(digits)
    real = tempfile.NamedTemporaryFile

    def full_disk(*args, **kwargs):
        if str(kwargs.get("prefix", "")).startswith(".history"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", full_disk)
    with pytest.raises(WriteError, match="history"):
        fit(
            model,
            guide,
            digits.train.images[:64],
            config=_config(epochs=2, seed=4),
            modules=modules,
            out_dir=tmp_path,
            step_kwargs={"check_data": False},
        )


def test_a_failed_save_through_the_command_exits_4(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "replace", _interrupting_replace(1, errno.EROFS))
    code = main(["train", *TINY, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 4, err
    assert "cannot write checkpoint" in err and "Read-only file system" in err


class _Signaller(nn.Module):
    """A decoder that sends this process SIGINT on its ``at``-th call."""

    sent = False

    def __init__(self, decoder: nn.Module, at: int | None = None) -> None:
        super().__init__()
        self.inner, self.z_dim, self.x_dim = decoder, decoder.z_dim, decoder.x_dim
        self.at, self.calls = at, 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner(z)


def test_signal_in_process_raises_interrupted_after_saving(digits, tmp_path):
    """fit itself: SIGINT during a run writes last.ckpt at the next step boundary and raises
    TrainingInterrupted (a KeyboardInterrupt) with exit code 130; resuming from it in the
    same process gives the uninterrupted run's parameters."""
    images = digits.train.images[:192]
    settings = {"config": _config(epochs=2, seed=5), "step_kwargs": {"check_data": False}}

    pyro.clear_param_store()
    model, guide, modules = _vae(digits, wrap=_Signaller)
    fit(model, guide, images, modules=modules, out_dir=tmp_path / "ref", **settings)
    expected = _state(tmp_path / "ref")

    pyro.clear_param_store()
    # Calls: 1 to register the parameters, then 1 per step: SIGINT during step 3.
    model, guide, modules = _vae(digits, wrap=functools.partial(_Signaller, at=4))
    with pytest.raises(TrainingInterrupted) as info:
        fit(model, guide, images, modules=modules, out_dir=tmp_path / "run", **settings)
    assert isinstance(info.value, KeyboardInterrupt) and info.value.exit_code == 130
    assert "interrupted by SIGINT after step 3" in str(info.value)
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert saved.counters["step"] == 3 and saved.counters["position"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    pyro.clear_param_store()
    model, guide, modules = _vae(digits, seed=99, wrap=_Signaller)  # other weights: restored
    fit(model, guide, images, modules=modules, out_dir=tmp_path / "run", resume=saved, **settings)
    got = _state(tmp_path / "run")
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_lazy_guard_trains_and_resumes_like_the_eager_one(digits, tmp_path, monkeypatch):
    """The lazy path's bookkeeping (the epoch's sum on the device, a skip flag of 0 handed to
    the fused optimizer, the sum saved mid-epoch) changes no number of a finite run: forced
    on, a run stopped by SIGINT after step 2 of 3 and resumed ends with the eager run's
    parameters, Adam's state, random state and history, bitwise."""
    images = digits.train.images[:160]  # 3 steps of 64 per epoch
    config = _config(epochs=2, seed=5, batch_size=64)
    settings = {"config": config, "step_kwargs": {"check_data": False}}
    pyro.clear_param_store()
    model, guide, modules = _vae(digits, wrap=_Signaller)
    fit(model, guide, images, modules=modules, out_dir=tmp_path / "eager", **settings)

    monkeypatch.setattr(train_loop, "LossGuard", functools.partial(LossGuard, lazy=True))
    pyro.clear_param_store()
    # Calls: 1 to register the parameters, then 1 per step: SIGINT during step 2.
    model, guide, modules = _vae(digits, wrap=functools.partial(_Signaller, at=3))
    with pytest.raises(TrainingInterrupted):
        fit(model, guide, images, modules=modules, out_dir=tmp_path / "lazy", **settings)
    saved = load_checkpoint(tmp_path / "lazy" / "checkpoints" / "last.ckpt")
    assert saved.counters["position"] == 2 and saved.state["epoch_total"].dtype == torch.float64
    pyro.clear_param_store()
    model, guide, modules = _vae(digits, seed=99, wrap=_Signaller)
    fit(model, guide, images, modules=modules, out_dir=tmp_path / "lazy", resume=saved, **settings)
    expected, got = _state(tmp_path / "eager"), _state(tmp_path / "lazy")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert _history(tmp_path / "lazy") == _history(tmp_path / "eager")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TINY[:TINY.index("--epochs")], "--epochs", "1",
                 *TINY[TINY.index("--epochs") + 2:], "--out", str(out)]) == 0  # fmt: skip
    return out


def test_resume_with_another_configuration_is_refused(finished_run, capsys):
    """Promise 7: the differences are listed, exit code 5; the run's own values are fine."""
    code = main(["train", "--resume", str(finished_run), "--z-dim", "8", "--lr", "0.1",
                 "--likelihood", "gaussian", "--dataset", "mnist"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 5, err
    for difference in (
        "vae.z_dim: saved 2, asked 8",
        "train.lr: saved 0.01, asked 0.1",
        "vae.likelihood: saved 'bernoulli', asked 'gaussian'",
        "vae.dataset: saved 'digits', asked 'mnist'",
    ):
        assert difference in err
    same = ["--z-dim", "2", "--lr", "0.01", "--beta", "warmup:10", "--hidden", "16"]
    assert main(["train", "--resume", str(finished_run), *same, "--no-progress"]) == 0
    # --beta in its one form: warmup:10:1 is warmup:10; warmup:20 is another run.
    for beta, code in (("warmup:10:1", 0), ("warmup:20", 5)):
        argv = ["train", "--resume", str(finished_run), "--beta", beta, "--no-progress"]
        assert main(argv) == code, beta
    assert "train.beta: saved 'warmup:10', asked 'warmup:20'" in capsys.readouterr().err


def test_fit_refuses_a_checkpoint_of_another_configuration(digits, finished_run):
    ckpt = load_checkpoint(finished_run / "checkpoints" / "last.ckpt")
    recorded = json.loads((finished_run / "config.json").read_text())
    model, guide, modules = _vae(digits)
    config = TrainConfig.from_dict({**recorded["train"], "lr": 0.5, "seed": 7})
    with pytest.raises(ConfigMismatchError) as info:
        fit(
            model,
            guide,
            digits.train.images[:192],
            config=config,
            modules=modules,
            resume=ckpt,
            run_config={k: v for k, v in recorded.items() if k != "train"},
        )
    assert info.value.differences == [
        "train.lr: saved 0.01, asked 0.5",
        "train.seed: saved 3, asked 7",
    ]


def test_an_existing_run_is_not_overwritten_by_accident(finished_run, tmp_path, capsys):
    before = (finished_run / "checkpoints" / "last.ckpt").read_bytes()
    assert main(["train", *TINY, "--out", str(finished_run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (finished_run / "checkpoints" / "last.ckpt").read_bytes() == before
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    assert main(["train", *TINY, "--seed", "4", "--out", str(copy), "--overwrite"]) == 0
    assert json.loads((copy / "config.json").read_text())["train"]["seed"] == 4


# --------------------------------------------------------------------------------------------
# Safe loading and fuzzing of the checkpoint loader
# --------------------------------------------------------------------------------------------


class _Hostile:
    """Unpickling this object creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["pickle", "pickle-protocol-0", "torch.save"])
def test_hostile_checkpoint_in_a_run_is_refused_and_never_runs(finished_run, tmp_path, capsys, how):
    """Promise 3: a run whose last.ckpt is a pickle that would create a marker file: resuming
    (and evaluating) fail with a clear error, exit code 2, and the marker never appears."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_bytes((finished_run / "config.json").read_bytes())
    marker = tmp_path / "pwned"
    payload = {"params": _Hostile(marker)}
    decoy = tmp_path / "decoy"
    pickle.loads(pickle.dumps(_Hostile(decoy)))
    assert decoy.exists()  # the payload is live
    evil = run / "checkpoints" / "last.ckpt"
    if how == "pickle":
        evil.write_bytes(pickle.dumps(payload))
    elif how == "pickle-protocol-0":
        evil.write_bytes(pickle.dumps(payload, protocol=0))
    else:
        torch.save(payload, evil)
        assert zipfile.is_zipfile(evil)
    (run / "checkpoints" / "best.ckpt").write_bytes(evil.read_bytes())
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(evil) in err and "Traceback" not in err
    assert main(["evaluate", str(run), "--no-progress"]) == 2
    assert not marker.exists()


def _resigner(raw: bytes):
    """A function: metadata text -> the same tensors with that text and a valid digest."""
    import hashlib

    import safetensors.torch

    n = int.from_bytes(raw[:8], "little")
    meta = dict(json.loads(raw[8 : 8 + n])["__metadata__"])
    tensors = safetensors.torch.load(raw)
    payload = raw[8 + n :]

    def resign(text: str) -> bytes:
        forged = {**meta, "ppl_vae": text}
        forged["sha256"] = hashlib.sha256(text.encode() + payload).hexdigest()
        return safetensors.torch.save(tensors, forged)

    return resign


def _mutate_json(rng: random.Random, value, depth: int = 0):
    """Replace one random node of a JSON value by a random value of another kind."""
    junk = [None, True, -1, 0, 2**70, 1.5, float("nan"), "", "x", "bogus(1)", [], {}, [1, [2]],
            {"__tensor__": "nope"}, {"__tuple__": 5}, {"__dict__": [[1]]}, "9" * 30]  # fmt: skip
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        if rng.random() < 0.15:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: _mutate_json(rng, value[key], depth + 1)}
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        return [*value[:i], _mutate_json(rng, value[i], depth + 1), *value[i + 1 :]]
    return rng.choice(junk)


def test_fuzz_checkpoint_loader(finished_run, digits, tmp_path):
    """560 random byte strings, damaged checkpoints and well-signed checkpoints with random
    metadata: load_checkpoint either loads or raises CheckpointError, nothing else; a
    loaded one restores or raises CheckpointError."""
    raw = (finished_run / "checkpoints" / "last.ckpt").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    body = json.loads(json.loads(raw[8 : 8 + n])["__metadata__"]["ppl_vae"])
    resign = _resigner(raw)
    rng = random.Random(20240)
    path = tmp_path / "fuzz.ckpt"
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(560):
        kind = case % 4
        if kind == 0:  # random bytes, sometimes with a plausible header length
            blob = rng.randbytes(rng.randrange(0, 3000))
            if blob and rng.random() < 0.5:
                blob = rng.randrange(0, 4000).to_bytes(8, "little") + blob
        elif kind == 1:  # damaged bytes: flips, truncation, insertion
            b = bytearray(raw)
            how = rng.choice(["flip", "truncate", "insert", "header"])
            if how == "flip":
                for _ in range(rng.randint(1, 8)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
            elif how == "truncate":
                del b[rng.randrange(len(b)) :]
            elif how == "insert":
                i = rng.randrange(len(b))
                b[i:i] = rng.randbytes(rng.randint(1, 16))
            else:
                b[rng.randrange(8 + n)] = rng.randrange(256)
            blob = bytes(b)
        else:  # valid digest, hostile or nonsensical metadata
            mutated = body
            for _ in range(rng.randint(1, 3)):
                mutated = _mutate_json(rng, mutated)
            cut = json.dumps(mutated)[: rng.randrange(1, 50)]
            odd = ["[]", "null", "{}", "[" * 5000 + "]" * 5000, cut]
            text = json.dumps(mutated) if kind == 2 else rng.choice(odd)
            blob = resign(text)
        path.write_bytes(blob)
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError:
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        pyro.clear_param_store()
        _, _, modules = _vae(digits, seed=0)
        with contextlib.suppress(CheckpointError):
            restore(ckpt, modules=modules)
    print(f"checkpoint fuzz: {outcomes}")
    assert outcomes["refused"] > 500, outcomes


# --------------------------------------------------------------------------------------------
# Bad data: typed errors naming the file or tensor and the fix, also under python -O
# --------------------------------------------------------------------------------------------

UNDER_O = r"""
import json, struct, sys
from pathlib import Path

import torch

from ppl_vae.checkpoint.format import load_checkpoint
from ppl_vae.data import read_idx
from ppl_vae.errors import CheckpointError, DataError
from ppl_vae.models.vae import check_data

folder = Path(sys.argv[1])
results = {"debug": __debug__}


def expect(name, error, call):
    try:
        call()
    except error as exc:
        results[name] = str(exc)
    else:
        results[name] = None


good = struct.pack(">IIII", 0x803, 2, 2, 2) + bytes(8)
files = {
    "truncated": good[:-3],
    "empty": b"",
    "wrong-magic": struct.pack(">IIII", 0x804, 2, 2, 2) + bytes(8),
    "wrong-count": struct.pack(">IIII", 0x803, 5, 2, 2) + bytes(8),
}
for name, raw in files.items():
    path = folder / f"{name}-images-idx3-ubyte"
    path.write_bytes(raw)
    expect(name, DataError, lambda path=path: read_idx(path, "images", fix="get a fresh copy"))
x = torch.zeros(4, 3)
expect("nan", DataError, lambda: check_data(x.clone().fill_(float("nan")), name="train_x"))
expect("inf", DataError, lambda: check_data(x + float("inf"), name="train_x"))
expect("shape", DataError, lambda: check_data(torch.zeros(4), name="train_x"))
expect("columns", DataError, lambda: check_data(x, x_dim=5, name="train_x"))
expect("non-binary", DataError, lambda: check_data(x + 0.5, likelihood="bernoulli", name="train_x"))
(folder / "evil.ckpt").write_bytes(b"\x80\x04K\x01.")
expect("pickle", CheckpointError, lambda: load_checkpoint(folder / "evil.ckpt"))
print(json.dumps(results))
"""


def test_bad_data_raise_typed_errors_under_python_O(processes):
    """Promise 4: truncated, empty, wrong-magic and wrong-count IDX files, NaN/inf, wrong
    shapes and non-binary data for a Bernoulli raise DataError naming the file or tensor and
    the fix, with assertions off (``python -O``)."""
    results = dict(processes["checks"])
    assert results.pop("debug") is False
    for name in ("truncated", "empty", "wrong-magic", "wrong-count"):
        message = results[name]
        assert message and f"{name}-images-idx3-ubyte" in message, (name, message)
        assert "get a fresh copy" in message, (name, message)
    for name in ("nan", "inf", "shape", "columns", "non-binary"):
        assert results[name] and "train_x" in results[name], (name, results[name])
    assert "NaN or inf" in results["nan"] and "clean" in results["nan"]
    assert "reshape" in results["shape"]
    assert "--binarize" in results["non-binary"]
    assert results["pickle"] and "pickle" in results["pickle"]


def test_no_bare_assert_in_the_package():
    """Validation must not vanish under ``python -O``: the package has no assert statements."""
    folders = [Path(ppl_vae.__file__).parent, ROOT / "models", ROOT / "guides"]
    found = []
    for folder in folders:
        for source in sorted(folder.rglob("*.py")):
            tree = ast.parse(source.read_text(), filename=str(source))
            found += [
                f"{source}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.Assert)
            ]
    assert found == []
