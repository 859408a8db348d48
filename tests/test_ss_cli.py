"""``ppl-vae train --model m2`` and the commands after it: evaluate (accuracy, bounds with the
label summed out), sample (one row per class, named), report, resume; clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ppl_vae import load_run
from ppl_vae.cli.commands import main
from ppl_vae.data import CLASS_NAMES

TRAIN = [
    "train",
    "--model",
    "m2",
    "--labels",
    "30",
    "--dataset",
    "digits",
    "--z-dim",
    "3",
    "--hidden",
    "32",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--threads",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("m2") / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


def test_train_writes_an_m2_run(m2_run, capsys):
    config = json.loads((m2_run / "config.json").read_text())
    assert config["m2"] == {"labels": 30, "alpha": None, "labelled_batch": 32}
    assert config["train"]["elbo"] == "enum"  # the label summed out unless asked otherwise
    run = load_run(m2_run)
    assert run.semi_supervised and run.vae.num_classes == 10
    # alpha resolved from the default, N / labels, for the training set's N.
    assert run.vae.alpha == pytest.approx(run.dataset.train.images.shape[0] / 30)


def test_evaluate_reports_accuracy_and_the_bounds(m2_run, capsys):
    assert main(["evaluate", str(m2_run), "--iwae-k", "5", "--limit", "60", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy of q(y | x)" in out and "KL(q(y,z|x) || p(y,z))" in out
    saved = json.loads((m2_run / "evaluation.json").read_text())
    run = load_run(m2_run)
    test = run.dataset.test
    with torch.no_grad():
        predicted = run.vae.classifier(test.images[:60]).argmax(-1)
    accuracy = float((predicted == test.labels[:60]).double().mean())
    assert saved["accuracy"] == pytest.approx(accuracy)
    assert saved["accuracy_se"] == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / 60))
    assert saved["n_images"] == 60 and saved["num_classes"] == 10
    assert saved["elbo"] < 0 and saved["iwae"] < 0


def test_sample_writes_class_rows_and_report_runs(m2_run, capsys):
    assert main(["sample", str(m2_run), "--num", "30"]) == 0
    assert (m2_run / "samples.png").stat().st_size > 0
    assert main(["report", str(m2_run)]) == 0
    page = (m2_run / "report" / "index.html").read_text()
    evaluated = (m2_run / "evaluation.json").exists()
    assert ("test accuracy" in page) if evaluated else ("not evaluated yet" in page)
    assert "one code z" in page and "latent_space.png" in page


def test_m2_flags_need_the_model_and_resume_keeps_it(m2_run, tmp_path, capsys):
    code = main(["train", "--labels", "20", "--dataset", "digits", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "--labels applies to --model m2 only" in capsys.readouterr().err
    assert main(["train", "--resume", str(m2_run), "--model", "vae"]) == 5
    assert "it is a m2 run" in capsys.readouterr().err
    assert main(["train", "--resume", str(m2_run), "--labels", "40"]) == 5
    assert "labels" in capsys.readouterr().err
    # A finished run resumed as itself is left as it is.
    assert main(["train", "--resume", str(m2_run), "--model", "m2", "--no-progress"]) == 0


def test_too_few_labels_is_a_clear_error(tmp_path, capsys):
    code = main([*TRAIN[:4], "5", *TRAIN[5:], "--out", str(tmp_path / "few")])
    assert code == 2
    assert "fewer than the 10 classes" in capsys.readouterr().err


def test_class_names_of_fashion_mnist():
    assert CLASS_NAMES["fashion-mnist"][0] == "T-shirt/top"
    assert CLASS_NAMES["fashion-mnist"][9] == "Ankle boot"
