"""The report page of a beta sweep: the rate-distortion plane, the table, a link per run.

Every run is evaluated at beta = 1, so the points share one plane where the lines D + R = const
have equal ELBO = -(D + R); the rate splits as R = I_q(x; z) + KL(q(z) || p(z)).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable
from pathlib import Path

from ppl_vae.atomic import write_atomically
from ppl_vae.runs.image_plots import save
from ppl_vae.runs.page import format_value, html_figure, html_page, html_table, read_json
from ppl_vae.runs.sweep import SWEEP_FILE, SweepRow, format_table, read_sweep, sweep_figure

__all__ = ["write_sweep_report"]

_COLUMNS = [
    "beta",
    "rate R",
    "distortion D",
    "ELBO",
    "IWAE",
    "I_q(x; z)",
    "KL(q(z) || p(z))",
    "active units",
    "run",
]

_INTRO = (
    '<p class="note">Each run was trained with its own KL weight beta, minimising '
    "D + beta R, with the same seed and budget, and every number is evaluated at beta = 1, "
    "in nats per test image: rate R = E_x KL(q(z|x) || p(z)), distortion "
    "D = -E_x E_q[log p(x|z)], ELBO = -(D + R). Points on one dashed line D + R = const "
    "have the same ELBO; beta moves the model along the curve (Alemi et al. 2018).</p>"
)

_SURGERY = (
    '<p class="note">The rate splits as R = I_q(x; z) + KL(q(z) || p(z)) (ELBO surgery, '
    "Hoffman &amp; Johnson 2016): the information z carries about x, and how far the "
    "aggregate posterior q(z) strays from the prior.</p>"
)


def write_sweep_report(
    path: Path, out_dir: Path, *, run_report: Callable[[Path], Path] | None = None
) -> Path:
    """Write the page of the sweep folder ``path`` into ``out_dir`` and return its
    ``index.html``. ``run_report(run_folder)`` writes a run's own report and returns its
    index, which the table links; ``None`` links nothing."""
    rows = read_sweep(path)
    if not rows:
        raise ValueError(f"{path / SWEEP_FILE} holds no runs yet")
    save(sweep_figure(rows), out_dir / "rate_distortion.png")
    meta = read_json(path / SWEEP_FILE) or {}
    table = [_table_row(row, path, out_dir, run_report) for row in rows]
    best = max(rows, key=lambda r: r.elbo if math.isfinite(r.elbo) else -math.inf)
    vae = meta.get("vae", {})
    train = meta.get("train", {})
    body = [
        _INTRO,
        "<p>"
        + html.escape(
            f"data set: {vae.get('dataset', '?')}, likelihood {vae.get('likelihood', '?')}, "
            f"z_dim {vae.get('z_dim', '?')}, hidden {vae.get('hidden', '?')}; "
            f"{train.get('epochs', '?')} epochs, batch {train.get('batch_size', '?')}, "
            f"lr {train.get('lr', '?')}, seed {train.get('seed', '?')}; "
            f"IWAE K = {rows[0].iwae_k} on {rows[0].n_images} test images."
        )
        + f" Best ELBO: beta = {best.beta:g} ({format_value(best.elbo, 3)} nats).</p>",
        html_figure(
            "rate_distortion.png",
            "Distortion against rate, one point per beta, with the lines of equal ELBO.",
        ),
        "<h2>Runs</h2>",
        html_table(table, _COLUMNS),
        _SURGERY,
        f"<pre>{html.escape(format_table(rows))}</pre>",
    ]
    index = out_dir / "index.html"
    write_atomically(index, html_page(f"Beta sweep: {path.name}", body))
    return index


def _table_row(
    row: SweepRow, path: Path, out_dir: Path, run_report: Callable[[Path], Path] | None
) -> list[str]:
    """One run's cells, its folder linked to its own report when one is written."""
    link = html.escape(row.run)
    run_dir = path / row.run
    if run_report is not None and (run_dir / "config.json").is_file():
        rel = os.path.relpath(run_report(run_dir), out_dir)
        link = f'<a href="{html.escape(rel)}">{html.escape(row.run)}</a>'
    active = "–" if row.active_units is None else f"{row.active_units} / {row.z_dim}"
    return [
        f"{row.beta:g}",
        *(
            format_value(value, 3)
            for value in (
                row.rate,
                row.distortion,
                row.elbo,
                row.iwae,
                row.mutual_info,
                row.marginal_kl,
            )
        ),
        active,
        link,
    ]
