"""The exp/log softplus and Bernoulli log-likelihood agree with torch's, values and gradients."""

import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

from ppl_vae.elbo import (
    BernoulliLogits,
    bernoulli_log_prob,
    linear_bernoulli_log_prob,
    softplus,
)


def test_softplus_matches_torch_including_extremes():
    logits = torch.cat([torch.randn(10_000) * 8, torch.tensor([-200.0, -90.0, 0.0, 90.0, 200.0])])
    reference = F.softplus(logits.double())
    assert torch.isfinite(softplus(logits)).all()
    # float32: relative 1e-6 of the value, plus the ~6e-8 floor where log(1 + u) rounds to 0.
    assert torch.allclose(softplus(logits).double(), reference, rtol=1e-6, atol=1e-7)


def test_bernoulli_log_prob_and_gradient_match_binary_cross_entropy():
    logits = (torch.randn(64, 784) * 4).requires_grad_()
    x = torch.bernoulli(torch.rand(64, 784))
    ours = bernoulli_log_prob(logits, x).sum(-1)
    reference = -F.binary_cross_entropy_with_logits(logits.double(), x.double(), reduction="none")
    # Summed over 784 pixels in float32: agreement to 1e-4 nats per image.
    assert torch.allclose(ours.double(), reference.sum(-1), atol=1e-4)
    (grad,) = torch.autograd.grad(ours.sum(), logits)
    assert torch.allclose(grad, x - torch.sigmoid(logits), atol=1e-6)


def test_distribution_agrees_with_pyros_bernoulli_and_validates():
    logits = torch.randn(3, 5)
    x = torch.bernoulli(torch.rand(3, 5))
    ours = BernoulliLogits(logits=logits).to_event(1)
    theirs = dist.Bernoulli(logits=logits).to_event(1)
    assert torch.allclose(ours.log_prob(x), theirs.log_prob(x), atol=1e-5)
    assert ours.batch_shape == theirs.batch_shape and ours.event_shape == theirs.event_shape
    with pytest.raises(ValueError):
        BernoulliLogits(logits=logits, validate_args=True).log_prob(torch.full((3, 5), 0.5))


@pytest.mark.parametrize("d", [5, 50, 784])  # fewer than, not a multiple of, 16 x 49 pixels
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_linear_bernoulli_log_prob_matches_the_elementwise_sum(scale, d):
    """The rearranged sum over pixels equals sum_d [x_d l_d - softplus(l_d)] (float64 reference),
    for logits from near 0 to |l| ~ 100s, over (K, B) blocks of codes."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 7, 32, generator=gen).relu()  # (K, B, H)
    weight = torch.randn(d, 32, generator=gen) * scale / 32**0.5
    bias = torch.randn(d, generator=gen) * scale
    x = torch.bernoulli(torch.full((7, d), 0.3), generator=gen)
    logits = (hidden.double() @ weight.double().T) + bias.double()
    want = (x.double() * logits - F.softplus(logits)).sum(-1)
    got = linear_bernoulli_log_prob(hidden, weight, bias, x)
    assert got.shape == (5, 7)
    # float32 rounding of d terms of size up to |l| (relative 1e-5 of the summed |l|), and of
    # the grouped logs (1e-6 relative per product of 16, ~1e-7 x d nats in all).
    tol = 1e-5 * logits.abs().sum(-1) + 1e-4 + 1e-6 * d
    assert ((got.double() - want).abs() <= tol).all()
