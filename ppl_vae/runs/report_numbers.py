"""The key numbers of a run report: training (``history.json``), test evaluation
(``evaluation.json``) and the latent code (ELBO surgery, active units, KL per dimension), as
table rows [quantity, value, note]."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ppl_vae.runs.page import format_value
from ppl_vae.vae import ElboSurgery, IwaeCurve, rate_distortion

__all__ = ["CodeSummary", "code_numbers", "evaluation_numbers", "training_numbers"]


@dataclass(frozen=True)
class CodeSummary:
    """The latent code of the report's test images: KL per dimension, active units, and the
    rate split by ELBO surgery."""

    kl_dims: torch.Tensor | None  # None under a learned prior (it does not factorise)
    n_active: int
    surgery: ElboSurgery
    z_dim: int


def training_numbers(history: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of the key numbers from ``history.json``: the last epoch and the best one."""
    last = history[-1]
    best = max((r for r in history if r.get("val_elbo") is not None), key=lambda r: r["val_elbo"])
    points = rate_distortion(history)
    fmt = format_value
    return [
        ["epochs trained (steps)", f"{last['epoch']} ({last['step']})", ""],
        ["beta at the last step", fmt(last.get("beta"), 3), "training weight of the KL"],
        [
            "validation ELBO, last epoch",
            f"{fmt(last['val_elbo'])} ± {fmt(last['val_elbo_se'])}",
            f"best {fmt(best['val_elbo'])} at epoch {best['epoch']}",
        ],
        [
            "validation rate R / distortion D, last epoch",
            f"{fmt(points[-1].rate)} / {fmt(points[-1].distortion)}",
            "ELBO = -(D + R)",
        ],
    ]


def evaluation_numbers(evaluation: dict[str, Any] | None, path: Path) -> list[list[str]]:
    """Rows of the key numbers from ``evaluation.json``, or one saying how to write it."""
    if not evaluation:
        return [["test ELBO and IWAE", "–", f"not evaluated yet: ppl-vae evaluate {path}"]]
    get, fmt = evaluation.get, format_value
    rows = []
    if get("accuracy") is not None:
        rows.append(
            [
                "test accuracy of q(y | x)",
                f"{fmt(100 * get('accuracy'), 2)}% ± {fmt(100 * get('accuracy_se'), 2)}",
                f"{get('num_classes')} classes; the ELBO and IWAE sum the label out",
            ]
        )
    return [
        *rows,
        [
            "test ELBO (beta = 1)",
            f"{fmt(get('elbo'))} ± {fmt(get('elbo_se'))}",
            f"{get('n_images')} images, checkpoint {get('checkpoint', '?')}; "
            f"{fmt(get('bits_per_dim_elbo'))} bits/dim",
        ],
        [
            "  rate R = KL(q(z|x) || p(z))",
            fmt(get("rate")),
            "sampled (no closed form for the prior)" if get("kl_sampled") else "",
        ],
        ["  distortion D = -E_q[log p(x|z)]", fmt(get("distortion")), ""],
        [
            f"test IWAE, K = {get('iwae_k')}",
            f"{fmt(get('iwae'))} ± {fmt(get('iwae_se'))}",
            f"{fmt(get('bits_per_dim_iwae'))} bits/dim; IWAE - ELBO {fmt(get('gap_elbo_iwae'))}",
        ],
    ]


def code_numbers(code: CodeSummary, curve: IwaeCurve | None) -> list[list[str]]:
    """Rows of the key numbers computed from the codes and the IWAE curve."""
    surgery, fmt = code.surgery, format_value
    how = "sampled (learned prior)" if surgery.sampled_kl else "closed form"
    marginal = fmt(surgery.marginal_kl)
    if surgery.marginal_kl_se is not None:
        marginal += f" ± {fmt(surgery.marginal_kl_se)}"
    rows = [
        [
            "rate E_x KL(q(z|x) || p(z))",
            fmt(surgery.avg_kl),
            f"{how}, {surgery.n_images} test images",
        ],
        [
            "  = I_q(x; z)",
            f"{fmt(surgery.mutual_info)} ± {fmt(surgery.mutual_info_se)}",
            f"ELBO surgery; at most log N = {fmt(surgery.log_n, 3)}",
        ],
        ["  + KL(q(z) || p(z))", marginal, "aggregate posterior vs prior"],
        ["active units", f"{code.n_active} of {code.z_dim}", "Cov_x(E_q[z_u]) > 0.01"],
    ]
    if code.kl_dims is not None:
        per_dim = " ".join(f"{v:.3f}" for v in code.kl_dims.tolist())
        rows.append(["KL per latent dimension", per_dim, ""])
    if curve is not None:
        rows.append(
            [
                f"IWAE_{curve.num_samples} - ELBO",
                fmt(curve.iwae[-1] - curve.elbo),
                f"{curve.n_images} test images (figure below)",
            ]
        )
    return rows
