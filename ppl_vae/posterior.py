"""The exact posterior of a small discrete pair, by brute force over every joint configuration.

log p(z | x) = log p(x, z) - log sum_z' p(x, z'), tabulated over all configurations of all
latent elements, with q(z | x) tabulated on the same grid. This is deliberately independent of
the ELBO machinery, so that gap = log p(x) - ELBO = KL(q || p(z | x)) is checked, not assumed.
The table grows as prod_sites k^(elements), so it is for small cases only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine

from ppl_vae.errors import NotEnumerableError
from ppl_vae.pair import inspect_pair, sum_except

__all__ = ["JointTable", "enumerate_joint"]


@dataclass(frozen=True)
class JointTable:
    """log p(x, z) and log q(z | x) for every joint configuration z (shape ``(C,)`` each)."""

    log_joint: torch.Tensor
    log_q: torch.Tensor

    @property
    def num_configurations(self) -> int:
        """C, the number of joint configurations of the latent elements."""
        return self.log_joint.shape[0]

    @property
    def log_evidence(self) -> float:
        """log p(x) = log sum_z p(x, z)."""
        return float(torch.logsumexp(self.log_joint, 0))

    @property
    def log_posterior(self) -> torch.Tensor:
        """log p(z | x) for every configuration."""
        return self.log_joint - torch.logsumexp(self.log_joint, 0)

    def kl_q_to_posterior(self) -> float:
        """KL(q(z | x) || p(z | x)) = sum_z q(z) (log q(z) - log p(z | x)), with 0 log 0 = 0."""
        q = self.log_q.exp()
        terms = torch.where(q > 0, q * (self.log_q - self.log_posterior), torch.zeros_like(q))
        return float(terms.sum())

    def elbo(self) -> float:
        """sum_z q(z) (log p(x, z) - log q(z)), the ELBO from the same table."""
        q = self.log_q.exp()
        terms = torch.where(q > 0, q * (self.log_joint - self.log_q), torch.zeros_like(q))
        return float(terms.sum())


def enumerate_joint(
    model: Callable, guide: Callable, *args, max_configurations: int = 2**16, **kwargs
) -> JointTable:
    """Tabulate log p(x, z) and log q(z | x) over every joint configuration of the latents.

    Every element of every latent site (each datapoint's z under a plate, say) is a variable
    of its own, so the table has prod k^(elements) rows, evaluated in one vectorised pass.

    :raises NotEnumerableError: for a continuous latent site, or more than
        ``max_configurations`` configurations.
    """
    structure = inspect_pair(model, guide, args, kwargs)
    structure.require_enumerable("the brute-force posterior")
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    supports, counts = {}, {}
    total = 1
    for site in structure.latent:
        support = guide_trace.nodes[site.name]["fn"].enumerate_support(expand=False)
        supports[site.name] = support.reshape(support.shape[0], *site.event_shape)
        counts[site.name] = math.prod(site.batch_shape)
        total *= supports[site.name].shape[0] ** counts[site.name]
        if total > max_configurations:
            raise NotEnumerableError(
                f"the joint configurations of the latent sites number more than "
                f"{max_configurations}; the brute-force posterior is for small cases only."
            )
    nesting = structure.max_plate_nesting
    index = torch.arange(total)
    stride = 1
    values = {}
    for site in structure.latent:
        k = supports[site.name].shape[0]
        digits = []
        for _ in range(counts[site.name]):  # mixed-radix digits of the configuration index
            digits.append(index // stride % k)
            stride *= k
        chosen = supports[site.name][torch.stack(digits, dim=-1)]  # (C, elements, *event)
        pad = (1,) * (nesting - len(site.batch_shape))
        values[site.name] = chosen.reshape(total, *pad, *site.batch_shape, *site.event_shape)
    configs = pyro.plate("configurations", total, dim=-(nesting + 1))
    rank = nesting + 1
    logs = []
    with torch.no_grad(), poutine.block():
        for fn in (model, guide):
            trace = poutine.trace(configs(poutine.condition(fn, data=values))).get_trace(
                *args, **kwargs
            )
            trace.compute_log_prob()
            logs.append(
                sum(
                    sum_except(site["log_prob"], (-rank,), rank).reshape(total)
                    for site in trace.nodes.values()
                    if site["type"] == "sample" and not poutine.util.site_is_subsample(site)
                )
            )
    return JointTable(log_joint=logs[0], log_q=logs[1])
