"""Latent-space diagnostics on encoders whose answers are known in closed form."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from ppl_vae.diagnostics import (
    MIN_RATE,
    active_units,
    collapse_warning,
    kl_per_dimension,
    posterior_moments,
)

N, D, Z = 200, 6, 3


class ConstantEncoder(nn.Module):
    """A collapsed encoder: q(z | x) = N(c, s^2 I) whatever x is."""

    def __init__(self, c: torch.Tensor, log_var: torch.Tensor) -> None:
        super().__init__()
        self.c, self.log_var = c, log_var

    def forward(self, x):
        shape = (*x.shape[:-1], self.c.shape[0])
        return self.c.expand(shape), self.log_var.expand(shape)


class LinearEncoder(nn.Module):
    """mu = x @ A, log_var fixed: Cov_x(mu_u) = (A^T Cov(x) A)_uu."""

    def __init__(self, A: torch.Tensor, log_var: float = -2.0) -> None:
        super().__init__()
        self.A, self.log_var = A, log_var

    def forward(self, x):
        mu = x @ self.A
        return mu, torch.full_like(mu, self.log_var)


@pytest.fixture
def x():
    return torch.randn(N, D, generator=torch.Generator().manual_seed(3))


def test_collapsed_encoder_has_no_active_units_and_closed_form_kl(x):
    c = torch.tensor([0.0, 0.5, -1.0])
    log_var = torch.tensor([0.0, -1.0, 0.7])
    mu, lv = posterior_moments(ConstantEncoder(c, log_var), x, batch_size=64)
    assert mu.shape == lv.shape == (N, Z)
    count, activity = active_units(mu)
    assert count == 0
    assert torch.allclose(activity, torch.zeros(Z))
    sigma2 = log_var.exp()
    expected = 0.5 * (c**2 + sigma2 - log_var - 1.0)
    assert torch.allclose(kl_per_dimension(mu, lv), expected, atol=1e-6)
    # The first dimension is the prior itself: KL exactly 0.
    assert float(kl_per_dimension(mu, lv)[0]) == pytest.approx(0.0, abs=1e-7)


def test_activity_of_a_linear_encoder_is_the_covariance_of_its_mean(x):
    A = torch.tensor([[1.0, 0.0, 0.05], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]] + [[0.0] * Z] * (D - 3))
    count, activity = active_units(LinearEncoder(A)(x)[0])
    expected = np.cov((x @ A).numpy().T).diagonal()  # ddof = 1, as Burda et al.'s Cov_x
    assert np.allclose(activity.numpy(), expected, rtol=1e-5, atol=1e-8)
    # Unit 0 ~ (1.25 Var x), unit 1 identically 0, unit 2 ~ 0.0025 < 0.01: one active unit.
    assert count == 1
    assert active_units(LinearEncoder(A)(x)[0], threshold=1e-4)[0] == 2


def test_kl_per_dimension_matches_torch_kl_divergence():
    generator = torch.Generator().manual_seed(4)
    mu = 2 * torch.randn(50, Z, generator=generator)
    log_var = torch.randn(50, Z, generator=generator)
    q = Normal(mu, (0.5 * log_var).exp())
    expected = kl_divergence(q, Normal(0.0, 1.0)).mean(0)
    assert torch.allclose(kl_per_dimension(mu, log_var), expected, atol=1e-5)


def test_posterior_moments_batches_agree_with_one_pass(x):
    encoder = LinearEncoder(torch.randn(D, Z, generator=torch.Generator().manual_seed(5)))
    mu_1, lv_1 = posterior_moments(encoder, x, batch_size=7)
    mu_2, lv_2 = posterior_moments(encoder, x, batch_size=N)
    assert torch.allclose(mu_1, mu_2, atol=1e-6) and torch.allclose(lv_1, lv_2)
    assert torch.allclose(mu_1, x @ encoder.A, atol=1e-6)


def test_collapse_warning_fires_for_a_collapsed_encoder_only(x):
    collapsed = ConstantEncoder(torch.zeros(Z), torch.full((Z,), -1e-3))
    mu, lv = posterior_moments(collapsed, x)
    rate = float(kl_per_dimension(mu, lv).sum())
    assert rate < MIN_RATE
    message = collapse_warning(rate, active_units(mu)[0])
    assert message is not None and "collapse" in message and "0 active" in message

    A = torch.eye(D, Z)
    mu, lv = posterior_moments(LinearEncoder(A), x)
    rate = float(kl_per_dimension(mu, lv).sum())
    assert rate > 1.0
    assert collapse_warning(rate, active_units(mu)[0]) is None
    # Either condition alone fires.
    assert "rate" in collapse_warning(0.01, Z)
    assert "active" in collapse_warning(5.0, 0)
    assert collapse_warning(5.0, 1, min_active=2) is not None


def test_diagnostics_refuse_shapes_they_cannot_use():
    with pytest.raises(ValueError, match="N >= 2"):
        active_units(torch.zeros(1, Z))
    with pytest.raises(ValueError, match="mu and log_var"):
        kl_per_dimension(torch.zeros(4, Z), torch.zeros(4, Z + 1))
    assert math.isfinite(float(kl_per_dimension(torch.zeros(4, Z), torch.zeros(4, Z)).sum()))
