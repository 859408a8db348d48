"""The VAE training of ``train_speed.py``'s hand-written loop, re-implemented in NumPyro: the
same work, the way NumPyro's own VAE example writes it (``stax`` networks bound by
``numpyro.module``, ``SVI`` with ``TraceMeanField_ELBO``, ``numpyro.optim.Adam``), with the whole
step jit-compiled by XLA: the batch gathered from the permutation, binarised (one Bernoulli draw
per pixel), the ELBO's gradient and Adam's update.

784-400-20 MLP with ReLU, Bernoulli likelihood on the decoder's logits, N(0, I) prior, closed-form
KL, batch 128 (the last batch of an epoch 96, its own compiled step), Adam 1e-3, data in memory.
The networks start from stax's own initialisation (Glorot normal weights), not torch's.

Needs the ``peers`` extra (``pip install -e '.[peers]'``: jax, numpyro); the row is skipped with
that message otherwise. XLA's CPU threads follow ``--threads``: train_speed pins the process to
that many cores before JAX is imported.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import torch
from _common import PeerRow
from torch import Tensor

X_DIM, HIDDEN, Z_DIM, BATCH, LR = 784, 400, 20, 128, 1e-3


class NumPyroRow(PeerRow):
    """A ``train_speed.Row``: setup, one epoch per call, the test ELBO."""

    key = "numpyro"
    label = "NumPyro SVI + TraceMeanField_ELBO, jit step"
    note = "stax networks, the step (gather, binarise, gradient, Adam) under jax.jit"
    threads = 1
    first_compile: float | None = None

    def setup(self, data: Any, device: torch.device, seed: int) -> None:
        if device.type != "cpu":
            self.skipped = "runs on the CPU here (jax's CPU build)"
            return
        if self.threads == 1 and "jax" not in sys.modules:
            # One thread for Eigen's kernels; train_speed pins the process to --threads cores,
            # which bounds XLA's own pool.
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
        try:
            import jax
            import jax.numpy as jnp
            import numpyro
            import numpyro.distributions as dist
            from jax.example_libraries import stax
            from numpyro.infer import SVI, TraceMeanField_ELBO
        except ImportError:
            self.skipped = "jax/numpyro not installed: pip install -e '.[peers]'"
            return
        jax.config.update("jax_platforms", "cpu")
        self.jax, self.jnp = jax, jnp
        encoder = stax.serial(stax.Dense(HIDDEN), stax.Relu, stax.Dense(2 * Z_DIM))
        decoder = stax.serial(stax.Dense(HIDDEN), stax.Relu, stax.Dense(X_DIM))

        def model(x: Any) -> None:
            decode = numpyro.module("decoder", decoder, (BATCH, Z_DIM))
            with numpyro.plate("data", x.shape[0]):
                z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([Z_DIM]).to_event(1))
                numpyro.sample("x", dist.Bernoulli(logits=decode(z)).to_event(1), obs=x)

        def guide(x: Any) -> None:
            encode = numpyro.module("encoder", encoder, (BATCH, X_DIM))
            mu, log_var = jnp.split(encode(x), 2, axis=-1)
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("z", dist.Normal(mu, jnp.exp(0.5 * log_var)).to_event(1))

        self.svi = SVI(model, guide, numpyro.optim.Adam(LR), TraceMeanField_ELBO())
        self.train = jnp.asarray(data.train.cpu().numpy())
        self.n = self.train.shape[0]
        self.rng = jax.random.PRNGKey(seed)
        self.state = self.svi.init(self.rng, self.train[:BATCH])
        self.enc_apply, self.dec_apply = encoder[1], decoder[1]

        def step(state: Any, train: Any, order: Any, start: Any, key: Any, size: int) -> Any:
            grey = train[jax.lax.dynamic_slice(order, (start,), (size,))]
            x = jax.random.bernoulli(key, grey).astype(jnp.float32)
            return self.svi.update(state, x)

        self.step = jax.jit(step, static_argnames="size")
        self.compiled_sizes: set[int] = set()

    def epoch(self, index: int) -> dict[str, float]:
        jax, jnp = self.jax, self.jnp
        self.rng, perm_key, draw_key = jax.random.split(self.rng, 3)
        order = jax.random.permutation(perm_key, self.n)
        keys = jax.random.split(draw_key, math.ceil(self.n / BATCH))
        wall, cpu = time.perf_counter(), time.process_time()
        compile_seconds, total = 0.0, jnp.zeros(())
        for i, start in enumerate(range(0, self.n, BATCH)):
            size = min(BATCH, self.n - start)
            first = size not in self.compiled_sizes
            t0 = time.perf_counter()
            self.state, loss = self.step(self.state, self.train, order, start, keys[i], size=size)
            total = total + loss
            if first:  # the compile happens in this call; wait for it, and count it apart
                loss.block_until_ready()
                compile_seconds += time.perf_counter() - t0
                self.compiled_sizes.add(size)
        total.block_until_ready()
        self.train_loss = float(total)
        if compile_seconds:
            self.first_compile = (self.first_compile or 0.0) + compile_seconds
        return {"seconds": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

    def test_elbo(self, images: Tensor) -> float:
        """Mean single-sample ELBO per test image (nats): log p(x | z) at one z ~ q(z | x)
        plus the closed-form -KL(q || N(0, I)), in batches of 1,000."""
        jax, jnp = self.jax, self.jnp
        params = self.svi.get_params(self.state)
        x_all = jnp.asarray(images.cpu().numpy())
        key, total = jax.random.PRNGKey(1), 0.0
        for start in range(0, x_all.shape[0], 1000):
            x = x_all[start : start + 1000]
            mu, log_var = jnp.split(self.enc_apply(params["encoder$params"], x), 2, axis=-1)
            key, sub = jax.random.split(key)
            z = mu + jnp.exp(0.5 * log_var) * jax.random.normal(sub, mu.shape)
            logits = self.dec_apply(params["decoder$params"], z)
            loglik = jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)
            kl = 0.5 * jnp.sum(jnp.exp(log_var) + mu**2 - 1.0 - log_var, axis=-1)
            total += float(jnp.sum(loglik - kl))
        return total / x_all.shape[0]
