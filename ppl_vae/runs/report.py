"""An offline report of a run (or of a sweep): every figure that applies, and the key numbers.

``ppl-vae report runs/NAME`` writes ``runs/NAME/report/index.html`` with its PNGs beside it
(relative links, no external CSS or JavaScript, so the folder can be opened or copied as is):

- training curves: reconstruction, KL (the rate R) and ELBO against steps, warm-up shaded;
- the latent space: test images' posterior means by class, the prior's 1 and 2 sigma circles
  (the two dimensions with the largest KL, and the principal-component view for z > 2);
- KL(N(mu, sigma^2) || N(0, 1)) over a (mu, sigma) grid;
- samples from the prior, reconstructions beside their inputs, latent interpolations;
- the IWAE bound against K with the ELBO as a line;
- the numbers: ELBO = -(D + R), IWAE, bits/dim (``evaluation.json`` when present), the rate
  split as I_q(x; z) + KL(q(z) || p(z)) (ELBO surgery), active units, a collapse warning.

For a sweep folder (one with ``sweep.json``) the page is :mod:`ppl_vae.runs.sweep_report`'s:
the rate-distortion plane and the table, linking each beta's own report.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ppl_vae.atomic import write_atomically
from ppl_vae.elbo import Constant, Schedule, as_schedule, canonical_beta
from ppl_vae.models import vae as vae_model
from ppl_vae.rng import forked_rng
from ppl_vae.runs.folder import TrainedRun, load_run
from ppl_vae.runs.image_plots import image_grid, interpolations_figure, reconstructions_figure, save
from ppl_vae.runs.latent_plots import gaussian_kl_figure, iwae_figure, latent_space_figure
from ppl_vae.runs.page import html_cell, html_figure, html_page, html_table, read_json
from ppl_vae.runs.report_numbers import (
    CodeSummary,
    code_numbers,
    evaluation_numbers,
    training_numbers,
)
from ppl_vae.runs.semi_supervised import m2_figures
from ppl_vae.runs.sweep import SWEEP_FILE
from ppl_vae.runs.sweep_report import write_sweep_report
from ppl_vae.runs.training_plots import training_curves_figure
from ppl_vae.vae import (
    DEFAULT_KS,
    IwaeCurve,
    active_units,
    collapse_warning,
    elbo_surgery,
    interpolate,
    iwae_curve,
    kl_per_dimension,
    posterior_moments,
    prior_name,
)

__all__ = ["REPORT_DIR", "write_report"]

REPORT_DIR = "report"
"""The report's folder inside a run or sweep folder, by default."""

_Figures = list[tuple[str, str, str]]  # (heading, file, caption), in page order


def write_report(
    path: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    checkpoint: str = "best",
    device: str = "cpu",
    data_dir: str | None = None,
    iwae_images: int = 100,
    iwae_k: int = 5000,
    latent_images: int = 2000,
    seed: int = 0,
    runs: bool = True,
) -> Path:
    """Write the report of a run folder (or of a sweep folder) and return its ``index.html``.

    :param out: the report's folder (default ``PATH/report``).
    :param iwae_images: test images of the IWAE-against-K figure; ``iwae_k`` its largest K.
    :param latent_images: test images encoded for the latent space and ELBO surgery.
    :param runs: for a sweep, also write each run's report (linked from the sweep's page).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no folder {path}: pass a run folder or a sweep folder")
    if iwae_images < 1 or iwae_k < 1 or latent_images < 2:
        raise ValueError("iwae_images and iwae_k must be >= 1, latent_images >= 2")
    out_dir = Path(out) if out is not None else path / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    options = {
        "checkpoint": checkpoint,
        "device": device,
        "data_dir": data_dir,
        "iwae_images": iwae_images,
        "iwae_k": iwae_k,
        "latent_images": latent_images,
        "seed": seed,
    }
    if (path / SWEEP_FILE).is_file():

        def run_report(run_dir: Path) -> Path:
            return write_report(run_dir, **options)

        return write_sweep_report(path, out_dir, run_report=run_report if runs else None)
    return _run_report(path, out_dir, **options)


def _beta(config: dict[str, Any] | None) -> Any:
    """The KL weight of a run's ``config.json``: ``train.beta`` (run folders written before
    it could hold a schedule's text kept that text at the top level, as ``beta``)."""
    if not config:
        return None
    return config["beta"] if "beta" in config else (config.get("train") or {}).get("beta")


def _schedule(spec: Any) -> Schedule | None:
    """The beta schedule of a KL weight (``None`` when constant, unrecorded or unreadable)."""
    try:
        schedule = as_schedule(spec)
    except ValueError:
        return None
    return None if isinstance(schedule, Constant) else schedule


def _show_beta(beta: Any) -> str:
    """A KL weight as the page writes it: 1, 0.5 or warmup:100 (``?`` when not recorded)."""
    try:
        beta = canonical_beta(beta)
    except ValueError:
        return "?"
    return f"{beta:g}" if isinstance(beta, float) else beta


def _pairs(labels: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """Index pairs of test images for interpolations: first images of different classes."""
    labels = labels.cpu()
    firsts = []
    seen: set[int] = set()
    for i, label in enumerate(labels.tolist()):
        if label not in seen:
            seen.add(label)
            firsts.append(i)
    if len(firsts) >= 2:
        pairs = [(firsts[k], firsts[(k + 1) % len(firsts)]) for k in range(len(firsts))]
    else:
        n = labels.shape[0]
        pairs = [(2 * k, 2 * k + 1) for k in range(n // 2)]
    return pairs[:count]


def _run_report(
    path: Path,
    out_dir: Path,
    *,
    checkpoint: str,
    device: str,
    data_dir: str | None,
    iwae_images: int,
    iwae_k: int,
    latent_images: int,
    seed: int,
) -> Path:
    config = read_json(path / "config.json")
    history = read_json(path / "history.json") or []
    evaluation = read_json(path / "evaluation.json")
    run = load_run(path, checkpoint=checkpoint, device=device, data_dir=data_dir)
    has_validation = any(row.get("val_kl") is not None for row in history)
    figures: _Figures = []
    if history and has_validation:
        schedule = _schedule(_beta(config))
        objective = (config or {}).get("train", {}).get("objective", "elbo")
        figures += _training_figures(history, schedule, objective, out_dir)
    code, latent = _latent_figures(run, latent_images, seed, out_dir)
    figures += latent + _image_figures(run, seed, out_dir)
    curve, iwae = _iwae_figures(run, iwae_images, iwae_k, seed, out_dir)
    figures += iwae

    numbers: list[list[str]] = []
    if history and has_validation:
        numbers += training_numbers(history)
    numbers += evaluation_numbers(evaluation, path)
    numbers += code_numbers(code, curve)
    vc = run.vae.config
    body = [
        "<p>"
        + html.escape(
            f"{vc.dataset} ({run.dataset.source}), likelihood {vc.likelihood}, z_dim "
            f"{vc.z_dim}, hidden {list(vc.hidden)}, beta {_show_beta(_beta(config))}"
            f"; checkpoint {checkpoint}. All values in nats per image."
        )
        + "</p>"
    ]
    warning = collapse_warning(code.surgery.avg_kl, code.n_active)
    if warning:
        body.append(f'<p class="warning">{html.escape(warning)}</p>')
    cells = [[html_cell(c) for c in row] for row in numbers]
    body += ["<h2>Key numbers</h2>", html_table(cells, ["quantity", "value", "note"])]
    heading = None
    for title, name, caption in figures:
        if title != heading:
            body.append(f"<h2>{html.escape(title)}</h2>")
            heading = title
        body.append(html_figure(name, caption))
    index = out_dir / "index.html"
    write_atomically(index, html_page(f"Run report: {path.name}", body))
    return index


def _training_figures(
    history: list[dict[str, Any]], schedule: Schedule | None, objective: str, out_dir: Path
) -> _Figures:
    figure = training_curves_figure(history, schedule=schedule, trained_on=objective)
    save(figure, out_dir / "training_curves.png")
    caption = (
        "Validation reconstruction, KL (the rate; near zero = posterior collapse) and ELBO per "
        "epoch against steps, with the training objective; beta warm-up shaded where one was "
        "used."
    )
    return [("Training", "training_curves.png", caption)]


def _latent_figures(
    run: TrainedRun, latent_images: int, seed: int, out_dir: Path
) -> tuple[CodeSummary, _Figures]:
    """The latent space of the first ``latent_images`` test images, the Gaussian KL map, and
    the numbers computed from the codes."""
    test = run.dataset.test
    images = test.images[:latent_images]
    labels = test.labels[: images.shape[0]]
    # The legend names the classes ("Sandal", "7") as the run's dataset does.
    names = run.dataset.class_names
    encoder = run.vae.code_encoder() if run.semi_supervised else run.vae.encoder
    mu, log_var = posterior_moments(encoder, images)
    learned = None if run.semi_supervised else run.vae.prior
    if learned is not None:
        return _learned_prior_latents(run, mu, log_var, labels, seed, out_dir)
    kl_dims = kl_per_dimension(mu, log_var)
    code = CodeSummary(
        kl_dims, active_units(mu)[0], elbo_surgery(mu, log_var, seed=seed), mu.shape[1]
    )
    save(
        latent_space_figure(mu.cpu(), labels.cpu(), kl_per_dim=kl_dims.tolist(), class_names=names),
        out_dir / "latent_space.png",
    )
    caption = "Posterior means of test images by class, with the prior's 1 and 2 sigma circles"
    if code.z_dim > 2:
        caption += " (the two dimensions with the largest KL)"
    figures = [("Latent space", "latent_space.png", caption + ".")]
    if code.z_dim > 2:
        save(
            latent_space_figure(mu.cpu(), labels.cpu(), projection="pca", class_names=names),
            out_dir / "latent_space_pca.png",
        )
        caption = (
            "The same means projected on their first two principal directions (the "
            "projection keeps the origin, so the prior's circles still apply)."
        )
        figures.append(("Latent space", "latent_space_pca.png", caption))
    save(gaussian_kl_figure(), out_dir / "gaussian_kl.png")
    caption = (
        "KL(N(mu, sigma^2) || N(0, 1)) per latent dimension: zero only at mu = 0, sigma = 1, "
        "where the code says nothing about x."
    )
    figures.append(("What the KL term asks of each code", "gaussian_kl.png", caption))
    return code, figures


def _learned_prior_latents(
    run: TrainedRun, mu: Tensor, log_var: Tensor, labels: Tensor, seed: int, out_dir: Path
) -> tuple[CodeSummary, _Figures]:
    """The latent space under a learned prior: the means in their first two principal
    directions beside draws from p(z) (no N(0, I) circles, no per-dimension KL: the prior
    does not factorise), and the ELBO surgery against p(z)."""
    vae = run.vae
    with torch.no_grad(), forked_rng(seed=seed):
        p_z = vae.prior_distribution()
        surgery = elbo_surgery(mu, log_var, seed=seed, prior=p_z)
        draws = p_z.sample((min(1000, mu.shape[0]),))
    code = CodeSummary(None, active_units(mu)[0], surgery, mu.shape[1])
    name = prior_name(vae.config.prior)
    figure = latent_space_figure(
        mu.cpu(),
        labels.cpu(),
        projection="pca",
        class_names=run.dataset.class_names,
        prior_draws=draws.cpu(),
    )
    save(figure, out_dir / "latent_space.png")
    caption = (
        f"Posterior means of test images by class and draws from the learned prior {name}, "
        "on the means' first two principal directions."
    )
    return code, [("Latent space", "latent_space.png", caption)]


def _image_figures(run: TrainedRun, seed: int, out_dir: Path) -> _Figures:
    """Samples from the prior, reconstructions, and interpolations between classes (an M2
    run: one row of samples per class, and reconstructions at the predicted label)."""
    if run.semi_supervised:
        m2_figures(run.vae, run.dataset, out_dir, seed=seed)
        return [
            ("Samples and reconstructions", "samples.png", _M2_SAMPLES),
            ("Samples and reconstructions", "reconstructions.png", _M2_RECONSTRUCTIONS),
        ]
    vae, data = run.vae, run.dataset
    likelihood, test = vae.config.likelihood, data.test
    with forked_rng(seed=seed):
        samples = vae_model.generate(
            vae.decoder, 100, likelihood=likelihood, prior=vae.prior, encoder=vae.encoder
        )
    title = f"E[x | z], z ~ {prior_name(vae.config.prior)}"
    save(image_grid(samples, data.image_shape, title=title), out_dir / "samples.png")
    inputs = test.images[:50]
    recons = vae_model.reconstruct(vae.encoder, vae.decoder, inputs, likelihood)
    save(reconstructions_figure(inputs, recons, data.image_shape), out_dir / "reconstructions.png")
    pairs = _pairs(test.labels, 6)
    lines = interpolate(
        vae.encoder,
        vae.decoder,
        test.images[[a for a, _ in pairs]],
        test.images[[b for _, b in pairs]],
        steps=10,
        likelihood=likelihood,
        sigma=vae.config.sigma,
    )
    save(interpolations_figure(lines, data.image_shape), out_dir / "interpolations.png")
    heading = "Samples and reconstructions"
    return [
        (heading, "samples.png", "Decoded samples from the prior."),
        (
            heading,
            "reconstructions.png",
            "Test images (odd rows) and their reconstructions E[x | z = mu(x)] (even rows).",
        ),
        (
            heading,
            "interpolations.png",
            "Straight lines in z between the codes of two test images, decoded at 10 points.",
        ),
    ]


_M2_SAMPLES = (
    "E[x | y, z]: one code z ~ N(0, I) per column, decoded as each class (rows): the style "
    "kept, the class changed."
)
_M2_RECONSTRUCTIONS = (
    "Test images (odd rows) and E[x | y, z = mu(x, y)] at the predicted y = argmax q(y | x) "
    "(even rows)."
)


def _iwae_figures(
    run: TrainedRun, iwae_images: int, iwae_k: int, seed: int, out_dir: Path
) -> tuple[IwaeCurve | None, _Figures]:
    """IWAE_K against K up to ``iwae_k`` on the first ``iwae_images`` test images (not for
    M2, whose bound with the label summed out is in ``evaluation.json``)."""
    if run.semi_supervised:
        return None, []
    vae = run.vae
    ks = sorted({k for k in DEFAULT_KS if k <= iwae_k} | {iwae_k})
    curve = iwae_curve(
        vae.encoder,
        vae.decoder,
        run.dataset.test.images[:iwae_images],
        ks,
        likelihood=vae.config.likelihood,
        sigma=vae.config.sigma,
        seed=seed,
        prior=vae.prior,
    )
    save(
        iwae_figure(curve.ks, curve.iwae, curve.elbo, iwae_se=curve.gap_se),
        out_dir / "iwae_vs_k.png",
    )
    caption = (
        f"IWAE_K on {curve.n_images} test images for K = 1 to {curve.num_samples}, and the "
        "ELBO: the bound climbs from the ELBO towards log p(x) as K grows, closing the gap "
        "log p(x) - ELBO = KL(q(z|x) || p(z|x)). Error bars: ± 2 s.e. of IWAE_K - ELBO "
        "(paired over images)."
    )
    return curve, [("The IWAE bound against K", "iwae_vs_k.png", caption)]
