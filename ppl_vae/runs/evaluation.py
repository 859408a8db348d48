"""The test-set numbers of a VAE as a record: ELBO, its two terms, the IWAE bound, the code.

Every number is per image, in nats, at beta = 1: ELBO = E_q[log p(x | z)] - KL(q(z | x) || p(z))
= -(distortion + rate) <= IWAE_K <= log p(x) (in expectation), and bits/dim = -value / (D ln 2),
D the number of values in one image. :func:`ppl_vae.runs.evaluate.evaluate` computes them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from ppl_vae.atomic import json_ready
from ppl_vae.vae import ACTIVE_THRESHOLD, collapse_warning

__all__ = ["Evaluation"]

_LN2 = math.log(2.0)
_DERIVED = (
    "distortion",
    "rate",
    "bits_per_dim_elbo",
    "bits_per_dim_iwae",
    "gap_bits_per_dim",
)


_OPTIONAL = ("active_units", "z_dim", "accuracy", "accuracy_se", "num_classes")


def _bits_per_dim(nats: float, dim: int) -> float:
    return -nats / (dim * _LN2)


@dataclass(frozen=True)
class Evaluation:
    """Per-image test-set numbers of a VAE at beta = 1, in nats unless stated.

    ``elbo`` = ``reconstruction`` - ``kl``; ``iwae`` is the K-sample importance-weighted bound
    (K = ``iwae_k``); both are lower bounds on log p(x). ``gap_elbo_iwae`` = iwae - elbo, with
    ``gap_se`` from the paired per-image differences. ``active_units`` and ``kl_per_dim`` are
    ``None`` when no encoder was available; ``kl_per_dim`` (KL to N(0, 1) per dimension) also
    when ``kl_sampled``: the KL had no closed form (a learned prior) and is a Monte Carlo
    estimate, its noise inside ``elbo_se``. ``elbo_per_image`` and ``iwae_per_image`` hold the
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
    kl_sampled: bool = False
    accuracy: float | None = None  # a classifier's (M2's q(y | x)) test accuracy, in [0, 1]
    accuracy_se: float | None = None  # its binomial s.e., sqrt(a (1 - a) / N)
    num_classes: int | None = None
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
            elif value is None and f.name not in _OPTIONAL:
                value = math.nan
            kwargs[f.name] = value
        return cls(**kwargs)

    def __str__(self) -> str:
        d = self.image_dim
        latent = "z" if self.num_classes is None else "y,z"  # M2: the label is latent too
        rows = [
            ("ELBO", self.elbo, self.elbo_se, self.bits_per_dim_elbo),
            (f"  reconstruction E_q[log p(x|{latent})]", self.reconstruction, None, None),
            (
                f"  KL(q({latent}|x) || p({latent})){' (sampled)' if self.kl_sampled else ''}",
                self.kl,
                None,
                None,
            ),
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
        if self.active_units is not None:
            lines.append(
                f"  active units: {self.active_units} of {self.z_dim} "
                f"(Cov_x(E_q[z_u]) > {ACTIVE_THRESHOLD})"
            )
        if self.kl_per_dim is not None:
            kl_text = " ".join(f"{v:.3f}" for v in self.kl_per_dim)
            lines.append(f"  KL per latent dimension (nats/image): {kl_text}")
        if self.accuracy is not None:
            lines.append(
                f"  test accuracy of q(y | x): {100 * self.accuracy:.2f}% ± "
                f"{100 * (self.accuracy_se or math.nan):.2f} (s.e.), {self.num_classes} classes"
            )
        warning = self.collapse
        if warning is not None:
            lines.append(f"  WARNING: {warning}")
        return "\n".join(lines)


def _nan(values: list) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]
