"""KL scaling: the scaled objective is D + beta R exactly, the schedules at given steps, and
free bits: the objective recon - max(lambda, KL), its value and its gradient."""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO, config_enumerate

from ppl_vae import elbo_ledger
from ppl_vae.elbo import (
    Constant,
    Cyclical,
    FreeBits,
    LinearWarmup,
    as_schedule,
    canonical_beta,
    kl_scale,
    parse_schedule,
)
from ppl_vae.guides import binary_toy as toy_guide
from ppl_vae.guides import linear_gaussian as lg_guide
from ppl_vae.models import binary_toy as toy_model
from ppl_vae.models import linear_gaussian as lg_model

X = torch.tensor([1.0, 0.0, 1.0])


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0, 3.0])
def test_scaled_objective_is_distortion_plus_beta_rate(beta):
    plain = elbo_ledger(toy_model.model, toy_guide.guide, X)
    distortion, rate = -plain.reconstruction, plain.kl
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(
        toy_model.model, config_enumerate(toy_guide.guide), X, beta=beta
    )
    assert loss == pytest.approx(distortion + beta * rate, abs=1e-5)


def test_negative_beta_is_refused():
    with pytest.raises(ValueError, match="beta must be >= 0"):
        kl_scale(-0.1)


def test_linear_warmup():
    schedule = LinearWarmup(steps=100)
    assert [schedule(s) for s in (0, 50, 100, 1000)] == [0.0, 0.5, 1.0, 1.0]
    assert LinearWarmup(steps=10, start=0.2, end=0.6)(5) == pytest.approx(0.4)


def test_cyclical_schedule():
    # Period 100, rising over the first half of each cycle, then flat at 1 (Fu et al. 2019).
    schedule = Cyclical(period=100, ratio=0.5)
    values = [schedule(s) for s in (0, 25, 50, 99, 100, 125, 175)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0])


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("1", Constant(1.0)),
        ("0.5", Constant(0.5)),
        ("warmup:1000", LinearWarmup(1000)),
        ("warmup:1000:2", LinearWarmup(1000, end=2.0)),
        ("cyclical:500", Cyclical(500)),
        ("cyclical:500:0.25:4", Cyclical(500, 0.25, 4.0)),
    ],
)
def test_parse_schedule(spec, expected):
    assert parse_schedule(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["", "-1", "nan", "warmup", "warmup:x", "cyclical", "1:2", "warmup:10:1:2", "warmup:-1",
     "warmup:10:inf", "cyclical:0", "cyclical:10:0", "cyclical:10:1.5", "cyclical:10:0.5:-1"],
)  # fmt: skip
def test_bad_schedules_are_refused(spec):
    with pytest.raises(ValueError, match="bad beta"):
        parse_schedule(spec)
    with pytest.raises(ValueError, match="bad beta") as info:
        canonical_beta(spec)
    with pytest.raises(ValueError) as direct:
        parse_schedule(spec)
    assert str(info.value) == str(direct.value)  # parse_schedule's own message


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("warmup:1000", "warmup:1000"),
        ("warmup:1000:1", "warmup:1000"),
        ("warmup:1000:1.0", "warmup:1000"),
        ("warmup:1000:2", "warmup:1000:2"),
        ("warmup:1000:0.25", "warmup:1000:0.25"),
        ("cyclical:500", "cyclical:500"),
        ("cyclical:500:0.5", "cyclical:500"),
        ("cyclical:500:0.5:1", "cyclical:500"),
        ("cyclical:500:0.25", "cyclical:500:0.25"),
        ("cyclical:500:0.5:4", "cyclical:500:0.5:4"),
        ("cyclical:500:0.25:4.0", "cyclical:500:0.25:4"),
        ("0.5", "0.5"),
        ("1.0", "1"),
        ("0.1", "0.1"),
    ],
)
def test_schedule_text_form_both_ways(text, canonical):
    schedule = parse_schedule(text)
    assert schedule.spec == canonical
    assert parse_schedule(schedule.spec) == schedule
    assert parse_schedule(canonical) == schedule


@pytest.mark.parametrize(
    "schedule",
    [Constant(0.1), Constant(3.0), LinearWarmup(7), LinearWarmup(7, end=1 / 3), Cyclical(9),
     Cyclical(9, 0.3), Cyclical(9, 0.5, 2.5), Cyclical(9, 1 / 7, 1e-3)],
)  # fmt: skip
def test_every_schedule_reads_back_from_its_text(schedule):
    assert parse_schedule(schedule.spec) == schedule
    expected = schedule.beta if isinstance(schedule, Constant) else schedule.spec
    assert canonical_beta(schedule) == expected


def test_a_warmup_from_above_zero_has_no_text_form():
    with pytest.raises(ValueError, match="starts above 0"):
        LinearWarmup(10, start=0.2).spec  # noqa: B018


def test_canonical_beta_gives_one_form():
    for same in ("1", 1, "1.0", 1.0, "1e0", Constant(1.0)):
        assert canonical_beta(same) == 1.0 and isinstance(canonical_beta(same), float)
    assert canonical_beta("warmup:10") == canonical_beta("warmup:10:1") == "warmup:10"
    assert canonical_beta("warmup:20") != canonical_beta("warmup:10")
    assert canonical_beta(LinearWarmup(10)) == "warmup:10"
    assert canonical_beta("cyclical:100:0.5:1") == "cyclical:100"
    assert canonical_beta(0) == 0.0
    for bad in (-1, float("nan"), float("inf"), True, None, [1.0]):
        with pytest.raises(ValueError, match="bad beta"):
            canonical_beta(bad)
    assert as_schedule("warmup:4")(2) == 0.5 and as_schedule(0.25) == Constant(0.25)


# --------------------------------------------------------------------------------------------
# Free bits
# --------------------------------------------------------------------------------------------


def _guide_grad(loss):
    param = pyro.param(toy_guide.PARAM_NAME).unconstrained()
    return torch.autograd.grad(loss, param)[0]


def _toy_loss(model, guide, beta=1.0):
    return TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        model, config_enumerate(guide), X, beta=beta
    )


@pytest.mark.parametrize("lam, clamped", [(0.1, False), (0.5, True)])
def test_free_bits_on_the_toy_value_and_gradient(lam, clamped):
    # KL per datapoint: q(z=1|x) = (0.3, 0.9) against p(z=1) = 0.5, averaged over X = (1, 0, 1).
    toy_guide.initialise(q_given_x1=0.9, q_given_x0=0.3)
    plain = elbo_ledger(toy_model.model, toy_guide.guide, X)
    kl = plain.kl / len(X)
    assert kl == pytest.approx(0.2728, abs=1e-4)
    free_bits = FreeBits(lam)
    loss = _toy_loss(free_bits.model(toy_model.model), free_bits.guide(toy_guide.guide))
    assert free_bits.kl["z"] == pytest.approx(kl, abs=1e-6)
    assert free_bits.clamped == {"z": clamped}
    # The objective is recon - N max(lambda, KL): its loss D + N max(lambda, KL), exactly.
    assert loss.item() == pytest.approx(-plain.reconstruction + len(X) * max(lam, kl), abs=1e-5)
    # Below lambda the KL term's gradient is gone (that of beta = 0); above, the plain one.
    reference = _toy_loss(toy_model.model, toy_guide.guide, beta=0.0 if clamped else 1.0)
    assert torch.allclose(_guide_grad(loss), _guide_grad(reference), atol=1e-6)
    assert not torch.allclose(
        _guide_grad(_toy_loss(toy_model.model, toy_guide.guide, beta=0.0)),
        _guide_grad(_toy_loss(toy_model.model, toy_guide.guide)),
        atol=1e-3,
    )


def test_free_bits_compose_with_beta():
    toy_guide.initialise(q_given_x1=0.9, q_given_x0=0.3)
    plain = elbo_ledger(toy_model.model, toy_guide.guide, X)
    for lam in (0.1, 0.5):
        free_bits = FreeBits(lam)
        loss = _toy_loss(free_bits.model(toy_model.model), free_bits.guide(toy_guide.guide), 2.0)
        expected = -plain.reconstruction + 2.0 * len(X) * max(lam, plain.kl / len(X))
        assert loss.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("elbo_class", [TraceMeanField_ELBO, Trace_ELBO])
@pytest.mark.parametrize("particles", [1, 4])
def test_free_bits_gradient_on_a_continuous_pair(elbo_class, particles):
    # PPCA with the optimal linear guide: KL per datapoint ~ 2.3 nats.
    generator = torch.Generator().manual_seed(1)
    W, b = torch.randn(4, 2, generator=generator), torch.randn(4, generator=generator)
    sigma, x = 0.5, torch.randn(30, 4, generator=generator)
    lg_guide.set_params(*lg_guide.optimal_params(W, b, sigma))
    params = [pyro.param(n).unconstrained() for n in ("lg_A", "lg_c", "lg_log_scale")]
    elbo = elbo_class(
        num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1
    )

    def loss_and_grads(model, guide, beta=1.0):
        pyro.set_rng_seed(3)  # the same draws of z for every loss
        loss = elbo.differentiable_loss(model, guide, x, W, b, sigma, beta=beta)
        return loss.item(), torch.autograd.grad(loss, params)

    plain_loss, plain_grads = loss_and_grads(lg_model.model, lg_guide.guide)
    recon_loss, recon_grads = loss_and_grads(lg_model.model, lg_guide.guide, beta=0.0)
    for lam in (0.5, 5.0):
        free_bits = FreeBits(lam, sites=["z"])
        loss, grads = loss_and_grads(
            free_bits.model(lg_model.model), free_bits.guide(lg_guide.guide)
        )
        clamped = free_bits.clamped["z"]
        assert clamped == (lam > free_bits.kl["z"])
        ref_loss, ref_grads = (
            (recon_loss + len(x) * lam, recon_grads)
            if clamped
            else (
                plain_loss,
                plain_grads,
            )
        )
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        for g, ref in zip(grads, ref_grads, strict=True):
            assert torch.allclose(g, ref, atol=1e-5)


def test_free_bits_refuse_bad_lambda_and_leave_a_bare_model_alone():
    with pytest.raises(ValueError, match="lambda"):
        FreeBits(-1.0)
    with pytest.raises(ValueError, match="lambda"):
        FreeBits(float("nan"))
    free_bits = FreeBits(1.0, sites=["z"])
    assert "lam=1.0" in repr(free_bits)
    # The model run on its own (no wrapped guide before it) is untouched: no factor site.
    trace = poutine.trace(free_bits.model(toy_model.model)).get_trace(X)
    assert [n for n, s in trace.nodes.items() if s["type"] == "sample"] == ["data", "z", "x"]
