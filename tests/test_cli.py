"""The ``ppl-vae`` command: check on a pair the user just wrote, demo, help, clear errors."""

import subprocess
import sys
import textwrap

import pytest

from ppl_vae.cli.check import load_callable, load_data
from ppl_vae.cli.commands import main

USER_PAIR = textwrap.dedent(
    """
    import pyro
    import pyro.distributions as dist
    import torch
    from torch.distributions import constraints


    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(torch.tensor([0.5, 0.3, 0.2])))
            pyro.sample("x", dist.Normal(torch.tensor([-2.0, 0.0, 2.0])[c], 1.0), obs=x)


    def guide(x):
        probs = pyro.param("probs", torch.ones(3) / 3, constraint=constraints.simplex)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Categorical(probs))
    """
)


def test_check_on_a_user_file(tmp_path, capsys):
    path = tmp_path / "my_pair.py"
    path.write_text(USER_PAIR)
    code = main(
        ["check", f"{path}:model", f"{path}:guide", "--data=-1.5,0.2,2.5", "--particles", "2000"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "exact (enumeration)" in out
    assert "brute force over 27 configurations" in out
    gap_row = next(line for line in out.splitlines() if line.startswith("gap ="))
    gap = float(gap_row.split("ELBO", 1)[1].split()[0])
    assert gap > 0.1  # a shared q cannot match each datum's posterior


def test_check_through_the_installed_command(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ppl_vae.cli.commands",
            "check",
            "ppl_vae.models.binary_toy:model",
            "ppl_vae.guides.binary_toy:guide",
            "--data",
            "1",
            "--particles",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "-0.7213" in result.stdout and "-0.6931" in result.stdout


def test_demo_prints_the_worked_example_and_saves_the_figure(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--skip-vae"]) == 0
    out = capsys.readouterr().out
    for number in ("-0.6390", "0.0823", "-0.7213", "-0.6931", "0.0282"):
        assert number in out
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 10_000 for p in pngs)


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    for flag in ("--data", "--particles", "--iwae-samples", "--seed", "file.py:function"):
        assert flag in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check", "nocolon", "x:y"], "is not of the form"),
        (["check", "missing_file.py:model", "x:y"], "no file"),
        (
            ["check", "ppl_vae.models.binary_toy:nothing", "ppl_vae.guides.binary_toy:guide"],
            "has no attribute 'nothing'",
        ),
        (
            [
                "check",
                "ppl_vae.models.binary_toy:model",
                "ppl_vae.guides.binary_toy:guide",
                "--data",
                "0.5",
            ],
            "must be 0 or 1",
        ),
        (
            [
                "check",
                "ppl_vae.models.binary_toy:model",
                "ppl_vae.guides.binary_toy:guide",
                "--data",
                "one",
            ],
            "neither numbers",
        ),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_data_formats(tmp_path):
    import numpy as np
    import torch

    assert load_data("1").shape == ()
    assert load_data("1,0,1").tolist() == [1.0, 0.0, 1.0]
    assert load_data("[[1, 2], [3, 4]]").shape == (2, 2)
    np.save(tmp_path / "x.npy", np.array([0.0, 1.0]))
    assert load_data(str(tmp_path / "x.npy")).tolist() == [0.0, 1.0]
    torch.save(torch.tensor([1.0, 1.0]), tmp_path / "x.pt")
    assert load_data(str(tmp_path / "x.pt")).tolist() == [1.0, 1.0]
    assert callable(load_callable("ppl_vae.models.binary_toy:model"))


@pytest.mark.parametrize("command", ["demo", "train", "sweep"])
def test_threads_must_be_positive(command, capsys):
    argv = [command, "--threads", "0"] + (["--out", "unused"] if command == "sweep" else [])
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "positive number of threads" in capsys.readouterr().err


def test_demo_sets_the_thread_count(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["demo", "--skip-vae", "--threads", "1", "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- check: every problem with a user's file or arguments is one line and exit code 2.


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def model(x):\n    return (\n", "SyntaxError"),
        ("import no_such_module_anywhere\n", "ModuleNotFoundError"),
        ("raise RuntimeError('broken at import')\n", "RuntimeError: broken at import"),
    ],
    ids=["syntax-error", "import-error", "raises-at-import"],
)
def test_check_user_file_that_does_not_import(tmp_path, capsys, source, expected):
    path = tmp_path / "broken_pair.py"
    path.write_text(source)
    code = main(["check", f"{path}:model", f"{path}:guide"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and "broken_pair.py" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("particles", ["0", "-5", "1", "many"])
def test_check_particles_below_two_is_a_usage_error(capsys, particles):
    with pytest.raises(SystemExit) as stop:
        main(["check", "ppl_vae.models.binary_toy:model", "ppl_vae.guides.binary_toy:guide",
              "--particles", particles])  # fmt: skip
    assert stop.value.code == 2
    assert "integer >= 2" in capsys.readouterr().err


def test_check_nan_data_is_one_line(tmp_path, capsys):
    import numpy as np

    path = tmp_path / "my_pair.py"
    path.write_text(USER_PAIR)
    data = tmp_path / "data.npy"
    np.save(data, np.array([1.0, np.nan, 2.0]))
    code = main(["check", f"{path}:model", f"{path}:guide", f"--data={data}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "NaN" in err and len(err.strip().splitlines()) == 1


def test_check_gradients_and_estimators_flags(tmp_path, capsys):
    path = tmp_path / "my_pair.py"
    path.write_text(USER_PAIR)
    code = main(
        ["check", f"{path}:model", f"{path}:guide", "--data=-1.5,0.2,2.5", "--particles", "500",
         "--gradients", "--estimators", "trace,tracegraph"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "gradient 'probs'" in out and "vs exact (enumeration)" in out
    assert "tracegraph" in out and "estimators compared" in out


def test_check_unknown_estimator_is_one_line(tmp_path, capsys):
    path = tmp_path / "my_pair.py"
    path.write_text(USER_PAIR)
    code = main(["check", f"{path}:model", f"{path}:guide", "--estimators", "trace,bogus"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown estimator 'bogus'" in err


def test_module_that_does_not_import_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_module.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["check", "broken_module:model", "broken_module:guide"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot import 'broken_module': RuntimeError: broken at import" in err
    assert len(err.strip().splitlines()) == 1


def test_not_callable_is_a_clear_error(capsys):
    assert main(["check", "ppl_vae.cli.commands:__all__", "ppl_vae.guides.binary_toy:guide"]) == 2
    assert "'ppl_vae.cli.commands:__all__' is not callable" in capsys.readouterr().err


# --- train: flags made from the configuration dataclasses.


def _train_args(argv):
    from ppl_vae.cli.commands import build_parser

    return build_parser().parse_args(["train", *argv])


def test_train_help_shows_the_configurations_defaults(capsys):
    from ppl_vae.elbo import ELBOS
    from ppl_vae.training import TrainConfig
    from ppl_vae.vae import VAEConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    train, vae = TrainConfig(), VAEConfig()
    assert f"images per step (default: {train.batch_size})" in out
    assert f"Adam's rate (default: {train.lr:g})" in out
    assert f"latent size (default: {vae.z_dim})" in out
    assert "--elbo {" + ",".join(ELBOS) + "}" in out


def test_train_flags_are_none_unless_given_and_land_in_their_place():
    from ppl_vae.cli.config_flags import given_settings
    from ppl_vae.cli.train import _PLACES

    args = _train_args([])
    assert all(getattr(args, dest) is None for dest in _PLACES)
    args = _train_args(
        ["--z-dim", "8", "--hidden", "30,20", "--particles", "2", "--lr", "0.01", "--beta", "2",
         "--train-subset", "5", "--elbo", "trace"]
    )  # fmt: skip
    assert given_settings(args, _PLACES) == {
        "vae": {"z_dim": 8, "hidden": [30, 20]},
        "train": {"num_particles": 2, "lr": 0.01, "elbo": "trace", "beta": 2.0},
        "data": {"train_subset": 5},
    }
    # --beta gives TrainConfig's one form, so given and saved values compare by equality.
    for given, held in (("1", 1.0), ("1.0", 1.0), ("warmup:10:1", "warmup:10")):
        assert _train_args(["--beta", given]).beta == held


def test_a_bad_beta_is_a_usage_error_with_the_grammar(capsys):
    with pytest.raises(SystemExit) as stop:
        _train_args(["--beta", "warmup:x"])
    assert stop.value.code == 2
    assert "bad beta schedule 'warmup:x'" in capsys.readouterr().err


def test_train_places_are_fields_of_the_run_config():
    import dataclasses

    from ppl_vae.cli.train import _PLACES
    from ppl_vae.training import RUNTIME_SETTINGS, TrainConfig
    from ppl_vae.vae import VAEConfig

    # Fields, not to_dict keys: VAEConfig writes a later-added setting only when it is set.
    fields = {
        "vae": {f.name for f in dataclasses.fields(VAEConfig)},
        "train": {f.name for f in dataclasses.fields(TrainConfig)},
    }
    for place in _PLACES.values():
        if place[0] in fields:
            assert place[1] in fields[place[0]] and place[1] not in RUNTIME_SETTINGS, place


def test_sweep_defaults_are_the_configurations():
    import argparse

    from ppl_vae.cli import sweep
    from ppl_vae.training import TrainConfig
    from ppl_vae.vae import VAEConfig

    parser = argparse.ArgumentParser()
    sweep.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sweep", "--out", "unused"])
    train, vae = TrainConfig(), VAEConfig()
    assert (args.epochs, args.batch_size, args.lr, args.seed, args.device) == (
        train.epochs, train.batch_size, train.lr, train.seed, train.device
    )  # fmt: skip
    assert (args.dataset, args.likelihood, args.z_dim, args.hidden) == (
        vae.dataset, vae.likelihood, vae.z_dim, vae.hidden
    )  # fmt: skip
