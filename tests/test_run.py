"""Run folders end to end on digits: train, evaluate, sample through the CLI; clear refusals."""

import json

import pytest

from ppl_vae.cli.commands import main
from ppl_vae.errors import CheckpointError, DataError
from ppl_vae.runs import load_run
from ppl_vae.vae import VAEConfig, resolve_binarize

TINY = [
    "--dataset",
    "digits",
    "--z-dim",
    "4",
    "--hidden",
    "32",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--no-progress",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def test_train_writes_the_run_folder(run_dir):
    for name in (
        "config.json",
        "history.csv",
        "history.json",
        "samples.png",
        "reconstructions.png",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
    ):
        assert (run_dir / name).stat().st_size > 0, name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["vae"]["binarize"] == "dynamic"  # the Bernoulli default
    assert config["vae"]["image_shape"] == [1, 8, 8]
    assert len(json.loads((run_dir / "history.json").read_text())) == 2


def test_evaluate_and_sample_round_trip(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--iwae-k", "20", "--limit", "50", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "IWAE, K = 20" in out and "bits/dim" in out and "LOWER bounds" in out
    result = json.loads((run_dir / "evaluation.json").read_text())
    assert result["n_images"] == 50
    assert result["elbo"] == pytest.approx(result["reconstruction"] - result["kl"], abs=1e-4)
    before = (run_dir / "samples.png").read_bytes()
    assert main(["sample", str(run_dir), "--seed", "7"]) == 0
    assert (run_dir / "samples.png").read_bytes() != before  # a new seed, new samples


def test_reloaded_run_has_the_trained_weights(run_dir):
    run = load_run(run_dir, checkpoint="last")
    assert not run.vae.encoder.training
    reloaded = load_run(run_dir, checkpoint="last")
    for a, b in zip(run.vae.decoder.parameters(), reloaded.vae.decoder.parameters(), strict=True):
        assert a.equal(b)


def test_bernoulli_on_grey_levels_is_refused_with_the_fix(tmp_path, capsys):
    assert main(["train", *TINY, "--binarize", "none", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "binarise" in err and "continuous-bernoulli" in err
    with pytest.raises(DataError):
        resolve_binarize("bernoulli", "none")
    assert resolve_binarize("gaussian", None) == "none"
    assert VAEConfig.from_dict(VAEConfig(hidden=(3, 4)).to_dict()).hidden == (3, 4)


def test_evaluate_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        load_run(tmp_path)


def test_help_explains_train_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--dataset",
        "--likelihood",
        "--binarize",
        "--z-dim",
        "--hidden",
        "--batch-size",
        "--lr",
        "--epochs",
        "--beta",
        "--seed",
        "--out",
    ):
        assert flag in out


def test_resume_of_a_finished_run_changes_nothing(run_dir, capsys):
    from ppl_vae.checkpoint import load_checkpoint
    from ppl_vae.runs import resume_run

    before = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    rows = json.loads((run_dir / "history.json").read_text())
    run = resume_run(run_dir, progress=False)
    assert len(run.history) == 2 and json.loads((run_dir / "history.json").read_text()) == rows
    after = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert after.counters == before.counters
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert "trained 2 epochs" in capsys.readouterr().out


def test_train_needs_out_or_resume(tmp_path, capsys):
    assert main(["train", *TINY]) == 2
    assert "--out FOLDER" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
