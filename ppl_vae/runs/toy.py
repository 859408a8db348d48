"""The binary toy's exact ELBO against its guide's q(z=1 | x=1):
ELBO(q) = log p(x) - KL(q || p(z | x)), tight at the true posterior."""

from __future__ import annotations

from collections.abc import Iterable

import pyro
import torch

from ppl_vae.elbo import elbo_ledger, exact_log_evidence
from ppl_vae.guides import binary_toy as toy_guide
from ppl_vae.models import binary_toy as toy_model

__all__ = ["toy_elbo_curve"]


def toy_elbo_curve(qs: Iterable[float], x: float = 1.0) -> tuple[list[float], float]:
    """The exact ELBO of the binary toy at ``x`` for each guide q(z=1 | x=1) in ``qs`` (each
    in (0, 1)), and log p(x): ELBO(q) = log p(x) - KL(q || p(z | x)), tight at the posterior.

    Enumeration (:func:`ppl_vae.elbo_ledger`) and :func:`ppl_vae.exact_log_evidence` on
    ``models.binary_toy``; Pyro's param store is left as it was.
    """
    qs = [float(q) for q in qs]
    bad = [q for q in qs if not 0.0 < q < 1.0]
    if bad or not qs:
        raise ValueError(f"each q must lie in the open interval (0, 1), got {bad or qs}")
    data = torch.tensor(float(x))
    store = pyro.get_param_store()
    saved = store.get_state()  # a copy of the name -> tensor maps
    try:
        elbos = []
        for q in qs:
            toy_guide.initialise(q_given_x1=q, q_given_x0=1.0 - q)
            elbos.append(elbo_ledger(toy_model.model, toy_guide.guide, data, exact=True).elbo)
        log_px = exact_log_evidence(toy_model.model, data)
    finally:
        if toy_guide.PARAM_NAME not in saved["params"]:
            del store[toy_guide.PARAM_NAME]
        store.set_state(saved)
    return elbos, log_px
