"""The Gaussian VAE as a plain Pyro model: p(z) = N(0, I) or a learned prior; p(x | z) from a
decoder network.

p(x | z) is Bernoulli(sigmoid(f(z))), N(f(z), sigma^2 I) or ContinuousBernoulli(sigmoid(f(z))),
f the decoder. Bind the networks and configuration with ``functools.partial`` and pass only the
step-time arguments (``x``, ``beta``, ``check_data``) to SVI, which the guide in
``ppl_vae.guides.vae`` accepts too::

    model = functools.partial(models.vae.model, decoder=dec, likelihood="bernoulli")
    guide = functools.partial(guides.vae.guide, encoder=enc)
    svi = SVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO())
    svi.step(x, beta=1.0)
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae.elbo import BernoulliLogits, kl_scale
from ppl_vae.errors import DataError

__all__ = [
    "BINARY_FIX",
    "LIKELIHOODS",
    "check_data",
    "generate",
    "likelihood_distribution",
    "likelihood_mean",
    "model",
    "observation",
    "reconstruct",
]

LIKELIHOODS = ("bernoulli", "gaussian", "continuous-bernoulli")
"""Names accepted by ``likelihood=``."""

BINARY_FIX = (
    "binarise the data (--binarize static|dynamic) "
    "or use --likelihood continuous-bernoulli / gaussian"
)
"""The fix named by the error raised for non-binary data under a Bernoulli likelihood."""


def _check_likelihood(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")


def _z_dim(net: nn.Module, z_dim: int | None) -> int:
    if z_dim is None:
        z_dim = getattr(net, "z_dim", None)
        if z_dim is None:
            raise ValueError(f"pass z_dim=: {type(net).__name__} has no z_dim attribute")
    return z_dim


def check_data(
    x: torch.Tensor,
    *,
    x_dim: int | None = None,
    likelihood: str | None = None,
    name: str = "x",
) -> None:
    """Raise :class:`DataError` unless ``x`` is usable data of shape ``(N, x_dim)``.

    Checks: a 2-D float tensor, ``x_dim`` columns (when given), and, in one fused pass over the
    values: finite (no likelihood), 0/1 (``"bernoulli"``), in [0, 1] (``"continuous-bernoulli"``)
    or finite (``"gaussian"``). The value pass is one min/max reduction (and, for 0/1, the dot
    product of x and 1 - x); the diagnosis of what is wrong runs only when it fails.
    """
    if torch.jit.is_tracing():
        # Under a Jit ELBO the checks run once, on the batch being traced, and are not part of
        # the trace: validate the whole dataset up front and pass check_data=False.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            _check_values(x, x_dim, likelihood, name)
    else:
        _check_values(x, x_dim, likelihood, name)


def _check_values(x: torch.Tensor, x_dim: int | None, likelihood: str | None, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
    if x.dim() != 2:
        raise DataError(
            f"{name} must be 2-D (N, D) with flattened images, got shape {tuple(x.shape)}; "
            f"flatten it with {name}.reshape(len({name}), -1)"
        )
    if not x.is_floating_point():
        raise DataError(f"{name} must be a float tensor, got {x.dtype}; convert it with .float()")
    if x_dim is not None and x.shape[1] != x_dim:
        raise DataError(
            f"{name} has shape {tuple(x.shape)} but the network expects (N, {x_dim}): "
            "check the dataset matches the networks' x_dim"
        )
    if x.numel() == 0:
        return
    # One reduction pass (plus a dot product for 0/1), read back in one transfer: the check
    # runs on every training step. NaN propagates to both min and max; inf shows in one.
    lo, hi = torch.aminmax(x)
    if likelihood == "bernoulli":
        # Within [0, 1], x (1 - x) >= 0 and is 0 only at 0 and 1: its sum is 0 iff x is binary.
        flat = x.reshape(-1)
        lo, hi, spread = torch.stack((lo, hi, torch.dot(flat, 1 - flat))).tolist()
        good = lo >= 0 and hi <= 1 and spread == 0
    else:
        lo, hi = torch.stack((lo, hi)).tolist()
        if likelihood == "continuous-bernoulli":
            good = lo >= 0 and hi <= 1
        else:
            good = math.isfinite(lo) and math.isfinite(hi)
    if good:
        return
    n_nonfinite = int((~torch.isfinite(x)).sum())
    if n_nonfinite:
        raise DataError(
            f"{name} contains {n_nonfinite} NaN or inf value(s) (shape {tuple(x.shape)}); "
            "clean or impute the data before training"
        )
    if likelihood == "bernoulli":
        lo, hi = float(x.min()), float(x.max())
        raise DataError(
            f"the Bernoulli likelihood needs {name} in {{0, 1}}, got values in [{lo:g}, {hi:g}]"
            f" that are not all 0 or 1: {BINARY_FIX}"
        )
    if likelihood == "continuous-bernoulli":
        lo, hi = float(x.min()), float(x.max())
        raise DataError(
            f"the continuous-Bernoulli likelihood needs {name} in [0, 1], got values in "
            f"[{lo:g}, {hi:g}]: rescale the data (e.g. x / 255) or use --likelihood gaussian"
        )


_check = check_data  # ``model`` and the guide shadow the name with their ``check_data`` flag


def observation(
    decoder: nn.Module,
    z: torch.Tensor,
    likelihood: str = "bernoulli",
    sigma: float | None = None,
) -> dist.TorchDistribution:
    """p(x | z) with event shape ``(x_dim,)`` and batch shape ``z.shape[:-1]``.

    ``sigma`` (Gaussian only) fixes the standard deviation; when ``None`` the decoder's learned
    ``log_sigma`` is used. A fixed ``sigma`` takes precedence over a learned one.
    """
    _check_likelihood(likelihood)
    out = decoder(z)  # (..., x_dim): logits or mean
    return likelihood_distribution(out, likelihood, sigma, getattr(decoder, "log_sigma", None))


def likelihood_distribution(
    out: torch.Tensor,
    likelihood: str = "bernoulli",
    sigma: float | None = None,
    log_sigma: torch.Tensor | None = None,
) -> dist.TorchDistribution:
    """p(x | decoder output): Bernoulli or continuous Bernoulli of logits ``out``, or
    N(out, sigma^2) with a fixed ``sigma`` or else exp(``log_sigma``); event shape
    ``out.shape[-1:]``."""
    _check_likelihood(likelihood)
    if likelihood == "bernoulli":
        return BernoulliLogits(logits=out).to_event(1)
    if likelihood == "continuous-bernoulli":
        return dist.ContinuousBernoulli(logits=out).to_event(1)
    if sigma is not None:
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        scale = out.new_tensor(float(sigma)).expand(out.shape)  # (..., x_dim)
    else:
        if log_sigma is None:
            raise ValueError(
                "the gaussian likelihood needs sigma=<float> or a decoder with a learned "
                "log_sigma (make_networks(..., likelihood='gaussian', learn_sigma='scalar' "
                "or 'pixel'))"
            )
        scale = log_sigma.exp().expand(out.shape)  # (1,) or (x_dim,) -> (..., x_dim)
    return dist.Normal(out, scale).to_event(1)


def model(
    x: torch.Tensor,
    *,
    decoder: nn.Module,
    z_dim: int | None = None,
    likelihood: str = "bernoulli",
    sigma: float | None = None,
    beta: float = 1.0,
    check_data: bool = True,
    prior: nn.Module | None = None,
    encoder: nn.Module | None = None,
) -> None:
    """p(x, z) = p(z) p(x | z), one z per row of ``x``; the latent site scaled by beta.
    p(z) = N(0, I), or ``prior.distribution(encoder)`` (:mod:`ppl_vae.vae.priors`).

    :param x: data, ``(N, x_dim)`` float; 0/1 for "bernoulli", in [0, 1] for
        "continuous-bernoulli".
    :param decoder: z -> logits / mean; registered as ``pyro.module("decoder", ...)``.
    :param z_dim: latent size; defaults to ``decoder.z_dim``.
    :param likelihood: "bernoulli", "gaussian" or "continuous-bernoulli".
    :param sigma: fixed Gaussian standard deviation; ``None`` uses ``decoder.log_sigma``.
    :param beta: weight of the KL term (``poutine.scale`` on the latent site "z"; the guide
        scales its "z" by the same beta).
    :param check_data: validate ``x`` before the sites (cheap, every step); pass ``False`` once
        the whole dataset has been checked with :func:`check_data`.
    :param prior: a learned prior, registered as ``pyro.module("prior", ...)``; ``None``:
        N(0, I). :param encoder: the guide's encoder, which a VampPrior is made of.
    :raises DataError: when ``x`` has the wrong shape or dtype, NaN/inf, or values outside the
        likelihood's support.
    """
    _check_likelihood(likelihood)
    z_dim = _z_dim(decoder, z_dim)
    if check_data:
        _check(x, x_dim=getattr(decoder, "x_dim", None), likelihood=likelihood)
    pyro.module("decoder", decoder)
    if prior is None:
        loc = x.new_zeros(z_dim)  # (z_dim,); the plates broadcast it to (..., N, z_dim)
        p_z = dist.Normal(loc, torch.ones_like(loc)).to_event(1)
    else:
        pyro.module("prior", prior)
        p_z = prior.distribution(encoder)  # batch (), event (z_dim,)
    with pyro.plate("data", x.shape[0]):
        with kl_scale(beta):
            z = pyro.sample("z", p_z)
        pyro.sample("x", observation(decoder, z, likelihood, sigma), obs=x)


def generate(
    decoder: nn.Module,
    num_samples: int,
    *,
    likelihood: str = "bernoulli",
    z_dim: int | None = None,
    prior: nn.Module | None = None,
    encoder: nn.Module | None = None,
) -> torch.Tensor:
    """Mean images E[x | z] for z ~ p(z) (N(0, I), or ``prior.distribution(encoder)``),
    shape ``(num_samples, x_dim)``.

    Probabilities sigmoid(f(z)) for "bernoulli", the continuous-Bernoulli mean (in [0, 1])
    for "continuous-bernoulli", f(z) for "gaussian". Reshape with ``decoder.image_shape``.
    Seed with ``pyro.set_rng_seed``.
    """
    _check_likelihood(likelihood)
    z_dim = _z_dim(decoder, z_dim)
    param = next(decoder.parameters(), None)
    kw = {} if param is None else {"device": param.device, "dtype": param.dtype}
    with torch.no_grad():
        if prior is None:
            z = torch.randn(num_samples, z_dim, **kw)  # (num_samples, z_dim)
        else:
            z = prior.distribution(encoder).sample((num_samples,))
        return likelihood_mean(decoder(z), likelihood)  # (num_samples, x_dim)


def reconstruct(
    encoder: nn.Module,
    decoder: nn.Module,
    x: torch.Tensor,
    likelihood: str = "bernoulli",
) -> torch.Tensor:
    """E[x | z = mu(x)]: the mean of p(x | z) at the encoder's mean code, shape of ``x``."""
    _check_likelihood(likelihood)
    check_data(x, x_dim=getattr(encoder, "x_dim", None))
    with torch.no_grad():
        mu, _ = encoder(x)  # (N, z_dim)
        return likelihood_mean(decoder(mu), likelihood)  # (N, x_dim)


def likelihood_mean(out: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Mean of p(x | z) from the decoder output (logits or mean)."""
    if likelihood == "bernoulli":
        return torch.sigmoid(out)
    if likelihood == "continuous-bernoulli":
        return dist.ContinuousBernoulli(logits=out).mean
    return out
