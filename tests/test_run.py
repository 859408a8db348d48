"""Run folders end to end on digits: train, evaluate, sample through the CLI; clear refusals."""

import json
import shutil

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


def test_resume_compares_beta_in_its_one_form(run_dir, capsys):
    """The run's beta (the default) is saved as 1.0: --beta 1, 1.0 or none resume it; 2 is
    another run, refused with exit code 5."""
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["beta"] == 1.0 and "beta" not in config
    for beta in (["--beta", "1"], ["--beta", "1.0"], []):
        assert main(["train", "--resume", str(run_dir), *beta, "--no-progress"]) == 0, beta
    assert main(["train", "--resume", str(run_dir), "--beta", "2", "--no-progress"]) == 5
    assert "train.beta: saved 1.0, asked 2.0" in capsys.readouterr().err


def test_a_config_edited_by_hand_is_refused_on_resume(run_dir, tmp_path, capsys):
    """config.json no longer holds the configuration the checkpoint was written with: the
    resume is refused (exit 5), saying so, and nothing is written."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["train"]["lr"] = 0.5
    (run / "config.json").write_text(json.dumps(config))
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 5
    err = capsys.readouterr().err
    assert "was changed since it was written" in err and str(run / "config.json") in err
    assert len(err.strip().splitlines()) == 1
    assert json.loads((run / "config.json").read_text()) == config
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before


def test_a_run_with_a_schedule_function_loads_but_resume_run_refuses_it(run_dir, tmp_path):
    """config.json says "beta": null for a beta schedule given to fit as a Python function:
    the run loads (evaluate, report), and resume_run refuses it, pointing to fit."""
    from ppl_vae.runs import resume_run

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["train"]["beta"] = None
    (run / "config.json").write_text(json.dumps(config))
    assert load_run(run, checkpoint="last").train_config.beta == 1.0
    with pytest.raises(CheckpointError, match=r"Python function.*fit\(\.\.\., resume=\.\.\.\)"):
        resume_run(run, progress=False)


def test_train_needs_out_or_resume(tmp_path, capsys):
    assert main(["train", *TINY]) == 2
    assert "--out FOLDER" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
