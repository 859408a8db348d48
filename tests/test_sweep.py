"""The beta sweep on digits: one run per beta, evaluated at beta = 1, a table and the plane."""

import argparse
import contextlib
import csv
import io
import json

import pytest

from ppl_vae import sweep
from ppl_vae.sweep import SWEEP_COLUMNS, SweepRow, format_table, parse_betas, read_sweep

TINY = [
    "--dataset",
    "digits",
    "--z-dim",
    "2",
    "--hidden",
    "16",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--train-subset",
    "200",
    "--iwae-k",
    "5",
    "--test-images",
    "30",
    "--no-progress",
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl-vae")
    sweep.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """(sweep folder, what the command printed)."""
    out = tmp_path_factory.mktemp("sweep")
    args = _parser().parse_args(["sweep", *TINY, "--beta", "0.5,2", "--out", str(out)])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert args.handler(args) == 0
    return out, printed.getvalue()


def test_sweep_writes_one_evaluated_run_per_beta_and_the_table(swept):
    sweep_dir, out = swept
    for name in ("sweep.csv", "sweep.json", "rate_distortion.png"):
        assert (sweep_dir / name).stat().st_size > 0, name
    for beta in ("0.5", "2"):
        run = sweep_dir / f"beta={beta}"
        config = json.loads((run / "config.json").read_text())
        assert config["beta"] == beta and config["train"]["beta"] == float(beta)
        assert config["train"]["seed"] == 0 and config["train"]["epochs"] == 1
        evaluation = json.loads((run / "evaluation.json").read_text())
        assert evaluation["iwae_k"] == 5 and evaluation["n_images"] == 30
    with (sweep_dir / "sweep.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == SWEEP_COLUMNS
    assert [float(r["beta"]) for r in table] == [0.5, 2.0]
    rows = read_sweep(sweep_dir)
    assert [r.beta for r in rows] == [0.5, 2.0]
    for row in rows:
        # Evaluated at beta = 1: ELBO = -(D + R), and the rate splits by ELBO surgery.
        assert row.elbo == pytest.approx(-(row.distortion + row.rate), abs=1e-4)
        assert row.mutual_info + row.marginal_kl == pytest.approx(row.rate, abs=0.05)
        assert row.iwae_k == 5 and row.n_images == 30 and row.z_dim == 2
        assert row.rate >= 0
    assert rows[0].rate != rows[1].rate  # a different beta, a different model
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    assert meta["betas"] == [0.5, 2.0] and meta["vae"]["dataset"] == "digits"
    assert "beta = 0.5" in out and "rate R" in out and "ppl-vae report" in out


def test_rows_round_trip_and_print():
    row = SweepRow(1.0, 2.0, 30.0, -32.0, float("nan"), -31.0, 0.1, 10, None, 4, 1.5, 0.5, 20, "b")
    assert SweepRow.from_dict(row.to_dict()).to_dict() == row.to_dict()
    assert row.to_dict()["elbo_se"] is None
    assert (
        SweepRow.from_dict({k: str(v) for k, v in row.to_dict().items() if v is not None}).beta
        == 1.0
    )
    text = format_table([row])
    assert "I_q(x;z)" in text and "K = 10" in text


def test_betas_are_parsed_and_checked():
    assert parse_betas("0.1, 0.25,1") == (0.1, 0.25, 1.0)
    assert parse_betas([2, 0]) == (2.0, 0.0)
    for bad, message in (
        ("", "no beta"),
        ("a,1", "bad betas"),
        ("-1", ">= 0"),
        ("1,1.0", "repeat"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_betas(bad)
    with pytest.raises(SystemExit):
        _parser().parse_args(["sweep", "--beta", "1,-2", "--out", "x"])


def test_help_describes_the_sweep(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["sweep", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--beta", "--iwae-k", "--test-images", "--train-subset", "--out"):
        assert flag in text
    assert "rate" in text and "distortion" in text
