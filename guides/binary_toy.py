"""A table guide for the binary toy: q(z = 1 | x) = table[x], one learnable entry per value of x."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ppl_vae.elbo import kl_scale
from ppl_vae.models.binary_toy import DECODER, PRIOR, as_data

__all__ = ["DEFAULT_TABLE", "PARAM_NAME", "guide", "initialise"]

PARAM_NAME = "q_z1_given_x"
"""Name of the ``pyro.param`` holding (q(z=1 | x=0), q(z=1 | x=1))."""
DEFAULT_TABLE = (0.3, 0.7)
"""The table a fresh guide starts from: the worked example's q(z=1 | x=1) = 0.7."""


def initialise(q_given_x1: float = 0.7, q_given_x0: float = 0.3) -> None:
    """Set the guide's table in Pyro's param store (replacing any value it held)."""
    store = pyro.get_param_store()
    if PARAM_NAME in store:
        del store[PARAM_NAME]
    pyro.param(
        PARAM_NAME, torch.tensor([q_given_x0, q_given_x1]), constraint=constraints.unit_interval
    )


def guide(
    x: torch.Tensor,
    prior: float = PRIOR,
    decoder: tuple[float, float] = DECODER,
    beta: float = 1.0,
) -> None:
    """q(z | x) = Bernoulli(z; table[x]), the table a ``pyro.param`` constrained to (0, 1).

    A fresh table starts at :data:`DEFAULT_TABLE`; :func:`initialise` sets it. Accepts the
    model's arguments, as Pyro requires, and ignores ``prior`` and ``decoder``.
    """
    x = as_data(x)
    table = pyro.param(
        PARAM_NAME, lambda: x.new_tensor(DEFAULT_TABLE), constraint=constraints.unit_interval
    )
    with pyro.plate("data", x.shape[0]):
        with kl_scale(beta):
            pyro.sample("z", dist.Bernoulli(table[x.long()]))
