"""Gradients of a pair's ELBO checked against the exact ones, and estimators compared.

The gradient check: for every parameter of model and guide, R = 25 independent gradient
estimates (each of N / R vectorised particles) give a mean and a standard error per element;
the reference is the exact gradient of the enumerated ELBO (``TraceEnum_ELBO`` with every
discrete site enumerated) when the pair has one, else an enumerated-and-sampled or a 10x
larger sampled estimate with its own s.e. The worst |z| per parameter is compared with the
Bonferroni threshold of a Student t with R - 1 degrees of freedom at family-wise error 1e-3:
a wrong gradient (e.g. one counted twice) fails, a right one passes with probability 0.999.

The comparison: each named estimator (``trace``, ``meanfield``, ``tracegraph``, ``stl``,
``renyi:ALPHA``, ``iwae:K``, ``dreg:K``, and the Jit variants) on the same bound pair: its value
with s.e., the bias against the exact target where one exists (the ELBO for the ELBO family,
log p(x) for the importance-weighted bounds), and per parameter its gradient variance and
signal-to-noise ratio |E g| / sd(g) (Rainforth et al. 2018).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer import (
    ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    config_enumerate,
)
from scipy import stats

from ppl_vae.elbo.importance_weighted import IWAE_ELBO, DReGIWAE_ELBO
from ppl_vae.elbo.objectives import STLTrace_ELBO
from ppl_vae.elbo.pair import BoundPair
from ppl_vae.elbo.pyro_elbos import PatchedJitTrace_ELBO, PatchedJitTraceMeanField_ELBO
from ppl_vae.errors import ArgumentError

__all__ = [
    "ESTIMATORS",
    "EstimatorComparison",
    "GradientCheck",
    "check_gradients",
    "compare_estimators",
    "format_comparisons",
    "parse_estimators",
]

REPEATS = 25
FAMILY_ERROR = 1e-3

ESTIMATORS = (
    "trace", "meanfield", "tracegraph", "stl", "jit-trace", "jit-meanfield",
    "renyi:ALPHA", "iwae:K", "dreg:K",
)  # fmt: skip
"""The names ``--estimators`` takes; ALPHA a number other than 1, K an integer >= 1."""

_ELBO_FAMILY = {"trace", "meanfield", "tracegraph", "stl", "jit-trace", "jit-meanfield"}


def parse_estimators(text: tuple[str, ...] | str) -> tuple[str, ...]:
    """``"trace,iwae:10"`` or a tuple of names -> validated names.

    :raises ArgumentError: for a name not in :data:`ESTIMATORS` or a bad parameter.
    """
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    for name in names:
        head, _, arg = name.partition(":")
        try:
            ok = (head in _ELBO_FAMILY and not arg) or (
                (head in ("iwae", "dreg") and int(arg) >= 1)
                or (head == "renyi" and float(arg) != 1.0 and math.isfinite(float(arg)))
            )
        except ValueError:
            ok = False
        if not ok:
            raise ArgumentError(
                f"unknown estimator {name!r}; choose from {', '.join(ESTIMATORS)} "
                "(e.g. trace,meanfield,tracegraph,renyi:0.5,iwae:10,stl,dreg:10)"
            )
    return tuple(names)


def _make(name: str, particles: int, nesting: int) -> tuple[ELBO, int]:
    """The ELBO object for ``name`` and the particles of one of its estimates."""
    head, _, arg = name.partition(":")
    if head in ("iwae", "dreg"):
        cls = IWAE_ELBO if head == "iwae" else DReGIWAE_ELBO
        return cls(num_particles=int(arg), max_plate_nesting=nesting), int(arg)
    kwargs = {
        "num_particles": particles,
        "vectorize_particles": particles > 1,
        "max_plate_nesting": nesting,
    }
    if head == "renyi":
        return RenyiELBO(alpha=float(arg), **kwargs), particles
    classes: dict[str, Callable[..., ELBO]] = {
        "trace": Trace_ELBO,
        "meanfield": TraceMeanField_ELBO,
        "tracegraph": TraceGraph_ELBO,
        "stl": STLTrace_ELBO,
        "jit-trace": lambda **k: PatchedJitTrace_ELBO(ignore_jit_warnings=True, **k),
        "jit-meanfield": lambda **k: PatchedJitTraceMeanField_ELBO(ignore_jit_warnings=True, **k),
    }
    return classes[head](**kwargs), particles


def _parameters(bound: BoundPair) -> dict[str, torch.Tensor]:
    """The unconstrained leaf tensors of every param of model and guide, by name."""
    names: list[str] = []
    with poutine.block():
        guide = poutine.trace(bound.guide_fn("true"), param_only=True).get_trace(
            *bound.args, **bound.kwargs
        )
        model = poutine.trace(
            poutine.replay(bound.model_fn("true"), trace=guide), param_only=True
        ).get_trace(*bound.args, **bound.kwargs)
    for trace in (model, guide):
        names += [n for n, s in trace.nodes.items() if s["type"] == "param" and n not in names]
    store = pyro.get_param_store()
    return {name: store.get_param(name).unconstrained() for name in sorted(names)}


def _estimates(
    bound: BoundPair, loss_fn: Callable[[], torch.Tensor | float], params: dict, n: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` independent (loss, gradient) draws: values (n,), gradients {name: (n, *shape)}.

    A tensor loss is differentiated with autograd; a float loss came from ``loss_and_grads``,
    which left the gradients on the parameters (they are restored afterwards).
    """
    saved = {name: p.grad for name, p in params.items()}
    leaves = list(params.values())
    values, grads = [], {name: [] for name in params}
    try:
        for _ in range(n):
            for p in leaves:
                p.grad = None
            loss = loss_fn()
            if isinstance(loss, torch.Tensor):
                got = (
                    torch.autograd.grad(loss, leaves, allow_unused=True)
                    if loss.requires_grad
                    else [None] * len(leaves)  # a loss that no parameter reaches
                )
                loss = float(loss.detach())
            else:
                got = [p.grad for p in leaves]
            values.append(loss)
            for name, p, g in zip(params, leaves, got, strict=True):
                grads[name].append(torch.zeros_like(p) if g is None else g.detach().clone())
    finally:
        for name, p in params.items():
            p.grad = saved[name]
    stacked = {name: torch.stack(gs).double() for name, gs in grads.items()}
    return torch.tensor(values, dtype=torch.float64), stacked


def _loss(
    bound: BoundPair, elbo: ELBO, enumerate_guide: bool
) -> Callable[[], torch.Tensor | float]:
    """One estimate of the loss: ``differentiable_loss`` where the ELBO has it (what training
    differentiates), else ``loss_and_grads`` (TraceGraph_ELBO, RenyiELBO)."""
    model, guide = bound.model_fn("true"), bound.guide_fn("true")
    if isinstance(elbo, TraceEnum_ELBO):
        model = config_enumerate(model, "parallel")
        if enumerate_guide:
            guide = config_enumerate(guide, "parallel")
    else:
        # A sampling estimator samples the sites a guide marks for enumeration (M2's label):
        # on purpose here, so without Pyro's note that only TraceEnum_ELBO enumerates.
        guide = poutine.infer_config(guide, config_fn=_sampled)
    args, kwargs = bound.args, bound.kwargs
    if hasattr(elbo, "differentiable_loss"):
        return lambda: elbo.differentiable_loss(model, guide, *args, **kwargs)
    return lambda: float(elbo.loss_and_grads(model, guide, *args, **kwargs))


def _sampled(site: dict) -> dict:
    """Sample a site marked for enumeration (an ``infer_config`` function)."""
    return {"enumerate": None} if site["infer"].get("enumerate") else {}


@dataclass(frozen=True)
class GradientCheck:
    """The sampled gradient of one parameter against its reference, element by element."""

    param: str
    elements: int
    worst_z: float  # max over elements of |mean - reference| / s.e.
    threshold: float
    reference: str  # "exact (enumeration)" or how the reference was estimated
    estimator: str

    @property
    def passed(self) -> bool:
        """|z| below the family-wise threshold for every element."""
        return self.worst_z < self.threshold

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "WRONG GRADIENT"
        return (
            f"gradient '{self.param}' ({self.elements} elements), {self.estimator} vs "
            f"{self.reference}: worst |z| {self.worst_z:.2f} (< {self.threshold:.2f}) {verdict}"
        )


def check_gradients(
    bound: BoundPair,
    *,
    num_particles: int = 1000,
    elbo: str | ELBO | type[ELBO] = "trace",
) -> tuple[GradientCheck, ...]:
    """Every parameter's sampled ELBO gradient against the exact (or reference) gradient.

    :param elbo: the estimator checked: a name (``"trace"``, ``"meanfield"``, ...), an ELBO
        class (built with ``num_particles / 25`` vectorised particles) or an ELBO object.
    """
    structure = bound.structure
    nesting = structure.max_plate_nesting
    params = _parameters(bound)
    if not params:
        raise ArgumentError("the pair has no parameters (pyro.param or pyro.module) to check")
    per = max(1, num_particles // REPEATS)
    if isinstance(elbo, str):
        name = elbo
        elbo = _make(elbo, per, nesting)[0]
    elif isinstance(elbo, type):
        name = elbo.__name__
        elbo = elbo(num_particles=per, vectorize_particles=per > 1, max_plate_nesting=nesting)
    else:
        name = type(elbo).__name__
    if structure.model_enumerated and not isinstance(elbo, TraceEnum_ELBO):
        raise ArgumentError(
            f"{name} cannot sum out the model's sites "
            f"{[s.name for s in structure.model_enumerated]}; check it on a pair whose guide "
            "covers every latent site"
        )
    _, sampled = _estimates(bound, _loss(bound, elbo, False), params, REPEATS)
    if structure.enumerable:
        exact = TraceEnum_ELBO(max_plate_nesting=nesting)
        _, ref = _estimates(bound, _loss(bound, exact, True), params, 1)
        ref_mean = {k: v[0] for k, v in ref.items()}
        ref_se = {k: torch.zeros_like(v[0]) for k, v in ref.items()}
        how = "exact (enumeration)"
    else:
        enumerated = bool(structure.enumerable_latent or structure.model_enumerated)
        big = 10 * per
        reference: ELBO = (
            TraceEnum_ELBO(max_plate_nesting=nesting, num_particles=big, vectorize_particles=True)
            if enumerated
            else Trace_ELBO(max_plate_nesting=nesting, num_particles=big, vectorize_particles=True)
        )
        _, ref = _estimates(bound, _loss(bound, reference, True), params, REPEATS)
        ref_mean = {k: v.mean(0) for k, v in ref.items()}
        ref_se = {k: v.std(0) / math.sqrt(REPEATS) for k, v in ref.items()}
        how = f"{'enumerated' if enumerated else 'sampled'} reference, {REPEATS * big} particles"
    elements = sum(v[0].numel() for v in sampled.values())
    threshold = float(stats.t.isf(FAMILY_ERROR / (2 * elements), REPEATS - 1))
    checks = []
    for param, draws in sampled.items():
        mean, se = draws.mean(0), draws.std(0) / math.sqrt(REPEATS)
        checks.append(
            GradientCheck(
                param=param,
                elements=mean.numel(),
                worst_z=_worst_z(mean - ref_mean[param], torch.hypot(se, ref_se[param])),
                threshold=threshold,
                reference=how,
                estimator=f"{name}, {REPEATS} x {per} particles",
            )
        )
    return tuple(checks)


def _worst_z(difference: torch.Tensor, spread: torch.Tensor) -> float:
    """max |difference / spread|, with 0/0 = 0 (both exact and equal) and x/0 = inf."""
    tiny = 1e-6 * (1 + difference.abs())  # float32 rounding of a gradient that has no noise
    z = torch.where(
        spread > tiny,
        difference.abs() / spread.clamp_min(1e-300),
        torch.where(difference.abs() <= tiny, 0.0, math.inf),
    )
    return float(z.max()) if z.numel() else 0.0


@dataclass(frozen=True)
class EstimatorComparison:
    """One estimator on the pair: value (the bound it estimates) and gradient quality."""

    name: str
    particles: int
    value: float = math.nan
    stderr: float = math.nan
    bias: float = math.nan  # value - target
    target: str = ""  # "ELBO (exact)", "log p(x)", ... or "" when there is none
    grad_variance: dict[str, float] | None = None  # mean element variance per parameter
    snr: dict[str, float] | None = None  # mean element |E g| / sd(g) per parameter
    error: str = ""  # why it does not apply to this pair


def compare_estimators(
    bound: BoundPair,
    names: tuple[str, ...],
    *,
    num_particles: int = 1000,
    elbo_target: tuple[float, bool] | None = None,
    log_evidence: tuple[float, bool] | None = None,
) -> tuple[EstimatorComparison, ...]:
    """Each estimator's value (mean +- s.e. of 25 draws), bias and gradient variance / SNR.

    :param elbo_target: (ELBO, exact?) the ELBO family is compared with; computed by
        enumeration when the pair allows and not given.
    :param log_evidence: (log p(x), exact?) the importance-weighted bounds are compared with.
    """
    structure = bound.structure
    nesting = structure.max_plate_nesting
    if elbo_target is None and structure.enumerable:
        exact = TraceEnum_ELBO(max_plate_nesting=nesting)
        model = config_enumerate(bound.model_fn("true"), "parallel")
        guide = config_enumerate(bound.guide_fn("true"), "parallel")
        elbo_target = (-exact.loss(model, guide, *bound.args, **bound.kwargs), True)
    params = _parameters(bound)
    per = max(1, num_particles // REPEATS)
    out = []
    for name in names:
        elbo, particles = _make(name, per, nesting)
        try:
            values, grads = _estimates(bound, _loss(bound, elbo, False), params, REPEATS)
        except (ValueError, NotImplementedError, RuntimeError) as error:
            out.append(EstimatorComparison(name, particles, error=str(error).split("\n")[0]))
            continue
        value = -values  # losses -> bounds
        family = name.partition(":")[0] in _ELBO_FAMILY
        target = elbo_target if family else log_evidence
        label = ("ELBO" if family else "log p(x)") + (
            "" if target is None or target[1] else " (estimate)"
        )
        out.append(
            EstimatorComparison(
                name=name,
                particles=particles,
                value=float(value.mean()),
                stderr=float(value.std() / math.sqrt(REPEATS)),
                bias=math.nan if target is None else float(value.mean()) - target[0],
                target="" if target is None else label,
                grad_variance={k: float(g.var(0).mean()) for k, g in grads.items()},
                snr={k: _snr(g) for k, g in grads.items()},
            )
        )
    return tuple(out)


def _snr(draws: torch.Tensor) -> float:
    """Mean over elements of |mean| / sd of the gradient draws (0 where both vanish)."""
    mean, sd = draws.mean(0).abs(), draws.std(0)
    return float(torch.where(sd > 0, mean / sd.clamp_min(1e-300), 0.0).mean())


def format_comparisons(rows: tuple[EstimatorComparison, ...]) -> str:
    """The comparison as a table: value +- s.e., bias, then per parameter variance and SNR."""
    lines = [
        f"estimators compared ({REPEATS} independent estimates each; nats)",
        f"  {'estimator':<14} {'particles':>9} {'value':>10} {'± s.e.':>8} {'bias':>9}  vs",
    ]
    for row in rows:
        if row.error:
            lines.append(f"  {row.name:<14} {row.particles:>9}  not applicable: {row.error}")
            continue
        bias = "n/a" if math.isnan(row.bias) else f"{row.bias:.4f}"
        lines.append(
            f"  {row.name:<14} {row.particles:>9} {row.value:>10.4f} {row.stderr:>8.4f} "
            f"{bias:>9}  {row.target}"
        )
    params = sorted({p for row in rows if row.snr for p in row.snr})
    if params:
        lines.append("  gradient variance / SNR per parameter (per estimate)")
        for row in rows:
            if row.snr is None or row.grad_variance is None:
                continue
            cells = ", ".join(f"{p}: {row.grad_variance[p]:.3g} / {row.snr[p]:.2f}" for p in params)
            lines.append(f"  {row.name:<14} {cells}")
    return "\n".join(lines)
