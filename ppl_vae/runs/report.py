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

For a sweep folder (one with ``sweep.json``) the page shows the rate-distortion plane and the
table, and links each beta's own report.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ppl_vae.atomic import write_atomically
from ppl_vae.rng import forked_rng

__all__ = ["REPORT_DIR", "interpolate", "write_report"]

REPORT_DIR = "report"
"""The report's folder inside a run or sweep folder, by default."""

_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.9em; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9em; }
"""


def interpolate(
    encoder: torch.nn.Module,
    decoder: torch.nn.Module,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    *,
    steps: int = 10,
    likelihood: str = "bernoulli",
    sigma: float | None = None,
) -> torch.Tensor:
    """Decoded means E[x | z] along the straight line z(t) = (1 - t) mu(x_a) + t mu(x_b),
    t = 0, 1/(steps-1), ..., 1, for each pair of rows of ``x_a`` and ``x_b`` (P, D):
    shape (P, steps, D). ``likelihood`` and ``sigma`` as in :func:`ppl_vae.models.vae.model`."""
    from ppl_vae.models.vae import observation

    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    x_a, x_b = torch.atleast_2d(x_a), torch.atleast_2d(x_b)
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a and x_b must have one shape, got {x_a.shape} and {x_b.shape}")
    with torch.no_grad():
        mu_a, _ = encoder(x_a)  # (P, z)
        mu_b, _ = encoder(x_b)
        t = torch.linspace(0, 1, steps, device=mu_a.device, dtype=mu_a.dtype)[None, :, None]
        z = (1 - t) * mu_a[:, None] + t * mu_b[:, None]  # (P, steps, z)
        return observation(decoder, z, likelihood, sigma).mean  # (P, steps, D)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise ValueError(f"{path} is not valid JSON") from None


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = "".join(f"<td>{cell}</td>" for cell in row)
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _cell(text: str) -> str:
    """Escaped text; leading spaces (sub-items) kept as an indent."""
    stripped = text.lstrip(" ")
    return "&emsp;" * ((len(text) - len(stripped)) // 2) + html.escape(stripped)


def _figure(name: str, caption: str) -> str:
    return (
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _page(title: str, body: Sequence[str]) -> str:
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_STYLE}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            *body,
            "</body></html>",
            "",
        ]
    )


def _schedule(spec: Any):
    """The beta schedule of a run's ``config.json`` (``None`` when constant or unreadable)."""
    from ppl_vae.elbo import Constant, parse_schedule

    try:
        schedule = parse_schedule(str(spec))
    except ValueError:
        return None
    return None if isinstance(schedule, Constant) else schedule


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
    if (path / "sweep.json").is_file():
        return _sweep_report(path, out_dir, runs=runs, options=options)
    return _run_report(path, out_dir, **options)


def _sweep_report(path: Path, out_dir: Path, *, runs: bool, options: dict[str, Any]) -> Path:
    from ppl_vae.runs.plots import save
    from ppl_vae.runs.sweep import format_table, read_sweep, sweep_figure

    rows = read_sweep(path)
    if not rows:
        raise ValueError(f"{path / 'sweep.json'} holds no runs yet")
    save(sweep_figure(rows), out_dir / "rate_distortion.png")
    meta = _read_json(path / "sweep.json") or {}
    table = []
    for row in rows:
        link = html.escape(row.run)
        run_dir = path / row.run
        if runs and (run_dir / "config.json").is_file():
            index = write_report(run_dir, **options)
            rel = os.path.relpath(index, out_dir)
            link = f'<a href="{html.escape(rel)}">{html.escape(row.run)}</a>'
        active = "–" if row.active_units is None else f"{row.active_units} / {row.z_dim}"
        table.append(
            [
                f"{row.beta:g}",
                _fmt(row.rate, 3),
                _fmt(row.distortion, 3),
                _fmt(row.elbo, 3),
                _fmt(row.iwae, 3),
                _fmt(row.mutual_info, 3),
                _fmt(row.marginal_kl, 3),
                active,
                link,
            ]
        )
    best = max(rows, key=lambda r: r.elbo if math.isfinite(r.elbo) else -math.inf)
    vae = meta.get("vae", {})
    train = meta.get("train", {})
    body = [
        '<p class="note">Each run was trained with its own KL weight beta, minimising '
        "D + beta R, with the same seed and budget, and every number is evaluated at beta = 1, "
        "in nats per test image: rate R = E_x KL(q(z|x) || p(z)), distortion "
        "D = -E_x E_q[log p(x|z)], ELBO = -(D + R). Points on one dashed line D + R = const "
        "have the same ELBO; beta moves the model along the curve (Alemi et al. 2018).</p>",
        "<p>"
        + html.escape(
            f"data set: {vae.get('dataset', '?')}, likelihood {vae.get('likelihood', '?')}, "
            f"z_dim {vae.get('z_dim', '?')}, hidden {vae.get('hidden', '?')}; "
            f"{train.get('epochs', '?')} epochs, batch {train.get('batch_size', '?')}, "
            f"lr {train.get('lr', '?')}, seed {train.get('seed', '?')}; "
            f"IWAE K = {rows[0].iwae_k} on {rows[0].n_images} test images."
        )
        + f" Best ELBO: beta = {best.beta:g} ({_fmt(best.elbo, 3)} nats).</p>",
        _figure(
            "rate_distortion.png",
            "Distortion against rate, one point per beta, with the lines of equal ELBO.",
        ),
        "<h2>Runs</h2>",
        _table(
            table,
            [
                "beta",
                "rate R",
                "distortion D",
                "ELBO",
                "IWAE",
                "I_q(x; z)",
                "KL(q(z) || p(z))",
                "active units",
                "run",
            ],
        ),
        '<p class="note">The rate splits as R = I_q(x; z) + KL(q(z) || p(z)) (ELBO surgery, '
        "Hoffman &amp; Johnson 2016): the information z carries about x, and how far the "
        "aggregate posterior q(z) strays from the prior.</p>",
        f"<pre>{html.escape(format_table(rows))}</pre>",
    ]
    index = out_dir / "index.html"
    write_atomically(index, _page(f"Beta sweep: {path.name}", body))
    return index


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
    from ppl_vae.models import vae as vae_model
    from ppl_vae.runs.folder import load_run
    from ppl_vae.runs.plots import (
        gaussian_kl_figure,
        image_grid,
        interpolations_figure,
        iwae_figure,
        latent_space_figure,
        reconstructions_figure,
        save,
        training_curves_figure,
    )
    from ppl_vae.vae import (
        DEFAULT_KS,
        active_units,
        collapse_warning,
        elbo_surgery,
        iwae_curve,
        kl_per_dimension,
        posterior_moments,
        rate_distortion,
    )

    config = _read_json(path / "config.json")
    history = _read_json(path / "history.json") or []
    evaluation = _read_json(path / "evaluation.json")
    run = load_run(path, checkpoint=checkpoint, device=device, data_dir=data_dir)
    vae, data = run.vae, run.dataset
    likelihood, sigma = vae.config.likelihood, vae.config.sigma
    figures: list[tuple[str, str, str]] = []  # (heading, file, caption)

    # 1. Training curves.
    has_validation = any(row.get("val_kl") is not None for row in history)
    if history and has_validation:
        schedule = _schedule(config.get("beta")) if config else None
        save(training_curves_figure(history, schedule=schedule), out_dir / "training_curves.png")
        figures.append(
            (
                "Training",
                "training_curves.png",
                "Validation reconstruction, KL (the rate; near zero = posterior collapse) "
                "and ELBO per epoch against steps, with the training objective; beta warm-up "
                "shaded where one was used.",
            )
        )

    # 2. The latent space and the numbers computed from it.
    test = data.test
    images = test.images[:latent_images]
    labels = test.labels[: images.shape[0]]
    mu, log_var = posterior_moments(vae.encoder, images)
    kl_dims = kl_per_dimension(mu, log_var)
    n_active, _ = active_units(mu)
    surgery = elbo_surgery(mu, log_var, seed=seed)
    z_dim = int(mu.shape[1])
    save(
        latent_space_figure(mu.cpu(), labels.cpu(), kl_per_dim=kl_dims.tolist()),
        out_dir / "latent_space.png",
    )
    caption = "Posterior means of test images by class, with the prior's 1 and 2 sigma circles"
    if z_dim > 2:
        caption += " (the two dimensions with the largest KL)"
    figures.append(("Latent space", "latent_space.png", caption + "."))
    if z_dim > 2:
        save(
            latent_space_figure(mu.cpu(), labels.cpu(), projection="pca"),
            out_dir / "latent_space_pca.png",
        )
        figures.append(
            (
                "Latent space",
                "latent_space_pca.png",
                "The same means projected on their first two principal directions "
                "(the projection keeps the origin, so the prior's circles still apply).",
            )
        )

    # 3. KL of a Gaussian from the prior.
    save(gaussian_kl_figure(), out_dir / "gaussian_kl.png")
    figures.append(
        (
            "What the KL term asks of each code",
            "gaussian_kl.png",
            "KL(N(mu, sigma^2) || N(0, 1)) per latent dimension: zero only at mu = 0, "
            "sigma = 1, where the code says nothing about x.",
        )
    )

    # 4. Samples, reconstructions, interpolations.
    with forked_rng(seed=seed):
        samples = vae_model.generate(vae.decoder, 100, likelihood=likelihood)
    save(
        image_grid(samples, data.image_shape, title="E[x | z], z ~ N(0, I)"),
        out_dir / "samples.png",
    )
    inputs = test.images[:50]
    recons = vae_model.reconstruct(vae.encoder, vae.decoder, inputs, likelihood)
    save(reconstructions_figure(inputs, recons, data.image_shape), out_dir / "reconstructions.png")
    pairs = _pairs(test.labels, 6)
    rows = interpolate(
        vae.encoder,
        vae.decoder,
        test.images[[a for a, _ in pairs]],
        test.images[[b for _, b in pairs]],
        steps=10,
        likelihood=likelihood,
        sigma=sigma,
    )
    save(interpolations_figure(rows, data.image_shape), out_dir / "interpolations.png")
    figures += [
        ("Samples and reconstructions", "samples.png", "Decoded samples from the prior."),
        (
            "Samples and reconstructions",
            "reconstructions.png",
            "Test images (odd rows) and their reconstructions E[x | z = mu(x)] (even rows).",
        ),
        (
            "Samples and reconstructions",
            "interpolations.png",
            "Straight lines in z between the codes of two test images, decoded at 10 points.",
        ),
    ]

    # 5. The IWAE bound against K.
    ks = sorted({k for k in DEFAULT_KS if k <= iwae_k} | {iwae_k})
    curve = iwae_curve(
        vae.encoder,
        vae.decoder,
        test.images[:iwae_images],
        ks,
        likelihood=likelihood,
        sigma=sigma,
        seed=seed,
    )
    save(
        iwae_figure(curve.ks, curve.iwae, curve.elbo, iwae_se=curve.gap_se),
        out_dir / "iwae_vs_k.png",
    )
    figures.append(
        (
            "The IWAE bound against K",
            "iwae_vs_k.png",
            f"IWAE_K on {curve.n_images} test images for K = 1 to {curve.num_samples}, and the "
            "ELBO: the bound climbs from the ELBO towards log p(x) as K grows, closing the gap "
            "log p(x) - ELBO = KL(q(z|x) || p(z|x)). Error bars: ± 2 s.e. of IWAE_K - ELBO "
            "(paired over images).",
        )
    )

    # The numbers.
    numbers: list[list[str]] = []
    if history and has_validation:
        last = history[-1]
        best = max(
            (r for r in history if r.get("val_elbo") is not None), key=lambda r: r["val_elbo"]
        )
        points = rate_distortion(history)
        numbers += [
            ["epochs trained (steps)", f"{last['epoch']} ({last['step']})", ""],
            ["beta at the last step", _fmt(last.get("beta"), 3), "training weight of the KL"],
            [
                "validation ELBO, last epoch",
                f"{_fmt(last['val_elbo'])} ± {_fmt(last['val_elbo_se'])}",
                f"best {_fmt(best['val_elbo'])} at epoch {best['epoch']}",
            ],
            [
                "validation rate R / distortion D, last epoch",
                f"{_fmt(points[-1].rate)} / {_fmt(points[-1].distortion)}",
                "ELBO = -(D + R)",
            ],
        ]
    if evaluation:
        numbers += [
            [
                "test ELBO (beta = 1)",
                f"{_fmt(evaluation.get('elbo'))} ± {_fmt(evaluation.get('elbo_se'))}",
                f"{evaluation.get('n_images')} images, checkpoint "
                f"{evaluation.get('checkpoint', '?')}; {_fmt(evaluation.get('bits_per_dim_elbo'))}"
                " bits/dim",
            ],
            ["  rate R = KL(q(z|x) || p(z))", _fmt(evaluation.get("rate")), ""],
            ["  distortion D = -E_q[log p(x|z)]", _fmt(evaluation.get("distortion")), ""],
            [
                f"test IWAE, K = {evaluation.get('iwae_k')}",
                f"{_fmt(evaluation.get('iwae'))} ± {_fmt(evaluation.get('iwae_se'))}",
                f"{_fmt(evaluation.get('bits_per_dim_iwae'))} bits/dim; IWAE - ELBO "
                f"{_fmt(evaluation.get('gap_elbo_iwae'))}",
            ],
        ]
    else:
        numbers.append(
            [
                "test ELBO and IWAE",
                "–",
                f"not evaluated yet: ppl-vae evaluate {path}",
            ]
        )
    numbers += [
        [
            "rate E_x KL(q(z|x) || p(z))",
            _fmt(surgery.avg_kl),
            f"closed form, {surgery.n_images} test images",
        ],
        [
            "  = I_q(x; z)",
            f"{_fmt(surgery.mutual_info)} ± {_fmt(surgery.mutual_info_se)}",
            f"ELBO surgery; at most log N = {_fmt(surgery.log_n, 3)}",
        ],
        ["  + KL(q(z) || p(z))", _fmt(surgery.marginal_kl), "aggregate posterior vs prior"],
        ["active units", f"{n_active} of {z_dim}", "Cov_x(E_q[z_u]) > 0.01"],
        ["KL per latent dimension", " ".join(f"{v:.3f}" for v in kl_dims.tolist()), ""],
        [
            f"IWAE_{curve.num_samples} - ELBO",
            _fmt(curve.iwae[-1] - curve.elbo),
            f"{curve.n_images} test images (figure below)",
        ],
    ]
    body = []
    vc = vae.config
    body.append(
        "<p>"
        + html.escape(
            f"{vc.dataset} ({data.source}), likelihood {vc.likelihood}, z_dim {vc.z_dim}, "
            f"hidden {list(vc.hidden)}, beta {config.get('beta') if config else '?'}; "
            f"checkpoint {checkpoint}. All values in nats per image."
        )
        + "</p>"
    )
    warning = collapse_warning(surgery.avg_kl, n_active)
    if warning:
        body.append(f'<p class="warning">{html.escape(warning)}</p>')
    cells = [[_cell(c) for c in row] for row in numbers]
    body += ["<h2>Key numbers</h2>", _table(cells, ["quantity", "value", "note"])]
    heading = None
    for title, name, caption in figures:
        if title != heading:
            body.append(f"<h2>{html.escape(title)}</h2>")
            heading = title
        body.append(_figure(name, caption))
    index = out_dir / "index.html"
    write_atomically(index, _page(f"Run report: {path.name}", body))
    return index
