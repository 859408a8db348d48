"""Test-set numbers of a trained VAE: ELBO, its two terms, the IWAE bound, and the latent code.

Every number is per image, in nats, at beta = 1 (the true ELBO whatever beta training used):

- ELBO = E_q[log p(x | z)] - KL(q(z | x) || p(z)) = -(distortion + rate), a lower bound on
  log p(x); the KL is closed-form, the reconstruction term a Monte Carlo average.
- IWAE_K = E[log (1/K) sum_k p(x, z_k) / q(z_k | x)], z_k ~ q(z | x) (Burda et al. 2015), also a
  lower bound on log p(x); ELBO <= IWAE_K <= IWAE_{K'} <= log p(x) in expectation for K <= K'.
  -IWAE_K is therefore an upper bound on the test negative log-likelihood.
- bits/dim = -value / (D ln 2), D the number of values in one image.

The IWAE bound goes through Pyro traces for any pair; a caller that has a faster estimator of
the same bound passes it (``log_evidence``), as :func:`vae_log_evidence` builds for the
Gaussian VAE. Standard errors are across images (s.d. / sqrt(N)); the IWAE - ELBO gap's s.e.
comes from the per-image paired differences, which removes the image-to-image spread the two
share.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ppl_vae.elbo import enumerated_site_terms, inspect_pair, iwae_log_evidence, sampled_site_terms
from ppl_vae.models.vae import check_data
from ppl_vae.rng import forked_rng, sub_seed
from ppl_vae.runs.evaluation import Evaluation
from ppl_vae.training import Distributed
from ppl_vae.vae import active_units, kl_per_dimension, posterior_moments, vae_iwae

__all__ = ["FLOAT_BUDGET", "LogEvidence", "evaluate", "vae_log_evidence"]

FLOAT_BUDGET = 32 * 2**20
"""Largest (particles x images x D) block evaluated at once: 32 Mi floats, 128 MiB in float32.
The decoder's output and its log-probabilities are blocks of this size; hidden layers wider than
D (e.g. conv decoders) multiply it, so pass smaller ``batch_size`` / ``iwae_chunk`` for those."""

EVAL_BLOCK = 500
"""Images per evaluation block. A block's draws come from (seed, block index) alone, so its
numbers do not depend on which process evaluates it, nor on how many share the work."""

DEFAULT_IWAE_CHUNK = 1000
"""Importance samples per pass when neither ``iwae_chunk`` nor ``batch_size`` is given."""

LogEvidence = Callable[[Tensor, int, bool], Tensor]
"""A per-image IWAE estimator: ``log_evidence(images, num_samples, progress)`` -> the (N,)
IWAE_K bounds (K = ``num_samples``), float64 on the CPU; ``progress`` shows a progress bar."""


def vae_log_evidence(
    encoder: nn.Module,
    decoder: nn.Module,
    *,
    likelihood: str = "bernoulli",
    sigma: float | None = None,
    prior: nn.Module | None = None,
) -> LogEvidence:
    """The Gaussian VAE's IWAE bound without Pyro traces (:func:`ppl_vae.vae.vae_iwae`, the
    same estimator as the generic one, several times faster), for ``evaluate(...,
    log_evidence=...)``. ``likelihood``, ``sigma`` and a learned ``prior`` as bound to the
    model (:func:`ppl_vae.models.vae.model`)."""

    def log_evidence(images: Tensor, num_samples: int, progress: bool) -> Tensor:
        p_z = None if prior is None else prior.distribution(encoder)
        # 2,000 decoder rows per pass: big enough for efficient matrix products, small enough
        # (6 MB at D = 784) to reuse memory instead of faulting in fresh pages every pass.
        chunk = min(num_samples, 100)
        per_image = vae_iwae(
            encoder,
            decoder,
            images,
            likelihood=likelihood,
            sigma=sigma,
            num_samples=num_samples,
            chunk_size=chunk,
            batch_size=max(1, 2000 // chunk),
            progress=progress,
            prior=p_z,
        )
        return per_image.double().cpu()

    return log_evidence


def _mean_se(values: Tensor) -> tuple[float, float]:
    """Mean and standard error (s.d. / sqrt(N)) of per-image values; s.e. NaN for N = 1."""
    values = values.double()
    n = values.numel()
    se = float(values.std() / math.sqrt(n)) if n > 1 else math.nan
    return float(values.mean()), se


def _sizes(
    n: int,
    d: int,
    k: int,
    elbo_particles: int,
    batch_size: int | None,
    iwae_chunk: int | None,
) -> tuple[int, int, int]:
    """(ELBO batch, IWAE batch, IWAE chunk) keeping particles x images x D <= FLOAT_BUDGET."""
    for name, value in (("batch_size", batch_size), ("iwae_chunk", iwae_chunk)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if batch_size is not None:
        chunk = min(k, iwae_chunk or max(1, FLOAT_BUDGET // (batch_size * d)))
        return batch_size, batch_size, chunk
    chunk = min(k, iwae_chunk or DEFAULT_IWAE_CHUNK)
    elbo_batch = max(1, min(n, FLOAT_BUDGET // (elbo_particles * d)))
    iwae_batch = max(1, min(n, FLOAT_BUDGET // (chunk * d)))
    return elbo_batch, iwae_batch, chunk


def evaluate(
    model: Callable,
    guide: Callable,
    images: Tensor,
    *,
    encoder: nn.Module | None = None,
    iwae_samples: int = 5000,
    iwae_chunk: int | None = None,
    batch_size: int | None = None,
    elbo_particles: int = 1,
    seed: int | None = 0,
    progress: bool = True,
    log_evidence: LogEvidence | None = None,
    distributed: Distributed | None = None,
    block_size: int = EVAL_BLOCK,
) -> Evaluation:
    """ELBO, reconstruction, KL, IWAE bound and latent diagnostics of a VAE on ``images``.

    The images go in blocks of ``block_size`` (:data:`EVAL_BLOCK`), each with its own draws; with
    ``distributed`` (every rank of a ``torchrun`` job calls alike) the ranks share the blocks
    and all-reduce the per-image values: the numbers of one process, on every rank.

    :param model: the bound VAE model (``functools.partial(models.vae.model, decoder=...)``),
        called as ``model(x, beta=1.0, check_data=False)``; the guide likewise.
    :param images: (N, D) test images, already binarised when the likelihood needs it; all the
        computation runs on their device (the networks must live there too).
    :param encoder: the guide's encoder, for active units and KL per dimension; when ``None``
        it is taken from ``guide.keywords["encoder"]`` (a ``functools.partial``) if there.
    :param iwae_samples: K, importance samples per image for the IWAE bound.
    :param iwae_chunk: samples per pass; ``batch_size``: images per pass. When left ``None``
        they are chosen so that chunk x batch x D stays under :data:`FLOAT_BUDGET` floats.
    :param elbo_particles: Monte Carlo particles per image for the reconstruction term.
    :param seed: seeds torch for the evaluation (the caller's random state is restored);
        ``None`` leaves the random state alone.
    :param progress: show a progress bar over the IWAE data batches.
    :param log_evidence: the pair's IWAE bound per image by a faster route than Pyro traces
        (see :data:`LogEvidence`), e.g. ``vae_log_evidence(encoder, decoder)`` for the
        Gaussian VAE; it chooses its own blocks (``iwae_chunk`` and ``batch_size`` then size
        the ELBO only). ``None``: :func:`ppl_vae.elbo.iwae_log_evidence` on the pair.
    """
    if iwae_samples < 1 or elbo_particles < 1:
        raise ValueError(
            f"iwae_samples and elbo_particles must be >= 1, got {iwae_samples}, {elbo_particles}"
        )
    if encoder is None:
        encoder = getattr(guide, "keywords", {}).get("encoder")
    check_data(images, x_dim=getattr(encoder, "x_dim", None), name="images")
    n, d = images.shape
    if n == 0:
        raise ValueError("images holds no rows: nothing to evaluate")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    elbo_batch, iwae_batch, chunk = _sizes(
        min(n, block_size), d, iwae_samples, elbo_particles, batch_size, iwae_chunk
    )
    kwargs = {"beta": 1.0, "check_data": False}
    start_time = time.perf_counter()
    # Per image: reconstruction, KL, IWAE bound; and whether any KL term was sampled.
    values = torch.zeros(3, n, dtype=torch.float64)
    kl_sampled = torch.zeros(1, dtype=torch.float64)
    blocks = range(math.ceil(n / block_size))
    mine = [b for b in blocks if distributed is None or b % distributed.world == distributed.rank]
    bar = tqdm(mine, desc=f"ELBO and IWAE K={iwae_samples}", unit="block", disable=not progress)
    with torch.no_grad():
        for block in bar:
            rows = slice(block * block_size, min(n, (block + 1) * block_size))
            x = images[rows]
            seeded = (
                forked_rng(images.device, sub_seed(seed, block))
                if seed is not None
                else contextlib.nullcontext()
            )
            with seeded:
                recon, kl, sampled = _elbo_terms(
                    model, guide, x, elbo_batch, elbo_particles, kwargs
                )
                if log_evidence is not None:
                    iwae = log_evidence(x, iwae_samples, False)
                else:
                    iwae = _pyro_iwae(model, guide, x, iwae_samples, iwae_batch, chunk, kwargs)
            values[:, rows] = torch.stack([recon, kl, iwae.double().cpu()])
            kl_sampled += sampled
        if distributed is not None:  # each image's values come from one rank: an exact sum
            values = distributed.sum_over_ranks(values, "the evaluation all-reduce")
            kl_sampled = distributed.sum_over_ranks(kl_sampled, "the evaluation all-reduce")
        recon, kl, iwae_per_image = values
        any_sampled = bool(kl_sampled.item() > 0)
        code = None
        if encoder is not None:
            code = _code(encoder, images, max(elbo_batch, 2), per_dimension=not any_sampled)
    seconds = time.perf_counter() - start_time
    return _record(
        images, recon, kl, iwae_per_image, code, iwae_samples, elbo_particles, seconds, any_sampled
    )


def _code(
    encoder: nn.Module, images: Tensor, batch: int, *, per_dimension: bool
) -> tuple[int | None, int, tuple[float, ...] | None]:
    """(active units, z_dim, KL per dimension) of the codes of ``images``; no active-unit
    count from a single image (it needs a variance across images). KL per dimension is to
    N(0, 1): only ``per_dimension`` (a standard normal prior, whose KL has a closed form)."""
    mu, log_var = posterior_moments(encoder, images, batch_size=batch)
    kl_dims = None
    if per_dimension:
        kl_dims = tuple(float(v) for v in kl_per_dimension(mu, log_var).double().cpu())
    n_active = active_units(mu)[0] if images.shape[0] > 1 else None
    return n_active, int(mu.shape[1]), kl_dims


def _record(
    images: Tensor,
    recon: Tensor,
    kl: Tensor,
    iwae_per_image: Tensor,
    code: tuple[int | None, int, tuple[float, ...]] | None,
    iwae_samples: int,
    elbo_particles: int,
    seconds: float,
    kl_sampled: bool,
) -> Evaluation:
    """The :class:`Evaluation` of the per-image terms: means, standard errors, the gap."""
    n, d = images.shape
    n_active, z_dim, kl_dims = code if code is not None else (None, None, None)
    elbo_per_image = recon - kl
    elbo, elbo_se = _mean_se(elbo_per_image)
    iwae, iwae_se = _mean_se(iwae_per_image)
    gap, gap_se = _mean_se(iwae_per_image - elbo_per_image)
    return Evaluation(
        n_images=int(n),
        image_dim=int(d),
        elbo=elbo,
        elbo_se=elbo_se,
        reconstruction=float(recon.mean()),
        kl=float(kl.mean()),
        iwae=iwae,
        iwae_se=iwae_se,
        iwae_k=int(iwae_samples),
        gap_elbo_iwae=gap,
        gap_se=gap_se,
        active_units=n_active,
        z_dim=z_dim,
        kl_per_dim=kl_dims,
        elbo_particles=int(elbo_particles),
        seconds=seconds,
        device=str(images.device),
        kl_sampled=kl_sampled,
        elbo_per_image=elbo_per_image,
        iwae_per_image=iwae_per_image,
    )


def _elbo_terms(
    model: Callable,
    guide: Callable,
    images: Tensor,
    batch: int,
    particles: int,
    kwargs: dict[str, Any],
) -> tuple[Tensor, Tensor, bool]:
    """Per-image reconstruction E_q[log p(x | z)] (``particles`` draws) and KL, closed-form
    where ``kl_divergence`` has it, (N,) float64 CPU tensors each, and whether any KL term
    was sampled instead; the guide's discrete sites (M2's label) summed out."""
    structure = inspect_pair(model, guide, (images[:batch],), kwargs)
    recon_parts, kl_parts = [], []
    sampled = False
    for x in images.split(batch):
        if structure.enumerable_latent:  # one draw per discrete value, ``particles`` times
            draws = [
                enumerated_site_terms(
                    model, guide, x, keep_plates=("data",), structure=structure, **kwargs
                )
                for _ in range(particles)
            ]
            terms = {
                name: (kind, method, torch.cat([d[name][2] for d in draws]))
                for name, (kind, method, _) in draws[0].items()
            }
        else:
            terms = sampled_site_terms(
                model,
                guide,
                x,
                num_particles=particles,
                analytic_kl=True,
                keep_plates=("data",),
                structure=structure,
                **kwargs,
            )
        # Each term is (particles, batch): sum the sites, average the particles.
        recon = sum(t for kind, _, t in terms.values() if kind == "reconstruction")
        kl = sum(t for kind, _, t in terms.values() if kind == "kl")
        recon_parts.append(torch.as_tensor(recon).mean(0).double().cpu())
        kl_parts.append(torch.as_tensor(kl).mean(0).double().cpu())
        sampled = sampled or any(
            kind == "kl" and method == "sampled" for kind, method, _ in terms.values()
        )
    return torch.cat(recon_parts), torch.cat(kl_parts), sampled


def _pyro_iwae(
    model: Callable,
    guide: Callable,
    images: Tensor,
    iwae_samples: int,
    iwae_batch: int,
    chunk: int,
    kwargs: dict[str, Any],
) -> Tensor:
    """The IWAE bound of any pair through Pyro traces, per image."""
    iwae_parts = []
    for x in images.split(iwae_batch):
        per_item = iwae_log_evidence(
            model, guide, x, num_samples=iwae_samples, chunk_size=chunk, **kwargs
        ).per_item.reshape(-1)
        if per_item.numel() != x.shape[0]:
            raise ValueError(
                "the IWAE bound came out with no per-image values: every site of the pair "
                "must sit in the same 'data' plate over the rows of x"
            )
        iwae_parts.append(per_item.double().cpu())
    return torch.cat(iwae_parts)  # (N,)
