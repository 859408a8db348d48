"""Beta sweeps: one run per KL weight beta (same seed, same budget), each evaluated at beta = 1.

Training with beta minimises D + beta R (distortion D = -E_x E_q[log p(x | z)], rate
R = E_x KL(q(z | x) || p(z))); evaluating every run at beta = 1 puts them on one
rate-distortion plane, where the lines D + R = const have equal ELBO = -(D + R): beta moves
the model along the curve (Alemi et al. 2018), trading information in z against distortion.

    OUT/beta=<b>/        one run folder per beta (see :mod:`ppl_vae.runs.folder`), evaluated
    OUT/sweep.csv        the table: beta, R, D, ELBO, IWAE, active units, I_q(x; z), ...
    OUT/sweep.json       the same rows with the sweep's settings
    OUT/rate_distortion.png
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ppl_vae.atomic import json_ready, write_atomically, write_json

if TYPE_CHECKING:  # imported where used: the CLI builds its parser without them
    from matplotlib.figure import Figure

    from ppl_vae.runs.evaluation import Evaluation
    from ppl_vae.runs.folder import TrainedRun
    from ppl_vae.training import TrainConfig
    from ppl_vae.vae import VAEConfig

__all__ = [
    "DEFAULT_BETAS",
    "SWEEP_COLUMNS",
    "SweepRow",
    "format_table",
    "parse_betas",
    "read_sweep",
    "run_folder_name",
    "run_sweep",
    "sweep_figure",
    "write_sweep",
]

DEFAULT_BETAS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""The betas of ``ppl-vae sweep`` when ``--beta`` is not given."""

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepRow:
    """One run of a sweep, evaluated on test images at beta = 1 (nats per image).

    ``rate`` R = E_x KL(q(z | x) || p(z)), ``distortion`` D = -E_x E_q[log p(x | z)],
    ``elbo`` = -(D + R), ``iwae`` the K-sample bound (K = ``iwae_k``); ``mutual_info`` and
    ``marginal_kl`` split the rate as I_q(x; z) + KL(q(z) || p(z)) over the same
    ``n_images`` images (:func:`ppl_vae.vae.diagnostics.elbo_surgery`); ``run`` is the run
    folder relative to the sweep folder.
    """

    beta: float
    rate: float
    distortion: float
    elbo: float
    elbo_se: float
    iwae: float
    iwae_se: float
    iwae_k: int
    active_units: int | None
    z_dim: int | None
    mutual_info: float
    marginal_kl: float
    n_images: int
    run: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (non-finite floats as ``None``)."""
        return json_ready(asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SweepRow:
        """Inverse of :meth:`to_dict` (also reads the strings of ``sweep.csv``)."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            value = values.get(f.name)
            if f.name == "run":
                kwargs[f.name] = str(value)
            elif value is None or value == "":
                kwargs[f.name] = None if f.name in ("active_units", "z_dim") else math.nan
            elif f.name in ("iwae_k", "active_units", "z_dim", "n_images"):
                kwargs[f.name] = int(value)
            else:
                kwargs[f.name] = float(value)
        return cls(**kwargs)


SWEEP_COLUMNS = tuple(f.name for f in fields(SweepRow))
"""Columns of ``sweep.csv``, in order."""


def parse_betas(text: str | Iterable[float]) -> tuple[float, ...]:
    """``"0.1,0.25,1"`` (or numbers) -> distinct finite betas >= 0, in the order given."""
    try:
        if isinstance(text, str):
            values = tuple(float(v) for v in text.split(",") if v.strip())
        else:
            values = tuple(float(v) for v in text)
    except ValueError:
        raise ValueError(f"bad betas {text!r}: use comma-separated numbers, e.g. 0.5,1,2") from None
    if not values:
        raise ValueError("no beta given: use comma-separated numbers, e.g. 0.5,1,2")
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"each beta must be a finite number >= 0, got {bad}")
    names = [run_folder_name(v) for v in values]
    if len(set(names)) != len(names):
        raise ValueError(f"betas repeat: {list(values)}")
    return values


def run_folder_name(beta: float) -> str:
    """The run folder of ``beta`` inside a sweep folder: ``beta=<b>`` (``%g``)."""
    return f"beta={beta:g}"


def run_sweep(
    out: str | os.PathLike[str],
    betas: Sequence[float],
    vae_config: VAEConfig,
    train_config: TrainConfig,
    *,
    iwae_k: int = 100,
    test_images: int | None = 1000,
    train_subset: int | None = None,
    data_dir: str | None = None,
    eval_device: str | None = None,
    on_row: Callable[[SweepRow], None] | None = None,
) -> list[SweepRow]:
    """Train one run per beta into ``OUT/beta=<b>/`` (``train_config`` with its ``beta``
    replaced: same seed, same epochs), evaluate each at beta = 1 on the first
    ``test_images`` test images (``None``: all) with the IWAE bound at K = ``iwae_k``, split
    its rate by ELBO surgery, and write the table and the rate-distortion plane after every
    run (so a stopped sweep keeps what it finished). ``on_row`` sees each row as it comes.

    :param eval_device: where to evaluate (default: the training device).
    """
    from ppl_vae.runs.folder import evaluate_run, load_run, train_run
    from ppl_vae.training import resolve_device

    betas = parse_betas(betas)
    if iwae_k < 1:
        raise ValueError(f"iwae_k must be >= 1, got {iwae_k}")
    if test_images is not None and test_images < 1:
        raise ValueError(f"test_images must be >= 1, got {test_images}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = eval_device or str(resolve_device(train_config.device))
    meta = {
        "betas": list(betas),
        "iwae_k": iwae_k,
        "test_images": test_images,
        "train_subset": train_subset,
        "vae": vae_config.to_dict(),
        "train": train_config.to_dict(),
    }
    rows: list[SweepRow] = []
    for beta in betas:
        name = run_folder_name(beta)
        config = dataclasses.replace(train_config, beta=beta)
        train_run(out / name, vae_config, config, data_dir=data_dir, train_subset=train_subset)
        result = evaluate_run(
            out / name,
            iwae_samples=iwae_k,
            limit=test_images,
            device=device,
            progress=train_config.progress,
        )
        run = load_run(out / name, device=device, data_dir=data_dir)
        row = _sweep_row(beta, name, result, run, test_images)
        rows.append(row)
        write_sweep(out, rows, meta=meta)
        if on_row is not None:
            on_row(row)
    return rows


def _sweep_row(
    beta: float, name: str, result: Evaluation, run: TrainedRun, test_images: int | None
) -> SweepRow:
    """The row of one evaluated run, its rate split by ELBO surgery on the same test images."""
    from ppl_vae.vae import elbo_surgery, posterior_moments

    images = run.dataset.test.images[:test_images] if test_images else run.dataset.test.images
    with torch.no_grad():
        prior = run.vae.prior_distribution()  # None for N(0, I), the sweep's own prior
        surgery = elbo_surgery(*posterior_moments(run.vae.encoder, images), prior=prior)
    return SweepRow(
        beta=beta,
        rate=result.rate,
        distortion=result.distortion,
        elbo=result.elbo,
        elbo_se=result.elbo_se,
        iwae=result.iwae,
        iwae_se=result.iwae_se,
        iwae_k=result.iwae_k,
        active_units=result.active_units,
        z_dim=result.z_dim,
        mutual_info=surgery.mutual_info,
        marginal_kl=surgery.marginal_kl,
        n_images=result.n_images,
        run=name,
    )


def write_sweep(
    out: str | os.PathLike[str], rows: Sequence[SweepRow], *, meta: dict[str, Any] | None = None
) -> list[Path]:
    """Write ``sweep.csv``, ``sweep.json`` (rows and ``meta``) and ``rate_distortion.png``."""
    from ppl_vae.runs.image_plots import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SWEEP_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.to_dict().items()})
    write_atomically(out / "sweep.csv", buffer.getvalue())
    document = {**(meta or {}), "rows": [row.to_dict() for row in rows]}
    write_json(out / SWEEP_FILE, document, indent=1)
    figure = save(sweep_figure(rows), out / "rate_distortion.png")
    return [out / "sweep.csv", out / SWEEP_FILE, figure]


def read_sweep(path: str | os.PathLike[str]) -> list[SweepRow]:
    """The rows of a sweep folder's ``sweep.json`` (or of that file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / SWEEP_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {path}: write a sweep with 'ppl-vae sweep --out FOLDER'"
        ) from None
    except ValueError:
        raise ValueError(f"{path} is not valid JSON") from None
    return [SweepRow.from_dict(row) for row in document.get("rows", [])]


def sweep_figure(rows: Sequence[SweepRow], *, title: str | None = None) -> Figure:
    """The rate-distortion plane of a sweep: D against R, one point per beta, with the lines
    of equal ELBO D + R = const (:func:`ppl_vae.runs.latent_plots.rate_distortion_figure`)."""
    from ppl_vae.runs.latent_plots import rate_distortion_figure

    kwargs = {} if title is None else {"title": title}
    return rate_distortion_figure(
        [r.rate for r in rows], [r.distortion for r in rows], [r.beta for r in rows], **kwargs
    )


def format_table(rows: Sequence[SweepRow]) -> str:
    """The sweep as a text table (nats per image, at beta = 1)."""
    header = (
        f"{'beta':>6} {'rate R':>9} {'distort. D':>11} {'ELBO':>10} {'IWAE':>10} "
        f"{'I_q(x;z)':>9} {'KL(q(z)||p)':>11} {'active':>7}"
    )
    lines = [header]
    for r in rows:
        active = "" if r.active_units is None else f"{r.active_units}/{r.z_dim}"
        lines.append(
            f"{r.beta:>6g} {r.rate:>9.3f} {r.distortion:>11.3f} {r.elbo:>10.3f} "
            f"{r.iwae:>10.3f} {r.mutual_info:>9.3f} {r.marginal_kl:>11.3f} {active:>7}"
        )
    if rows:
        k = rows[0].iwae_k
        lines.append(
            f"(test images: {rows[0].n_images}; IWAE with K = {k}; ELBO = -(D + R); "
            "rate = I_q(x;z) + KL(q(z)||p(z)))"
        )
    return "\n".join(lines)
