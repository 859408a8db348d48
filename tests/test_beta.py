"""KL scaling: the scaled objective is D + beta R exactly, and the schedules at given steps."""

import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

from ppl_vae import elbo_ledger
from ppl_vae.beta import Constant, Cyclical, LinearWarmup, kl_scale, parse_schedule
from ppl_vae.guides import binary_toy as toy_guide
from ppl_vae.models import binary_toy as toy_model

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


@pytest.mark.parametrize("spec", ["", "-1", "nan", "warmup", "warmup:x", "cyclical", "1:2"])
def test_bad_schedules_are_refused(spec):
    with pytest.raises(ValueError, match="bad beta"):
        parse_schedule(spec)
