"""The log-likelihood benchmark's wall-clock budget (``--max-hours``): training stops as on
SIGTERM, the best epoch so far is evaluated, the row says it was the budget, and a rerun
resumes the same run folder. On the digits, with the benchmark's row logic unchanged."""

import argparse
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ppl_vae.training import TrainConfig
from ppl_vae.vae import VAEConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
nll = importlib.import_module("fashion_mnist_nll")

EPOCHS = 10_000  # far more than any budget below allows


def _digits(
    row: str, args: argparse.Namespace, batch_size: int = 200
) -> tuple[VAEConfig, TrainConfig]:
    vae = VAEConfig(dataset="digits", z_dim=2, hidden=(16,))
    train = TrainConfig(epochs=EPOCHS, batch_size=batch_size, seed=0, progress=False, threads=1)
    return vae, train


def _args(tmp_path: Path, hours: float) -> argparse.Namespace:
    return argparse.Namespace(
        max_hours=hours,
        epochs=EPOCHS,
        patience=None,
        warmup_epochs=0,
        iwae_k=4,
        test_images=50,
        device="cpu",
        threads=1,
        engine="eager",
        no_progress=True,
        out=str(tmp_path),
        lr_schedule=None,
        lr_min=0.0,
        seed=0,
    )


def test_the_budget_stops_training_and_the_best_epoch_is_evaluated(tmp_path, monkeypatch):
    monkeypatch.setattr(nll, "_configs", _digits)
    monkeypatch.setattr(nll, "surgery", lambda path: {})
    row = nll.run_row("vae", _args(tmp_path, 3.0 / 3600))  # 3 seconds
    # an epoch of the digits takes milliseconds: the clock, not the epoch count, ended it
    assert row["stopped_by_time_budget_hours"] == pytest.approx(3.0 / 3600)
    assert 1 <= row["epochs"] < EPOCHS and 1 <= row["best_epoch"] <= row["epochs"]
    assert row["test_images"] == 50 and row["iwae_k"] == 4
    # a second budget resumes the same folder where the first one stopped
    again = nll.run_row("vae", _args(tmp_path, 1.0 / 3600))
    assert again["run_path"] == row["run_path"] and again["epochs"] > row["epochs"]


def test_a_learning_rate_schedule_is_a_run_of_its_own(tmp_path):
    """--lr-schedule reaches the row's TrainConfig and names another run folder: a cosine
    run never resumes a constant-rate one of the same row and budget."""
    constant = _args(tmp_path, None)
    cosine = argparse.Namespace(**{**vars(constant), "lr_schedule": "cosine", "lr_min": 1e-5})
    _, train = nll._configs("gated+vamp:500", cosine)
    assert (train.lr_schedule, train.lr_min, train.lr) == ("cosine", 1e-5, 5e-4)
    assert nll._configs("gated+vamp:500", constant)[1].lr_schedule is None
    assert nll.run_folder("vae", cosine) != nll.run_folder("vae", constant)


def test_a_budget_too_short_for_one_epoch_is_refused(tmp_path, monkeypatch):
    # one image a step: an epoch of ~1,300 steps outlasts the budget's first SIGTERMs
    monkeypatch.setattr(nll, "_configs", lambda row, args: _digits(row, args, batch_size=1))
    with pytest.raises(SystemExit, match="no epoch finished within the budget"):
        nll.run_row("vae", _args(tmp_path, 1e-9))


def test_a_sigterm_from_elsewhere_ends_the_benchmark_with_one_line(tmp_path):
    """SIGTERM to the benchmark's process (not its own budget) mid-training: exit 143 and
    one line saying where the checkpoint is, no traceback."""
    root = Path(__file__).resolve().parent.parent
    argv = ["--rows", "vae", "--epochs", str(EPOCHS), "--threads", "1", "--no-progress"]
    argv += ["--out", str(tmp_path), "--results", str(tmp_path / "rows.json")]
    script = (
        "import sys; sys.path[:0] = ['benchmarks', '.']\n"
        "import fashion_mnist_nll as nll; from tests.test_nll_benchmark_budget import _digits\n"
        f"nll._configs = _digits; sys.exit(nll.cli({argv!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root, stderr=subprocess.PIPE)
    history = tmp_path / f"vae_{EPOCHS}ep" / "history.json"
    deadline = time.monotonic() + 120
    while not history.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 143, lines
    assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0], lines
    assert "checkpoint written to" in lines[0], lines
