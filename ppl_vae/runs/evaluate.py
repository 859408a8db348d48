"""Test-set numbers of a trained VAE: ELBO, its two terms, the IWAE bound, and the latent code.

Every number is per image, in nats, at beta = 1 (the true ELBO whatever beta training used):

- ELBO = E_q[log p(x | z)] - KL(q(z | x) || p(z)) = -(distortion + rate), a lower bound on
  log p(x); the KL is closed-form, the reconstruction term a Monte Carlo average.
- IWAE_K = E[log (1/K) sum_k p(x, z_k) / q(z_k | x)], z_k ~ q(z | x) (Burda et al. 2015), also a
  lower bound on log p(x); ELBO <= IWAE_K <= IWAE_{K'} <= log p(x) in expectation for K <= K'.
  -IWAE_K is therefore an upper bound on the test negative log-likelihood.
- bits/dim = -value / (D ln 2), D the number of values in one image.

Standard errors are across images (s.d. / sqrt(N)); the IWAE - ELBO gap's s.e. comes from the
per-image paired differences, which removes the image-to-image spread the two share.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ppl_vae.atomic import json_ready
from ppl_vae.elbo import inspect_pair, iwae_log_evidence, sampled_site_terms
from ppl_vae.models.vae import check_data
from ppl_vae.rng import forked_rng
from ppl_vae.vae import (
    ACTIVE_THRESHOLD,
    active_units,
    collapse_warning,
    kl_per_dimension,
    posterior_moments,
    vae_iwae,
)

__all__ = ["FLOAT_BUDGET", "Evaluation", "evaluate"]

FLOAT_BUDGET = 32 * 2**20
"""Largest (particles x images x D) block evaluated at once: 32 Mi floats, 128 MiB in float32.
The decoder's output and its log-probabilities are blocks of this size; hidden layers wider than
D (e.g. conv decoders) multiply it, so pass smaller ``batch_size`` / ``iwae_chunk`` for those."""

DEFAULT_IWAE_CHUNK = 1000
"""Importance samples per pass when neither ``iwae_chunk`` nor ``batch_size`` is given."""

_LN2 = math.log(2.0)
_DERIVED = (
    "distortion",
    "rate",
    "bits_per_dim_elbo",
    "bits_per_dim_iwae",
    "gap_bits_per_dim",
)


def _bits_per_dim(nats: float, dim: int) -> float:
    return -nats / (dim * _LN2)


@dataclass(frozen=True)
class Evaluation:
    """Per-image test-set numbers of a VAE at beta = 1, in nats unless stated.

    ``elbo`` = ``reconstruction`` - ``kl``; ``iwae`` is the K-sample importance-weighted bound
    (K = ``iwae_k``); both are lower bounds on log p(x). ``gap_elbo_iwae`` = iwae - elbo, with
    ``gap_se`` from the paired per-image differences. ``active_units`` and ``kl_per_dim`` are
    ``None`` when no encoder was available. ``elbo_per_image`` and ``iwae_per_image`` hold the
    (N,) values behind the means (CPU tensors; left out of :meth:`to_dict` by default).
    """

    n_images: int
    image_dim: int
    elbo: float
    elbo_se: float
    reconstruction: float
    kl: float
    iwae: float
    iwae_se: float
    iwae_k: int
    gap_elbo_iwae: float
    gap_se: float
    active_units: int | None
    z_dim: int | None
    kl_per_dim: tuple[float, ...] | None
    elbo_particles: int
    seconds: float
    device: str = "cpu"
    elbo_per_image: Tensor | None = field(default=None, repr=False, compare=False)
    iwae_per_image: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def distortion(self) -> float:
        """D = -E_q[log p(x | z)], nats per image."""
        return -self.reconstruction

    @property
    def rate(self) -> float:
        """R = KL(q(z | x) || p(z)), nats per image; ELBO = -(D + R)."""
        return self.kl

    @property
    def bits_per_dim_elbo(self) -> float:
        """-ELBO / (D ln 2): an upper bound on the bits per value needed to code the data."""
        return _bits_per_dim(self.elbo, self.image_dim)

    @property
    def bits_per_dim_iwae(self) -> float:
        """-IWAE / (D ln 2): a tighter upper bound than the ELBO's."""
        return _bits_per_dim(self.iwae, self.image_dim)

    @property
    def gap_bits_per_dim(self) -> float:
        """bits/dim(ELBO) - bits/dim(IWAE) = gap / (D ln 2)."""
        return self.gap_elbo_iwae / (self.image_dim * _LN2)

    @property
    def collapse(self) -> str | None:
        """The posterior-collapse warning of :func:`ppl_vae.vae.diagnostics.collapse_warning`."""
        if self.active_units is None:
            return None
        return collapse_warning(self.rate, self.active_units)

    def to_dict(self, per_image: bool = False) -> dict[str, Any]:
        """Plain JSON-ready values: the fields, the derived quantities (distortion, rate,
        bits/dim) and, with ``per_image``, the per-image values as lists. Non-finite floats
        (a s.e. of a single image) become ``None``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                if per_image:
                    out[f.name] = [json_ready(v) for v in value.tolist()]
                continue
            if f.name.endswith("_per_image"):
                continue
            if isinstance(value, tuple):
                value = [json_ready(v) for v in value]
            out[f.name] = json_ready(value)
        for name in _DERIVED:
            out[name] = json_ready(getattr(self, name))
        return out

    def to_json(self, per_image: bool = False, **kwargs: Any) -> str:
        """:meth:`to_dict` as a JSON string (strict JSON: no NaN)."""
        return json.dumps(self.to_dict(per_image), allow_nan=False, **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        """Rebuild from :meth:`to_dict` output (derived quantities are recomputed)."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name.endswith("_per_image"):
                value = None if value is None else torch.tensor(_nan(value), dtype=torch.float64)
            elif f.name == "kl_per_dim":
                value = None if value is None else tuple(float(v) for v in value)
            elif value is None and f.name not in ("active_units", "z_dim"):
                value = math.nan
            kwargs[f.name] = value
        return cls(**kwargs)

    def __str__(self) -> str:
        d = self.image_dim
        rows = [
            ("ELBO", self.elbo, self.elbo_se, self.bits_per_dim_elbo),
            ("  reconstruction E_q[log p(x|z)]", self.reconstruction, None, None),
            ("  KL(q(z|x) || p(z))", self.kl, None, None),
            ("distortion D = -reconstruction", self.distortion, None, None),
            ("rate R = KL", self.rate, None, None),
            (f"IWAE, K = {self.iwae_k}", self.iwae, self.iwae_se, self.bits_per_dim_iwae),
            ("gap IWAE - ELBO (paired s.e.)", self.gap_elbo_iwae, self.gap_se, None),
        ]
        lines = [
            f"VAE evaluation: {self.n_images} images of D = {d} values, beta = 1, "
            f"{self.elbo_particles} ELBO particle(s) per image, {self.seconds:.1f} s "
            f"on {self.device}",
            f"  {'quantity':<34} {'nats/image':>12} {'± s.e.':>10} {'bits/dim':>10}",
        ]
        for label, value, se, bpd in rows:
            se_text = "" if se is None else f"{se:.4f}"
            bpd_text = "" if bpd is None else f"{bpd:.5f}"
            lines.append(f"  {label:<34} {value:>12.4f} {se_text:>10} {bpd_text:>10}")
        lines.append(
            "  Both are LOWER bounds on log p(x): ELBO <= IWAE_K <= log p(x) (in expectation),"
        )
        lines.append("  so -IWAE_K (and -ELBO) are upper bounds on the negative log-likelihood.")
        if self.active_units is not None and self.kl_per_dim is not None:
            lines.append(
                f"  active units: {self.active_units} of {self.z_dim} "
                f"(Cov_x(E_q[z_u]) > {ACTIVE_THRESHOLD})"
            )
            kl_text = " ".join(f"{v:.3f}" for v in self.kl_per_dim)
            lines.append(f"  KL per latent dimension (nats/image): {kl_text}")
        warning = self.collapse
        if warning is not None:
            lines.append(f"  WARNING: {warning}")
        return "\n".join(lines)


def _nan(values: list) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _mean_se(values: Tensor) -> tuple[float, float]:
    """Mean and standard error (s.d. / sqrt(N)) of per-image values; s.e. NaN for N = 1."""
    values = values.double()
    n = values.numel()
    se = float(values.std() / math.sqrt(n)) if n > 1 else math.nan
    return float(values.mean()), se


def _sizes(
    n: int,
    d: int,
    k: int,
    elbo_particles: int,
    batch_size: int | None,
    iwae_chunk: int | None,
) -> tuple[int, int, int]:
    """(ELBO batch, IWAE batch, IWAE chunk) keeping particles x images x D <= FLOAT_BUDGET."""
    for name, value in (("batch_size", batch_size), ("iwae_chunk", iwae_chunk)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if batch_size is not None:
        chunk = min(k, iwae_chunk or max(1, FLOAT_BUDGET // (batch_size * d)))
        return batch_size, batch_size, chunk
    chunk = min(k, iwae_chunk or DEFAULT_IWAE_CHUNK)
    elbo_batch = max(1, min(n, FLOAT_BUDGET // (elbo_particles * d)))
    iwae_batch = max(1, min(n, FLOAT_BUDGET // (chunk * d)))
    return elbo_batch, iwae_batch, chunk


def _batches(images: Tensor, size: int) -> Iterator[Tensor]:
    for start in range(0, images.shape[0], size):
        yield images[start : start + size]


def evaluate(
    model: Callable,
    guide: Callable,
    images: Tensor,
    *,
    encoder: nn.Module | None = None,
    iwae_samples: int = 5000,
    iwae_chunk: int | None = None,
    batch_size: int | None = None,
    elbo_particles: int = 1,
    seed: int | None = 0,
    progress: bool = True,
    fast_iwae: bool = True,
) -> Evaluation:
    """ELBO, reconstruction, KL, IWAE bound and latent diagnostics of a VAE on ``images``.

    :param model: the bound VAE model (``functools.partial(models.vae.model, decoder=...)``),
        called as ``model(x, beta=1.0, check_data=False)``; the guide likewise.
    :param images: (N, D) test images, already binarised when the likelihood needs it; all the
        computation runs on their device (the networks must live there too).
    :param encoder: the guide's encoder, for active units and KL per dimension; when ``None``
        it is taken from ``guide.keywords["encoder"]`` (a ``functools.partial``) if there.
    :param iwae_samples: K, importance samples per image for the IWAE bound.
    :param iwae_chunk: samples per pass; ``batch_size``: images per pass. When left ``None``
        they are chosen so that chunk x batch x D stays under :data:`FLOAT_BUDGET` floats.
    :param elbo_particles: Monte Carlo particles per image for the reconstruction term.
    :param seed: seeds torch for the evaluation (the caller's random state is restored);
        ``None`` leaves the random state alone.
    :param progress: show a progress bar over the IWAE data batches.
    :param fast_iwae: for the Gaussian VAE pair, compute the IWAE bound without Pyro traces
        (:func:`ppl_vae.vae.iwae.vae_iwae`, several times faster); ``False`` always uses
        :func:`ppl_vae.elbo.evidence.iwae_log_evidence`.
    """
    if iwae_samples < 1 or elbo_particles < 1:
        raise ValueError(
            f"iwae_samples and elbo_particles must be >= 1, got {iwae_samples}, {elbo_particles}"
        )
    if encoder is None:
        encoder = getattr(guide, "keywords", {}).get("encoder")
    check_data(images, x_dim=getattr(encoder, "x_dim", None), name="images")
    n, d = images.shape
    if n == 0:
        raise ValueError("images holds no rows: nothing to evaluate")
    elbo_batch, iwae_batch, chunk = _sizes(
        n, d, iwae_samples, elbo_particles, batch_size, iwae_chunk
    )
    kwargs = {"beta": 1.0, "check_data": False}
    start_time = time.perf_counter()
    seeded = forked_rng(images.device, seed) if seed is not None else contextlib.nullcontext()
    with seeded, torch.no_grad():
        structure = inspect_pair(model, guide, (images[:elbo_batch],), kwargs)
        recon_parts, kl_parts = [], []
        for x in _batches(images, elbo_batch):
            terms = sampled_site_terms(
                model,
                guide,
                x,
                num_particles=elbo_particles,
                analytic_kl=True,
                keep_plates=("data",),
                structure=structure,
                **kwargs,
            )
            # Each term is (particles, batch): sum the sites, average the particles.
            recon = sum(t for kind, _, t in terms.values() if kind == "reconstruction")
            kl = sum(t for kind, _, t in terms.values() if kind == "kl")
            recon_parts.append(torch.as_tensor(recon).mean(0).double().cpu())
            kl_parts.append(torch.as_tensor(kl).mean(0).double().cpu())
        recon_per_image = torch.cat(recon_parts)  # (N,)
        kl_per_image = torch.cat(kl_parts)  # (N,)
        elbo_per_image = recon_per_image - kl_per_image

        networks = _vae_networks(model, guide) if fast_iwae else None
        if networks is not None:
            iwae_per_image = _fast_iwae(networks, images, iwae_samples, progress)
        else:
            iwae_per_image = _generic_iwae(
                model, guide, images, iwae_samples, iwae_batch, chunk, kwargs, progress
            )

        n_active, z_dim, kl_dims = None, None, None
        if encoder is not None:
            mu, log_var = posterior_moments(encoder, images, batch_size=max(elbo_batch, 2))
            z_dim = int(mu.shape[1])
            kl_dims = tuple(float(v) for v in kl_per_dimension(mu, log_var).double().cpu())
            if n > 1:
                n_active = active_units(mu)[0]
    seconds = time.perf_counter() - start_time

    elbo, elbo_se = _mean_se(elbo_per_image)
    iwae, iwae_se = _mean_se(iwae_per_image)
    gap, gap_se = _mean_se(iwae_per_image - elbo_per_image)
    return Evaluation(
        n_images=int(n),
        image_dim=int(d),
        elbo=elbo,
        elbo_se=elbo_se,
        reconstruction=float(recon_per_image.mean()),
        kl=float(kl_per_image.mean()),
        iwae=iwae,
        iwae_se=iwae_se,
        iwae_k=int(iwae_samples),
        gap_elbo_iwae=gap,
        gap_se=gap_se,
        active_units=n_active,
        z_dim=z_dim,
        kl_per_dim=kl_dims,
        elbo_particles=int(elbo_particles),
        seconds=seconds,
        device=str(images.device),
        elbo_per_image=elbo_per_image,
        iwae_per_image=iwae_per_image,
    )


def _vae_networks(model: Callable, guide: Callable) -> dict[str, Any] | None:
    """The networks and likelihood of a bound Gaussian VAE pair (``functools.partial`` of
    ``models.vae.model`` and ``guides.vae.guide``), or None for any other pair."""
    from ppl_vae.guides import vae as vae_guide
    from ppl_vae.models import vae as vae_model

    if getattr(model, "func", None) is not vae_model.model:
        return None
    if getattr(guide, "func", None) is not vae_guide.guide:
        return None
    if "decoder" not in model.keywords or "encoder" not in guide.keywords:
        return None
    return {
        "encoder": guide.keywords["encoder"],
        "decoder": model.keywords["decoder"],
        "likelihood": model.keywords.get("likelihood", "bernoulli"),
        "sigma": model.keywords.get("sigma"),
    }


def _fast_iwae(networks: dict[str, Any], images: Tensor, k: int, progress: bool) -> Tensor:
    """The VAE's IWAE bound without Pyro traces (same estimator; see ppl_vae.elbo.evidence)."""
    # 2,000 decoder rows per pass: big enough for efficient matrix products, small enough
    # (6 MB at D = 784) to reuse memory instead of faulting in fresh pages every pass.
    chunk = min(k, 100)
    return (
        vae_iwae(
            networks["encoder"],
            networks["decoder"],
            images,
            likelihood=networks["likelihood"],
            sigma=networks["sigma"],
            num_samples=k,
            chunk_size=chunk,
            batch_size=max(1, 2000 // chunk),
            progress=progress,
        )
        .double()
        .cpu()
    )


def _generic_iwae(
    model: Callable,
    guide: Callable,
    images: Tensor,
    iwae_samples: int,
    iwae_batch: int,
    chunk: int,
    kwargs: dict[str, Any],
    progress: bool,
) -> Tensor:
    """The IWAE bound of any pair through Pyro traces, per image."""
    iwae_parts = []
    bar = tqdm(
        list(_batches(images, iwae_batch)),
        desc=f"IWAE K={iwae_samples}",
        unit="batch",
        disable=not progress,
    )
    for x in bar:
        per_item = iwae_log_evidence(
            model, guide, x, num_samples=iwae_samples, chunk_size=chunk, **kwargs
        ).per_item.reshape(-1)
        if per_item.numel() != x.shape[0]:
            raise ValueError(
                "the IWAE bound came out with no per-image values: every site of the pair "
                "must sit in the same 'data' plate over the rows of x"
            )
        iwae_parts.append(per_item.double().cpu())
    return torch.cat(iwae_parts)  # (N,)
