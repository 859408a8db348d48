"""Figures of the latent code and of the bounds, each a function from data to a matplotlib
Figure (write them with :func:`ppl_vae.runs.image_plots.save`).

- the latent space: posterior means E_q[z | x] by class against the prior N(0, I)'s circles;
- KL(N(mu, sigma^2) || N(0, 1)) = (mu^2 + sigma^2 - 1) / 2 - log sigma over a (mu, sigma) grid;
- the rate-distortion plane of a beta sweep, where D + R = const has equal ELBO = -(D + R);
- the IWAE bound against K: ELBO <= IWAE_K <= IWAE_K' <= log p(x) for K <= K' (in
  expectation);
- the binary toy's exact ELBO against its guide: ELBO(q) = log p(x) - KL(q || p(z | x)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = [
    "gaussian_kl_figure",
    "iwae_figure",
    "latent_space_figure",
    "rate_distortion_figure",
    "toy_gap_figure",
]


def _project(
    mu: torch.Tensor, log_var: torch.Tensor | None, kl_per_dim: Sequence[float] | None, method: str
) -> tuple[torch.Tensor, tuple[str, str]]:
    """(N, 2) coordinates of the codes and the axis labels."""
    z_dim = mu.shape[1]
    if z_dim == 1:
        return torch.cat([mu, torch.zeros_like(mu)], 1), ("z_1", "")
    if z_dim == 2:
        return mu, ("z_1", "z_2")
    if method == "pca":
        # Directions of largest spread of the centred codes; the projection keeps the
        # origin, so the prior N(0, I) projects to N(0, I_2) and its circles still apply.
        _, _, v = torch.linalg.svd(mu - mu.mean(0), full_matrices=False)
        return mu @ v[:2].T, ("PC 1 of the means", "PC 2 of the means")
    if method != "kl":
        raise ValueError(f"unknown projection {method!r}; choose 'kl' or 'pca'")
    if kl_per_dim is None:
        if log_var is None:
            raise ValueError("the 'kl' projection needs log_var or kl_per_dim (or use 'pca')")
        from ppl_vae.vae import kl_per_dimension

        kl = kl_per_dimension(mu, log_var)
    else:
        kl = torch.as_tensor(list(kl_per_dim), dtype=torch.float64)
    top = torch.argsort(kl, descending=True)[:2].tolist()
    first, second = (f"z_{i + 1} (KL {float(kl[i]):.2f})" for i in top)
    return mu[:, top], (first, second)


def _legend_names(
    present: Sequence[int | float], class_names: Sequence[str] | None
) -> dict[int | float, str]:
    """The legend entry of each label present: the label itself, or its class name."""
    if class_names is None:
        return {k: str(k) for k in present}
    names = [str(n) for n in class_names]
    stray = [k for k in present if not (float(k).is_integer() and 0 <= k < len(names))]
    if stray:
        raise ValueError(
            f"labels {stray[:5]} have no entry in the {len(names)} class_names: labels must "
            f"be class indices 0..{len(names) - 1}"
        )
    return {k: names[int(k)] for k in present}


def latent_space_figure(
    mu: torch.Tensor,
    labels: torch.Tensor | Sequence[int] | None = None,
    *,
    log_var: torch.Tensor | None = None,
    kl_per_dim: Sequence[float] | None = None,
    projection: str = "kl",
    max_points: int = 3000,
    title: str = "Posterior means E_q[z | x] of test images",
    class_names: Sequence[str] | None = None,
    prior_draws: torch.Tensor | None = None,
) -> Figure:
    """Posterior means (N, z) as points coloured by class, with the prior N(0, I)'s 1 and 2
    sigma circles dashed, or, for a learned prior, ``prior_draws`` (M, z) from it as grey
    dots on the same axes. For z > 2: the two dimensions with the largest KL
    (``projection="kl"``, from ``kl_per_dim`` or ``log_var``) or the first two principal
    directions of the means (``"pca"``, the only one with ``prior_draws``). The legend names
    each class present by its label, or by ``class_names[label]`` when given."""
    mu = torch.as_tensor(mu).detach().double().cpu()
    if mu.dim() != 2 or mu.shape[0] == 0:
        raise ValueError(f"mu must be (N, z) with N >= 1, got shape {tuple(mu.shape)}")
    if class_names is not None and labels is None:
        raise ValueError("class_names names the classes of labels: pass labels too")
    lv = None if log_var is None else torch.as_tensor(log_var).detach().double().cpu()
    draws = None
    if prior_draws is not None:
        if projection != "pca" and mu.shape[1] > 2:
            raise ValueError("prior_draws are drawn on the means' principal directions: pca")
        draws = torch.as_tensor(prior_draws).detach().double().cpu()
        projected, (xlabel, ylabel) = _project(torch.cat([mu, draws]), None, None, "pca")
        if mu.shape[1] > 2:  # the means' own directions, the draws projected on them
            _, _, v = torch.linalg.svd(mu - mu.mean(0), full_matrices=False)
            projected = torch.cat([mu, draws]) @ v[:2].T
        points, draws = projected[: mu.shape[0]], projected[mu.shape[0] :]
    else:
        points, (xlabel, ylabel) = _project(mu, lv, kl_per_dim, projection)
    points = points[:max_points]
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    theta = torch.linspace(0, 2 * math.pi, 200)
    if draws is not None:
        ax.scatter(draws[:, 0], draws[:, 1], s=4, color="k", alpha=0.25, label="draws from p(z)")
    elif mu.shape[1] == 1:
        for r in (1, 2):
            for sign in (-1, 1):
                ax.axvline(sign * r, color="gray", ls="--", lw=1)
        jitter = torch.rand(points.shape[0], generator=torch.Generator().manual_seed(0)) - 0.5
        points = torch.stack([points[:, 0], jitter], 1)
        ylabel = "(jitter)"
    else:
        for r in (1, 2):
            ax.plot(
                r * theta.cos(),
                r * theta.sin(),
                "--",
                color="gray",
                lw=1,
                label="prior's 1, 2 sigma" if r == 1 else None,
            )
    if labels is not None:
        classes = torch.as_tensor(labels).reshape(-1)[: points.shape[0]].cpu()
        present = sorted(set(classes.tolist()))
        names = _legend_names(present, class_names)
        cmap = plt.get_cmap("tab10")
        for k in present:
            keep = classes == k
            ax.scatter(
                points[keep, 0],
                points[keep, 1],
                s=6,
                color=cmap(int(k) % 10),
                label=names[k],
                alpha=0.7,
            )
    else:
        ax.scatter(points[:, 0], points[:, 1], s=6, color="tab:blue", alpha=0.7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if mu.shape[1] > 1:
        ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10)
    return fig


def gaussian_kl_figure(
    mu_max: float = 3.0,
    sigma_max: float = 3.0,
    *,
    n: int = 200,
    title: str = "KL(N(mu, sigma^2) || N(0, 1))",
) -> Figure:
    """KL(N(mu, sigma^2) || N(0, 1)) = (mu^2 + sigma^2 - 1) / 2 - log sigma over mu in
    [-mu_max, mu_max], sigma in (0, sigma_max], with contours; the minimum, 0, at (0, 1)."""
    if mu_max <= 0 or sigma_max <= 0 or n < 2:
        raise ValueError("mu_max and sigma_max must be > 0 and n >= 2")
    mu = torch.linspace(-mu_max, mu_max, n, dtype=torch.float64)
    sigma = torch.linspace(sigma_max / n, sigma_max, n, dtype=torch.float64)
    m, s = torch.meshgrid(mu, sigma, indexing="xy")
    normal = torch.distributions.Normal
    kl = torch.distributions.kl_divergence(normal(m, s), normal(0.0, 1.0))
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    image = ax.pcolormesh(
        m.numpy(), s.numpy(), torch.log10(kl + 1e-3).numpy(), cmap="viridis", shading="auto"
    )
    levels = [0.1, 0.25, 0.5, 1, 2, 4, 8]
    contours = ax.contour(
        m.numpy(), s.numpy(), kl.numpy(), levels=levels, colors="white", linewidths=0.8
    )
    ax.clabel(contours, fmt="%g", fontsize=7)
    ax.plot(
        [0],
        [1],
        marker="*",
        color="red",
        ms=12,
        ls="",
        label="minimum KL = 0 at (mu, sigma) = (0, 1)",
    )
    fig.colorbar(image, ax=ax, label="log10(KL + 0.001), KL in nats")
    ax.set_xlabel("mu")
    ax.set_ylabel("sigma")
    ax.legend(fontsize=7, loc="upper center")
    ax.set_title(title, fontsize=10)
    return fig


def _label_betas(
    ax: Axes,
    rates: Sequence[float],
    distortions: Sequence[float],
    betas: Sequence[float],
    near_r: float,
    near_d: float,
) -> None:
    """Label each point with its beta; points that (nearly) coincide, e.g. collapsed runs,
    within ``near_r`` in R and ``near_d`` in D, get their labels stacked."""
    placed: list[tuple[float, float]] = []
    for r, d, b in zip(rates, distortions, betas, strict=True):
        stack = sum(abs(r - pr) < near_r and abs(d - pd) < near_d for pr, pd in placed)
        placed.append((r, d))
        ax.annotate(
            f"beta={float(b):g}",
            (r, d),
            textcoords="offset points",
            xytext=(5, 4 + 10 * stack),
            fontsize=8,
        )


def rate_distortion_figure(
    rates: Sequence[float],
    distortions: Sequence[float],
    betas: Sequence[float] | None = None,
    *,
    n_lines: int = 7,
    title: str = "Rate-distortion plane (evaluated at beta = 1)",
) -> Figure:
    """D against R, one point per run (labelled by its beta), with the lines D + R = const
    dashed: points on one line have the same ELBO = -(D + R) (Alemi et al. 2018). Training
    with beta minimises D + beta R, so beta moves the model along the curve: beta < 1 buys
    rate (information in z) for distortion, beta > 1 the reverse."""
    rates = [float(r) for r in rates]
    distortions = [float(d) for d in distortions]
    if len(rates) != len(distortions) or not rates:
        raise ValueError("rates and distortions must be non-empty and of the same length")
    if betas is not None and len(betas) != len(rates):
        raise ValueError("betas must have one entry per point")
    fig, ax = plt.subplots(figsize=(6.0, 4.8))
    r_lo, r_hi = min(rates), max(rates)
    d_lo, d_hi = min(distortions), max(distortions)
    pad_r = 0.15 * (r_hi - r_lo or max(1.0, abs(r_hi)))
    pad_d = 0.15 * (d_hi - d_lo or max(1.0, abs(d_hi)))
    x_lo, x_hi = max(0.0, r_lo - pad_r), r_hi + pad_r
    y_lo, y_hi = d_lo - pad_d, d_hi + pad_d
    totals = [r + d for r, d in zip(rates, distortions, strict=True)]
    best = min(range(len(totals)), key=totals.__getitem__)
    c_lo, c_hi = x_lo + y_lo, x_hi + y_hi
    xs = torch.linspace(x_lo, x_hi, 2).tolist()
    for i, c in enumerate(torch.linspace(c_lo, c_hi, n_lines + 2)[1:-1].tolist()):
        ax.plot(
            xs,
            [c - x for x in xs],
            ls="--",
            color="gray",
            lw=0.8,
            label="D + R = const (equal ELBO)" if i == 0 else None,
        )
    c = totals[best]
    ax.plot(
        xs,
        [c - x for x in xs],
        ls="-",
        color="tab:green",
        lw=1.2,
        label=f"best ELBO = {-c:.2f} nats",
    )
    order = sorted(range(len(rates)), key=rates.__getitem__)
    ax.plot(
        [rates[i] for i in order],
        [distortions[i] for i in order],
        "-",
        color="tab:blue",
        lw=1,
        alpha=0.5,
    )
    ax.scatter(rates, distortions, color="tab:blue", zorder=3, label="one run per beta")
    if betas is not None:
        _label_betas(ax, rates, distortions, betas, 0.03 * (x_hi - x_lo), 0.03 * (y_hi - y_lo))
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlabel("rate R = E_x KL(q(z|x) || p(z))  [nats]")
    ax.set_ylabel("distortion D = -E_x E_q[log p(x|z)]  [nats]")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


def iwae_figure(
    ks: Sequence[int],
    iwae: Sequence[float],
    elbo: float,
    *,
    iwae_se: Sequence[float] | None = None,
    title: str = "IWAE bound against the number of importance samples K",
) -> Figure:
    """IWAE_K against K on a log axis, with the ELBO as a line: the bound rises from the
    ELBO (K = 1) towards log p(x) as K grows, closing the gap KL(q || p(z | x)). Error bars
    are ± 2 ``iwae_se`` (pass the paired s.e. of IWAE_K - ELBO to show how sure the rise is)."""
    ks = [int(k) for k in ks]
    iwae = [float(v) for v in iwae]
    if len(ks) != len(iwae) or not ks:
        raise ValueError("ks and iwae must be non-empty and of the same length")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.axhline(elbo, color="tab:orange", ls="--", lw=1.5, label=f"ELBO = {elbo:.3f}")
    ax.fill_between(
        ks,
        [elbo] * len(ks),
        iwae,
        color="tab:blue",
        alpha=0.12,
        label=f"IWAE - ELBO, {iwae[-1] - elbo:.3f} nats at K = {ks[-1]}",
    )
    yerr = None if iwae_se is None else [2 * float(s) for s in iwae_se]
    ax.errorbar(
        ks,
        iwae,
        yerr=yerr,
        fmt="o-",
        color="tab:blue",
        ms=4,
        capsize=2,
        label="IWAE_K" + (" ± 2 s.e." if yerr is not None else ""),
    )
    ax.set_xscale("log")
    ax.set_xlabel("K (importance samples)")
    ax.set_ylabel("nats per image")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


def toy_gap_figure(
    qs: Sequence[float],
    elbos: Sequence[float],
    log_evidence: float,
    *,
    posterior: float = 0.8,
    title: str = "Binary toy, x = 1: the exact ELBO against q(z=1 | x=1)",
) -> Figure:
    """The exact ELBO and log p(x) against the guide's q(z=1 | x=1); the gap between them is
    KL(q || p(z | x)), which touches zero at the true posterior q = ``posterior``."""
    qs = [float(q) for q in qs]
    elbos = [float(e) for e in elbos]
    if len(qs) != len(elbos) or not qs:
        raise ValueError("qs and elbos must be non-empty and of the same length")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.axhline(log_evidence, color="black", lw=1.5, label=f"log p(x) = {log_evidence:.4f}")
    ax.plot(qs, elbos, color="tab:orange", lw=1.8, label="exact ELBO (enumeration)")
    ax.fill_between(
        qs,
        elbos,
        [log_evidence] * len(qs),
        color="tab:orange",
        alpha=0.15,
        label="gap = KL(q || p(z | x))",
    )
    ax.axvline(
        posterior, color="gray", ls=":", lw=1, label=f"true posterior p(z=1 | x=1) = {posterior:g}"
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(max(min(elbos), log_evidence - 2.0), log_evidence + 0.1)
    ax.set_xlabel("q(z=1 | x=1)")
    ax.set_ylabel("nats")
    ax.legend(fontsize=8, loc="lower center")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig
