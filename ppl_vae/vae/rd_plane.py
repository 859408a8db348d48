"""Rate and distortion: the two terms of the ELBO, read from a training history, an evaluation,
a ledger or a mapping, as points of the rate-distortion plane (Alemi et al. 2018).

Rate R = E_x KL(q(z | x) || p(z)) and distortion D = -E_x E_q[log p(x | z)], nats per image:
ELBO = -(D + R) and the beta-objective is -(D + beta R).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RateDistortion", "rate_distortion"]


@dataclass(frozen=True)
class RateDistortion:
    """One point of the rate-distortion plane, nats per image.

    R = E_x KL(q(z | x) || p(z)), D = -E_x E_q[log p(x | z)], so ELBO = -(D + R) and the
    beta-objective is -(D + beta R). ``epoch``, ``step`` and ``beta`` are set when the point
    comes from a training history (its validation numbers at the end of that epoch).
    """

    rate: float
    distortion: float
    epoch: int | None = None
    step: int | None = None
    beta: float | None = None

    @property
    def elbo(self) -> float:
        """ELBO = -(D + R)."""
        return -(self.distortion + self.rate)

    def objective(self, beta: float) -> float:
        """The beta-ELBO -(D + beta R)."""
        return -(self.distortion + beta * self.rate)


def _number(value: Any, what: str) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{what} is missing")
    return float(value)


def rate_distortion(source: Any, *, n_items: int = 1) -> RateDistortion | list[RateDistortion]:
    """Rate R = E_x KL(q(z | x) || p(z)) and distortion D = -E_x E_q[log p(x | z)] of ``source``.

    ``source`` is one of:

    - a training history (:class:`ppl_vae.training.History`, or its rows as read from
      ``history.json``): one point per epoch, from ``val_kl`` and ``val_reconstruction``;
    - a mapping with ``rate`` and ``distortion`` (or ``kl`` and ``reconstruction``), such as
      ``evaluation.json``: one point;
    - an object with ``kl`` and ``reconstruction`` attributes: an
      :class:`~ppl_vae.runs.Evaluation` (per image), or a
      :class:`~ppl_vae.elbo.ledger.Ledger`
      (totals over the data passed: give their number as ``n_items``): one point.
    """
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    if isinstance(source, Mapping):
        if "rate" in source and "distortion" in source:
            rate, distortion = source["rate"], source["distortion"]
        elif "kl" in source and "reconstruction" in source:
            rate, distortion = source["kl"], -_number(source["reconstruction"], "reconstruction")
        else:
            raise ValueError(
                "a mapping needs 'rate' and 'distortion' (or 'kl' and 'reconstruction'), got "
                f"keys {sorted(source)}"
            )
        return RateDistortion(
            _number(rate, "rate") / n_items, _number(distortion, "distortion") / n_items
        )
    if hasattr(source, "kl") and hasattr(source, "reconstruction"):
        return RateDistortion(float(source.kl) / n_items, -float(source.reconstruction) / n_items)
    rows = getattr(source, "rows", source)
    if isinstance(rows, Sequence) and not isinstance(rows, str | bytes):
        points = []
        for row in rows:
            if not isinstance(row, Mapping):
                raise ValueError(f"history rows must be mappings, got {type(row).__name__}")
            epoch = row.get("epoch")
            what = f"epoch {epoch}: val_kl / val_reconstruction (no validation set?)"
            rate = _number(row.get("val_kl"), what)
            distortion = -_number(row.get("val_reconstruction"), what)
            points.append(
                RateDistortion(
                    rate,
                    distortion,
                    epoch=None if epoch is None else int(epoch),
                    step=None if row.get("step") in (None, "") else int(row["step"]),
                    beta=None if row.get("beta") in (None, "") else float(row["beta"]),
                )
            )
        return points
    raise ValueError(
        f"cannot read a rate and a distortion from a {type(source).__name__}: pass a History, "
        "its rows, an Evaluation, a Ledger or a mapping"
    )
