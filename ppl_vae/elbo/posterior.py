"""The exact posterior of a discrete pair by brute force, factorised over plates when it must be.

Latent sites are *global* (in no vectorised plate) or *local* to their outermost vectorised
plate P; the local configuration l of element i of P is the joint configuration of all its
local latent elements (L_P of them). When, given the global configuration g,

    log p(x, z) = A(g) + sum_P sum_i B_P(l_i, g, i),
    log q(z) = A_q(g) + sum_P sum_i Bq_P(l_i, g, i),

the elements are independent under p(z | x) and q: log p(x) = logsumexp_g [A(g) + sum_P sum_i
logsumexp_l B_P(l, g, i)], and the KL needs G x sum_P L_P x N_P terms, not G x prod_P L_P^N_P.
One vectorised pass tabulates A and B: the globals get an enumeration dim of size G, each
factor plate one of size L_P, left of the pair's plates; in row l every element of P takes
configuration l. The split is an assumption about the pair, checked before it is used:

(a) shapes: a site outside P has size 1 along P's enumeration dim (it cannot see P's locals),
    a site in P size 1 along the other plates' dims;
(b) values: at one uniform and a few random assignments (each element its own configuration)
    a plain trace of model and guide reproduces every term A(g), B_P(l_i, g, i), A_q, Bq_P;
(c) q is normalised: sum_g q(g) = 1 and sum_l q(l | g, i) = 1.

The joint table (every configuration of every latent element: no assumption) is used while it
fits under ``max_configurations``, the factorised one beyond. (b) and (c) guard the joint table
too: one that does not vectorise (``z.sum()`` outside its plate, say) is traced a configuration
at a time. Discrete latent sites the model samples and the guide lacks are summed out of p
(model-side enumeration): the table is that of the marginalised model. Shares no code with the
ELBO machinery: only torch and poutine. The latent sites and their groups are found in
:mod:`ppl_vae.elbo.latent_groups`; here the tables are built, checked and summed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from pyro import poutine

from ppl_vae.elbo.latent_groups import (
    _CAUSES,
    _digits,
    _factor_groups,
    _grid_value,
    _Group,
    _inspect,
    _names,
    _outermost,
    _plain_value,
    _power,
    _samples,
)
from ppl_vae.errors import NotEnumerableError

__all__ = ["JointTable", "PosteriorTable", "enumerate_joint"]

_RANDOM_CHECKS = 3
_ONE_BY_ONE = 2**12  # most joint configurations traced one at a time (~1 ms each)


@dataclass(frozen=True)
class PosteriorTable:
    """log p(x) and KL(q(z | x) || p(z | x)) of a discrete pair, from an exhaustive table.

    ``num_configurations`` counts the table's entries, each evaluated: joint configurations of
    every latent element (joint table), or (global, local, element) triples G x sum_P L_P x N_P
    (factorised). ``log_joint`` / ``log_q``: log p(x, z) and log q(z) per joint configuration
    of the guide's sites (model-only sites summed out), joint table only.
    """

    log_evidence: float
    kl: float
    kl_reason: str | None
    factorised: bool
    method: str
    num_configurations: int
    marginalised_sites: tuple[str, ...] = ()
    log_joint: torch.Tensor | None = None
    log_q: torch.Tensor | None = None

    def kl_q_to_posterior(self) -> float:
        """KL(q || p(z | x)) = E_q[log q(z) - log p(x, z)] + log p(x); inf where q > 0 = p."""
        return self.kl

    def elbo(self) -> float:
        """ELBO = E_q[log p(x, z) - log q(z)] = log p(x) - KL(q || p(z | x))."""
        return self.log_evidence - self.kl

    @property
    def log_posterior(self) -> torch.Tensor | None:
        """log p(z | x) = log p(x, z) - log p(x) per configuration (joint table only)."""
        return None if self.log_joint is None else self.log_joint - self.log_evidence


JointTable = PosteriorTable


class _Pair(NamedTuple):
    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict
    guide_names: frozenset[str]
    rank: int  # the pair's own batch dims


def _log_probs(pair: _Pair, side: str, data: dict) -> list[tuple[str, torch.Tensor, str | None]]:
    """(name, log-prob, outermost plate) per site of the model ('log p') or guide ('log q')."""
    fn = pair.model if side == "log p" else pair.guide
    data = {k: v for k, v in data.items() if side == "log p" or k in pair.guide_names}
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(poutine.condition(fn, data=data)).get_trace(*pair.args, **pair.kwargs)
        trace.compute_log_prob()
    out = []
    for name, site in _samples(trace).items():
        if torch.isnan(site["log_prob"]).any():
            raise NotEnumerableError(f"site '{name}' has a NaN log-probability on the table")
        out.append((name, site["log_prob"], (_outermost(site) or (None,))[0]))
    return out


def _reduce(lp: torch.Tensor, keep: list[int], rank: int) -> torch.Tensor:
    """lp in float64, right-aligned in rank dims, summed over every dim not in keep."""
    lp = lp.double().reshape((1,) * (rank - lp.dim()) + tuple(lp.shape))
    drop = [d for d in range(-rank, 0) if d not in keep]
    return lp.sum(drop, keepdim=True) if drop else lp


def _tabulate(pair: _Pair, side: str, data: dict, groups: list[_Group]):
    """Per-site log-probs, globals (G,) and plate P's (L_P, G, N_P); check (a)'s failures; eps."""
    glob, plates, rank = groups[0], {g.plate: j for j, g in enumerate(groups)}, -groups[-1].enum_dim
    sites, problems, eps = {}, [], 0.0
    for name, lp, plate in _log_probs(pair, side, data):
        eps, j = max(eps, torch.finfo(lp.dtype).eps), plates.get(plate, 0)
        group, shape = groups[j], tuple(lp.shape)
        lp = _reduce(lp, [g.enum_dim for g in groups] + ([group.dim] if j else []), rank)
        seen = [g for g in groups[1:] if g is not group and lp.shape[g.enum_dim] != 1]
        for g in seen:
            where = f"in plate '{group.plate}'" if j else f"outside plate '{g.plate}'"
            of = f" of plate '{g.plate}'" if j else ""
            problems.append(
                f"site '{name}' {where} depends on its local latents {_names(g.sites)}{of}"
            )
        dims = [group.enum_dim, glob.enum_dim, group.dim] if j else [glob.enum_dim]
        target = [group.total, glob.total, group.size] if j else [glob.total]
        if len(shape) > rank or any(
            lp.shape[d] not in (1, n) for d, n in zip(dims, target, strict=True)
        ):
            problems.append(
                f"site '{name}' has log-probabilities of shape {shape}, which do not line up "
                "with the table's dims (a plate dim reduced or turned into an event dim?)"
            )
        elif not seen:
            lp = lp.movedim(dims, list(range(len(dims))))
            sites[name] = (j, lp.reshape(lp.shape[: len(dims)]).expand(target))
    return sites, problems, eps


def _sums(sites: dict, groups: list[_Group]) -> list[torch.Tensor]:
    """A (G,) and B_P (L_P, G, N_P): the sites' log-probs added up per group."""
    G = groups[0].total
    out = [torch.zeros(G, dtype=torch.float64)]
    out += [torch.zeros(g.total, G, g.size, dtype=torch.float64) for g in groups[1:]]
    for j, lp in sites.values():
        out[j] = out[j] + lp
    return out


def _plain_terms(pair: _Pair, side: str, data: dict, groups: list[_Group]) -> dict:
    """Per site of one unenumerated trace: (group, log-prob per element, |log-prob| ditto)."""
    plates, out = {g.plate: j for j, g in enumerate(groups)}, {}
    for name, lp, plate in _log_probs(pair, side, data):
        j = plates.get(plate, 0)
        keep = [groups[j].dim] if j else []
        size = _reduce(lp.abs().nan_to_num(posinf=0.0), keep, pair.rank).reshape(-1)
        out[name] = (j, _reduce(lp, keep, pair.rank).reshape(-1), size)
    return out


def _check_values(pair: _Pair, groups, digits, tables, eps: float) -> str | None:
    """Check (b): None when plain traces reproduce the table's terms, else what differs.

    Tolerance sqrt(eps) x (1 + sum of |log-prob|) per term: rounding of the log-probs (a few
    eps of that sum, even with differently shaped kernels) stays far below it; a term that
    does not split over the plates misses by the size of a log-prob, far above it.
    """
    gen = torch.Generator().manual_seed(0)
    for trial in range(1 + _RANDOM_CHECKS):  # trial 0: every element in its last configuration
        picks = [
            torch.randint(g.total, (g.size,), generator=gen) if trial else torch.full((g.size,), -1)
            for g in groups
        ]
        data = {
            s.name: _plain_value(s, digits[j][s.name][picks[j]], group)
            for j, group in enumerate(groups)
            for s in group.sites
        }
        for side, table in zip(("log p", "log q"), tables, strict=True):
            terms = _plain_terms(pair, side, data, groups)
            for j, group in enumerate(groups):
                mine = [(n, t, s) for n, (jj, t, s) in terms.items() if jj == j]
                got = sum((t for _, t, _ in mine), torch.zeros(group.size, dtype=torch.float64))
                tol, g = eps**0.5 * (1 + sum(s for _, _, s in mine)), picks[0][0]
                want = table[j][picks[j], g, torch.arange(group.size)] if j else table[0][g, None]
                bad = ~((got == want) | ((got - want).abs() <= tol))
                if bad.any():
                    k = int(bad.nonzero()[0])
                    where = f"element {k} of plate '{group.plate}'" if j else "the global part"
                    return (
                        f"{side} of {where} (sites {_names(n for n, _, _ in mine)}) is "
                        f"{float(got[k]):.6g} traced plainly but {float(want[k]):.6g} on the "
                        "vectorised table: the log-probabilities do not split over the plates"
                    )
    return None


def _one_by_one(pair: _Pair, group: _Group, digits: dict) -> tuple[dict, dict]:
    """The joint table's per-site log-probs (C,), one plain trace per configuration."""
    rows: tuple[list, list] = ([], [])
    for c in range(group.total):
        data = {s.name: _plain_value(s, digits[s.name][c : c + 1], group) for s in group.sites}
        for side, out in zip(("log p", "log q"), rows, strict=True):
            terms = _plain_terms(pair, side, data, [group])
            out.append({n: t.sum() for n, (_, t, _) in terms.items()})
    return tuple({n: (0, torch.stack([r[n] for r in out])) for n in out[0]} for out in rows)


def _require_normalised(q_h: torch.Tensor, bq_locals: list, groups: list[_Group], eps: float):
    """Check (c), to sqrt(eps): rounding moves a normalised q's sum by a few eps; a scale, a
    mask or an unnormalised factor by O(1)."""
    checks = [("its global (or joint) configurations", q_h.sum().reshape(1))]
    for g, bq in zip(groups[1:], bq_locals, strict=True):
        sums = torch.logsumexp(bq, 0).exp()[q_h > 0].flatten()
        checks.append((f"its local configurations at an element of plate '{g.plate}'", sums))
    for what, sums in checks:
        worst = float(sums[(sums - 1).abs().argmax()]) if sums.numel() else 1.0
        if not abs(worst - 1) <= eps**0.5:
            raise NotEnumerableError(
                f"q is not normalised: {what} sum to {worst:.6g}, not 1, so the table's KL "
                f"would not be KL(q || p(z | x)). {_CAUSES}"
            )


def _culprit(groups, p_sites: dict, digits, g: int, spots: dict) -> str:
    """The first model site with log-prob -inf at g and (l, i) = spots[j] (else l = 0)."""
    latent = {s.name: s for group in groups for s in group.sites}
    for name, (j, lp) in p_sites.items():
        row, place, i = g, "", None
        if j:
            row, i = spots.get(j, (0, None))
            dead = (lp[row, g] == -math.inf).nonzero()
            i = i if i is not None else int(dead[0]) if len(dead) else 0
            place = f" (element {i} of plate '{groups[j].plate}')"
        if not bool((lp[row, g, i] if j else lp[g]) == -math.inf):
            continue
        if name not in latent:
            return f"observed site '{name}' has probability 0{place}"
        value = latent[name].support[digits[j][name][row]].tolist()
        return f"site '{name}', value {value[0] if len(value) == 1 else value}{place}"
    return "a configuration the model gives probability 0"


def _finish(groups: list[_Group], tables, eps: float, p_sites: dict, digits) -> dict:
    """log p(x) = logsumexp_h [A + sum_P sum_i logsumexp_u B~_P] with B~_P = logsumexp_m B_P;
    KL = sum_h q(h) [A_q - A + sum_P sum_i sum_u q(u | h, i) (Bq_P - B~_P)] + log p(x)."""
    (A, *B), (Aq, *Bq) = tables
    H, W = groups[0].configs(True), groups[0].configs(False)
    A, Aq, Bp, Bg = A.reshape(H, W), Aq.reshape(H, W)[:, 0], [], []
    for g, b, bq in zip(groups[1:], B, Bq, strict=True):
        U, M = g.configs(True), g.configs(False)
        Bp.append(torch.logsumexp(b.reshape(U, M, H, W, g.size), 1))
        Bg.append(bq.reshape(U, M, H, W, g.size)[:, 0, :, 0])
    if W > 1:  # model-only globals, no local guide sites (U = 1): sum w out with the locals
        A = torch.logsumexp(A + sum(b[0].sum(-1) for b in Bp), 1)
        Aq, Bp, Bg = Aq + sum(b[0].sum(-1) for b in Bg), [], []
    else:
        A, Bp = A[:, 0], [b[:, :, 0] for b in Bp]
    q_h = Aq.exp()
    _require_normalised(q_h, Bg, groups, eps)
    log_evidence = torch.logsumexp(A + sum(torch.logsumexp(b, 0).sum(-1) for b in Bp), 0)
    local = [  # (H, N_P): sum_u q(u | h, i) (Bq - B~), with 0 log 0 = 0
        torch.where(bq.exp() > 0, bq.exp() * (bq - b), 0.0).sum(0)
        for b, bq in zip(Bp, Bg, strict=True)
    ]
    inner = Aq - A + sum(t.sum(-1) for t in local)
    terms = torch.where(q_h > 0, q_h * inner, 0.0)
    out = {"log_evidence": float(log_evidence), "log_joint": A, "log_q": Aq}
    if torch.isfinite(terms).all():
        return out | {"kl": float(terms.sum() + log_evidence), "kl_reason": None}
    h, spots = int(((q_h > 0) & torch.isinf(inner)).nonzero()[0]), {}
    for j, (t, b, bq) in enumerate(zip(local, Bp, Bg, strict=True), 1):
        if torch.isinf(t[h]).any():
            i = int(torch.isinf(t[h]).nonzero()[0])
            u = int(((bq[:, h, i].exp() > 0) & (b[:, h, i] == -math.inf)).nonzero()[0])
            spots = {j: (u * groups[j].configs(False), i)}
            break
    reason = _culprit(groups, p_sites, digits, h * W, spots)
    return out | {"kl": math.inf, "kl_reason": f"q puts mass where p has none: {reason}"}


def _evaluate(pair: _Pair, groups: list[_Group]) -> tuple[dict | None, list[str]]:
    """(the _finish values, []) or (None, why (a)/(b) failed); a joint table that fails is
    traced one configuration at a time."""
    rank = pair.rank + len(groups)
    digits = [_digits(g) for g in groups]
    data = {
        s.name: _grid_value(s, digits[j][s.name], g, rank)
        for j, g in enumerate(groups)
        for s in g.sites
    }
    (p_sites, problems, eps), (q_sites, more, q_eps) = (
        _tabulate(pair, side, data, groups) for side in ("log p", "log q")
    )
    problems, eps = problems + more, max(eps, q_eps)
    if not problems:
        tables = (_sums(p_sites, groups), _sums(q_sites, groups))
        problems = [m for m in [_check_values(pair, groups, digits, tables, eps)] if m]
    one_by_one = bool(problems) and len(groups) == 1 and groups[0].total <= _ONE_BY_ONE
    if one_by_one:
        (p_sites, q_sites), problems = _one_by_one(pair, groups[0], digits[0]), []
    if problems:
        return None, problems
    tables = (_sums(p_sites, groups), _sums(q_sites, groups))
    return _finish(groups, tables, eps, p_sites, digits) | {"one_by_one": one_by_one}, []


def _method(groups: list[_Group], entries: int, one_by_one: bool, marginalised) -> str:
    if len(groups) > 1:
        per = " and ".join(
            f"{g.total:,} local configurations per element of plate '{g.plate}'" for g in groups[1:]
        )
        over = ", ".join(f"'{g.plate}' ({g.size:,} elements)" for g in groups[1:])
        text = f"brute force over {groups[0].total:,} global x {per}, factorised over {over}"
    else:
        how = ", traced one at a time: the pair does not vectorise over them" * one_by_one
        text = f"brute force over {entries:,} configurations (the joint table{how})"
    return text + (
        f"; model-only site(s) {_names(marginalised)} summed out" if marginalised else ""
    )


def enumerate_joint(
    model: Callable,
    guide: Callable,
    *args,
    max_configurations: int = 2**16,
    max_elements: int = 2**24,
    **kwargs,
) -> PosteriorTable:
    """log p(x) and KL(q(z | x) || p(z | x)) of a discrete pair by exhaustive enumeration.

    The joint table while it has at most ``max_configurations`` configurations, else the table
    factorised over plates (at most ``max_configurations`` entries G x sum_P L_P x N_P); either
    way vectorised log-prob tensors of at most ``max_elements`` elements.

    :raises NotEnumerableError: for a continuous guide site, a pair too large for both tables
        or not factorising (the message names the sites), a scaled or unnormalised q.
    :raises ModelGuideMismatchError: for guide sites that are not the model's latents, a
        continuous model site the guide lacks, or supports that differ.
    """
    latents, rank, widest = _inspect(model, guide, args, kwargs)
    pair = _Pair(model, guide, args, kwargs, frozenset(s.name for s in latents if s.in_guide), rank)
    marginalised = tuple(s.name for s in latents if not s.in_guide)
    counts = tuple(math.prod(s.batch_shape) for s in latents)
    joint = _Group(None, None, 1, -(rank + 1), tuple(latents), counts)
    total, too_many = joint.total, []
    if total > max_configurations:
        too_many = [
            f"{_power(latents, counts)} joint configurations exceed the cap {max_configurations}"
        ]
    elif total * widest > max_elements:
        too_many = [f"the joint table's {total * widest} log-probabilities exceed {max_elements}"]
    groups, limits = (
        ([joint], [])
        if not too_many
        else _factor_groups(latents, rank, widest, max_configurations, max_elements)
    )
    values, failures = _evaluate(pair, groups) if not limits else (None, [])
    if limits or failures:
        why = "; ".join(limits or failures) + (
            ": the posterior does not factorise" if failures and too_many else ""
        )
        too_many = too_many or [
            f"the joint table does not vectorise: over {_ONE_BY_ONE} "
            "configurations to trace one at a time"
        ]
        raise NotEnumerableError(
            f"{why}; {too_many[0]}. The brute-force posterior is for small pairs and pairs "
            "that factorise over their plates."
        )
    factorised, one_by_one = len(groups) > 1, values.pop("one_by_one")
    entries = groups[0].total * sum(g.total * g.size for g in groups[1:]) if factorised else total
    if factorised:
        values |= {"log_joint": None, "log_q": None}
    return PosteriorTable(
        **values,
        factorised=factorised,
        num_configurations=entries,
        method=_method(groups, entries, one_by_one, marginalised),
        marginalised_sites=marginalised,
    )
