"""The report page of a run and of a sweep: figures written, links that resolve, offline."""

import argparse
import re

import pytest
import torch

from ppl_vae.cli import report as report_command
from ppl_vae.models import vae as vae_model
from ppl_vae.runs import interpolate, load_run, run_sweep, write_report
from ppl_vae.training import TrainConfig
from ppl_vae.vae import VAEConfig

SMALL = {"iwae_k": 20, "iwae_images": 10, "latent_images": 100}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    run_sweep(
        out,
        [1.0],
        VAEConfig(dataset="digits", z_dim=3, hidden=(16,)),
        TrainConfig(epochs=2, batch_size=64, progress=False, device="cpu", threads=1),
        iwae_k=5,
        test_images=40,
        train_subset=300,
    )
    return out


def _links(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', page)


def _check_offline(index):
    page = index.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page and "<script" not in page
    links = _links(page)
    assert links
    for link in links:
        assert (index.parent / link).is_file(), link
    return page, links


def test_run_report_shows_every_figure_and_the_numbers(sweep_dir):
    index = write_report(sweep_dir / "beta=1", **SMALL)
    assert index == sweep_dir / "beta=1" / "report" / "index.html"
    page, links = _check_offline(index)
    for name in (
        "training_curves.png",
        "latent_space.png",
        "latent_space_pca.png",  # z_dim = 3 > 2
        "gaussian_kl.png",
        "samples.png",
        "reconstructions.png",
        "interpolations.png",
        "iwae_vs_k.png",
    ):
        assert name in links
        assert (index.parent / name).read_bytes().startswith(b"\x89PNG")
    for text in ("test ELBO", "I_q(x; z)", "KL(q(z) || p(z))", "active units", "IWAE_20"):
        assert text in page


def test_sweep_report_links_each_run(sweep_dir):
    index = write_report(sweep_dir, **SMALL)
    page, links = _check_offline(index)
    assert "rate_distortion.png" in links
    assert "../beta=1/report/index.html" in links
    assert "Beta sweep" in page and "I_q(x; z)" in page


def test_report_command(sweep_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="ppl-vae")
    report_command.add_parser(parser.add_subparsers(dest="command", required=True))
    flags = ["--iwae-k", "10", "--iwae-images", "5", "--latent-images", "50"]
    args = parser.parse_args(["report", str(sweep_dir / "beta=1"), "--out", str(tmp_path), *flags])
    assert args.handler(args) == 0
    assert str(tmp_path / "index.html") in capsys.readouterr().out
    _check_offline(tmp_path / "index.html")
    args = parser.parse_args(["report", str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError):  # the CLI turns it into exit code 2
        args.handler(args)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["report", "--help"])
    assert exit_info.value.code == 0
    assert "index.html" in capsys.readouterr().out


def test_interpolations_run_between_the_two_codes(sweep_dir):
    run = load_run(sweep_dir / "beta=1")
    x = run.dataset.test.images[:4]
    lines = interpolate(run.vae.encoder, run.vae.decoder, x[:2], x[2:], steps=5)
    assert lines.shape == (2, 5, x.shape[1])
    ends = vae_model.reconstruct(run.vae.encoder, run.vae.decoder, x)
    assert torch.allclose(lines[:, 0], ends[:2], atol=1e-6)
    assert torch.allclose(lines[:, -1], ends[2:], atol=1e-6)
    with pytest.raises(ValueError, match="steps"):
        interpolate(run.vae.encoder, run.vae.decoder, x[:1], x[1:2], steps=1)


def test_the_report_reads_the_schedule_from_train_beta():
    """The warm-up shading comes from config.json's train.beta (run folders written before
    it could hold a schedule kept its text at the top level)."""
    from ppl_vae.elbo import Cyclical, LinearWarmup
    from ppl_vae.runs import report

    def schedule(config):
        return report._schedule(report._beta(config))

    assert schedule({"train": {"beta": "warmup:10"}}) == LinearWarmup(10)
    assert schedule({"train": {"beta": 0.5}}) is None
    assert schedule({"train": {"beta": None}}) is None  # a Python function, not recorded
    assert schedule({"beta": "cyclical:4", "train": {"beta": 1.0}}) == Cyclical(4)
    assert report._show_beta(1.0) == "1" and report._show_beta("warmup:10:1") == "warmup:10"
