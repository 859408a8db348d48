"""Time of the importance-weighted bound on log p(x): the generic Pyro path against hand-written
PyTorch and against the decoder's matrix products alone.

IWAE_K(x) = log (1/K) sum_k p(x, z_k) / q(z_k | x), z_k ~ q(z | x), for the 784-400-20 MLP VAE
(ReLU, Bernoulli likelihood) on the first 1,000 binarised Fashion-MNIST test images, K = 1000 by
default. The networks are briefly trained first (one epoch of the hand-written training loop on
the 60,000 training images, ``--train-epochs``), so that the bounds are those of a real model.
Configurations:

- ``evaluate``: ``ppl_vae.evaluate`` with its defaults (ELBO, IWAE and the latent
  diagnostics), given the VAE's bound without Pyro traces (``log_evidence=vae_log_evidence(...)``);
  ``evaluate-generic``: the same without ``log_evidence``, the bound through Pyro traces;
- ``vae-iwae``: ``ppl_vae.vae_iwae`` alone, the bound ``evaluate`` computes for the
  VAE pair (encoder once per image, the decoder's body then its linear head summed with the
  Bernoulli term rearranged as in ``handwritten-fused``), with its default chunks;
- ``evidence``: ``ppl_vae.iwae_log_evidence`` on batches of ``--batch`` images with
  its default chunk of 100 samples; ``evidence-novalidate`` is the same with Pyro's argument
  and support checks off (``pyro.enable_validation(False)``);
- ``handwritten``: streaming PyTorch: the encoder once per batch, the decoder on
  (chunk, batch, 20) codes, log-weights folded into a running log-sum-exp;
- ``handwritten-fused``: the same with log p(x | z) rearranged so that the x-dependent sums
  come from one small product per batch and the rest is |l|, exp and log in place;
- ``decoder-gemm``: the compute bound, the decoder's two forward products on all K x N codes
  (``torch.mm`` on the hand-written path's shapes).

Every configuration reports seconds, the ratio to the decoder-GEMM time, the minor page faults
it caused (``getrusage`` deltas) and the mean bound (the same within Monte Carlo noise), plus
its time extrapolated to K = 5000 on the 10,000 test images (time grows as K x N; ``--big``
measures that instead). torch runs one thread unless ``--threads`` says otherwise; on the CPU
the ratios use this process's CPU time, which leaves out the time spent waiting for a core.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Gemm,
    device_generator,
    hardware_lines,
    load_average,
    load_data,
    markdown_table,
    memory_batches,
    minor_faults,
    resolve_device,
    time_gemm,
    timed,
)

from ppl_vae.elbo import iwae_log_evidence
from ppl_vae.guides import vae as vae_guide
from ppl_vae.models import vae as vae_model
from ppl_vae.runs import evaluate, vae_log_evidence
from ppl_vae.vae import make_networks, vae_iwae

X_DIM, HIDDEN, Z_DIM = 784, 400, 20
IMAGE_SHAPE = (1, 28, 28)
BIG_K, BIG_N = 5000, 10_000


def train_briefly(
    encoder: nn.Module, decoder: nn.Module, images: Tensor, epochs: int, seed: int
) -> None:
    """The hand-written training loop (batch 128, Adam 1e-3, dynamic binarisation)."""
    if epochs < 1:
        return
    gen = device_generator(images.device, seed)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    for _ in range(epochs):
        for x in memory_batches(images, 128, gen):
            mu, log_var = encoder(x)
            std = torch.exp(0.5 * log_var)
            z = mu + std * torch.randn_like(std)
            rec = F.binary_cross_entropy_with_logits(decoder(z), x, reduction="sum")
            kl = -0.5 * torch.sum(1.0 + log_var - mu.pow(2) - log_var.exp())
            optimizer.zero_grad(set_to_none=True)
            (rec + kl).backward()
            optimizer.step()


def handwritten_iwae(
    encoder: nn.Module,
    decoder: nn.Module,
    images: Tensor,
    num_samples: int,
    chunk: int,
    batch: int,
    generator: torch.Generator,
) -> Tensor:
    """IWAE_K per image, streamed: ``chunk`` samples of ``batch`` images at a time.

    log w = log p(x | z) + log N(z; 0, I) - log N(z; mu, std), with z = mu + std * eps; the
    2 pi terms cancel, and log q needs only eps and log std.
    """
    out = []
    with torch.no_grad():
        for x in images.split(batch):
            mu, log_var = encoder(x)  # (B, z) each
            std = torch.exp(0.5 * log_var)
            log_std = 0.5 * log_var.sum(-1)  # (B,)
            running = torch.full((x.shape[0],), -math.inf, device=x.device)
            for start in range(0, num_samples, chunk):
                n = min(chunk, num_samples - start)
                eps = torch.randn((n, *mu.shape), generator=generator, device=x.device)
                z = mu + std * eps  # (n, B, z)
                logits = decoder(z)  # (n, B, 784)
                log_px = -F.binary_cross_entropy_with_logits(
                    logits, x.expand_as(logits), reduction="none"
                ).sum(-1)  # (n, B)
                log_w = log_px - 0.5 * (z.square().sum(-1) - eps.square().sum(-1)) + log_std
                running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
            out.append(running - math.log(num_samples))
    return torch.cat(out)


def handwritten_iwae_fused(
    encoder: nn.Module,
    decoder: nn.Module,
    images: Tensor,
    num_samples: int,
    chunk: int,
    batch: int,
    generator: torch.Generator,
) -> Tensor:
    """:func:`handwritten_iwae` with the Bernoulli term rearranged for the CPU.

    With logits l = h W^T + b (h the decoder's last hidden layer), log p(x | z) =
    x.l - sum softplus(l), softplus(l) = max(l, 0) + log(1 + exp(-|l|)) and
    sum max(l, 0) = (sum l + sum |l|) / 2. The x- and l-sums are linear in h, so they come from
    one (B, 400) product per image batch; what is left per code is |l|, exp and log, in place,
    on the (chunk, batch, 784) block: no log1p, no BCE kernel, one allocation.
    """
    weight, bias = decoder.head.weight, decoder.head.bias  # (784, H), (784,)
    out = []
    with torch.no_grad():
        for x in images.split(batch):
            mu, log_var = encoder(x)
            std = torch.exp(0.5 * log_var)
            log_std = 0.5 * log_var.sum(-1)  # (B,)
            # x.l - (sum l) / 2 = h.(x W - colsum(W) / 2) + (x.b - sum(b) / 2)
            v = x @ weight - 0.5 * weight.sum(0)  # (B, H)
            c = x @ bias - 0.5 * bias.sum() + log_std  # (B,)
            running = torch.full((x.shape[0],), -math.inf, device=x.device)
            for start in range(0, num_samples, chunk):
                n = min(chunk, num_samples - start)
                eps = torch.randn((n, *mu.shape), generator=generator, device=x.device)
                z = mu + std * eps
                h = decoder.body(z)  # (n, B, H)
                a = decoder.head(h).abs_()  # |l|, (n, B, 784)
                abs_sum = a.sum(-1)
                log_term = a.neg_().exp_().add_(1.0).log_().sum(-1)  # sum log(1 + e^-|l|)
                log_px = (h * v).sum(-1) + c - 0.5 * abs_sum - log_term
                log_w = log_px - 0.5 * (z.square().sum(-1) - eps.square().sum(-1))
                running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
            out.append(running - math.log(num_samples))
    return torch.cat(out)


def decoder_gemms(
    num_samples: int, n_images: int, chunk: int, batch: int
) -> list[tuple[Gemm, int]]:
    """The decoder's forward products of the hand-written path, with how often each runs."""
    counts: dict[int, int] = {}
    for start in range(0, n_images, batch):
        b = min(batch, n_images - start)
        for s in range(0, num_samples, chunk):
            rows = min(chunk, num_samples - s) * b
            counts[rows] = counts.get(rows, 0) + 1
    gemms = []
    for rows, count in counts.items():
        gemms.append((Gemm("dec hidden", rows, Z_DIM, HIDDEN, transpose_b=True), count))
        gemms.append((Gemm("dec out", rows, HIDDEN, X_DIM, transpose_b=True), count))
    return gemms


def main(args: argparse.Namespace) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    k, n = (BIG_K, BIG_N) if args.big else (args.k, args.images)

    print("# iwae_speed: the importance-weighted bound, generic Pyro path vs hand-written\n")
    for line in hardware_lines(device):
        print(f"- {line}")
    data = load_data(device, quick=args.train_epochs == 0)
    images = data.test[:n]
    encoder, decoder = make_networks(IMAGE_SHAPE, Z_DIM, (HIDDEN,))
    encoder.to(device)
    decoder.to(device)
    t0 = time.perf_counter()
    train_briefly(encoder, decoder, data.train, args.train_epochs, args.seed)
    weights = (
        f"trained {args.train_epochs} epoch(s) of the hand-written loop "
        f"({time.perf_counter() - t0:.0f} s)"
        if args.train_epochs
        else "random (untrained)"
    )
    print(f"- weights: {weights}; K = {k}, {n:,} test images\n")
    encoder.eval()
    decoder.eval()
    model = functools.partial(vae_model.model, decoder=decoder)
    guide = functools.partial(vae_guide.guide, encoder=encoder)
    kwargs = {"beta": 1.0, "check_data": False}

    def run_evaluate(x: Tensor, k: int) -> Tensor:
        fast = vae_log_evidence(encoder, decoder)  # the VAE's route around Pyro, as evaluate_run's
        return evaluate(
            model, guide, x, iwae_samples=k, progress=False, log_evidence=fast
        ).iwae_per_image

    def run_evaluate_generic(x: Tensor, k: int) -> Tensor:
        # no log_evidence: the bound through Pyro traces
        return evaluate(model, guide, x, iwae_samples=k, progress=False).iwae_per_image

    def run_vae_iwae(x: Tensor, k: int) -> Tensor:
        return vae_iwae(encoder, decoder, x, num_samples=k)

    def run_evidence(x: Tensor, k: int) -> Tensor:
        return torch.cat(
            [
                iwae_log_evidence(model, guide, xb, num_samples=k, **kwargs).per_item.reshape(-1)
                for xb in x.split(args.batch)
            ]
        )

    def run_evidence_novalidate(x: Tensor, k: int) -> Tensor:
        pyro.enable_validation(False)
        try:
            return run_evidence(x, k)
        finally:
            pyro.enable_validation(True)

    gen = device_generator(device, args.seed)

    def run_handwritten(x: Tensor, k: int) -> Tensor:
        return handwritten_iwae(encoder, decoder, x, k, args.chunk, args.batch, gen)

    def run_handwritten_fused(x: Tensor, k: int) -> Tensor:
        return handwritten_iwae_fused(encoder, decoder, x, k, args.chunk, args.batch, gen)

    gemms = decoder_gemms(k, n, args.chunk, args.batch)

    def run_gemm(x: Tensor, k: int) -> dict[str, float]:
        per_call = [(time_gemm(g, device, min_seconds=0.2, blocks=5), count) for g, count in gemms]
        return {
            "seconds": sum(count * wall for (wall, _), count in per_call),
            "cpu": sum(count * cpu for (_, cpu), count in per_call),
        }

    configs = {
        "evaluate": ("ppl_vae.evaluate (ELBO + IWAE + diagnostics)", run_evaluate),
        "evaluate-generic": (
            "evaluate(), no log_evidence: IWAE through Pyro traces",
            run_evaluate_generic,
        ),
        "vae-iwae": ("ppl_vae.vae_iwae (the bound alone)", run_vae_iwae),
        "evidence": (
            f"ppl_vae.iwae_log_evidence, batches of {args.batch}",
            run_evidence,
        ),
        "evidence-novalidate": (
            "iwae_log_evidence, Pyro validation off",
            run_evidence_novalidate,
        ),
        "handwritten": (
            f"hand-written streaming PyTorch (chunk {args.chunk} x batch {args.batch})",
            run_handwritten,
        ),
        "handwritten-fused": (
            "hand-written, Bernoulli term rearranged (exp/log in place)",
            run_handwritten_fused,
        ),
        "decoder-gemm": ("compute bound: decoder forward GEMMs alone", run_gemm),
    }
    keys = list(configs) if args.configs == "all" else args.configs.split(",")
    unknown = sorted(set(keys) - set(configs))
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {', '.join(configs)}")

    # Warm-up: every path once on a few images with a small K (first-call costs, allocator).
    for key in keys:
        if key != "decoder-gemm":
            configs[key][1](images[:8], 16)

    clock = "cpu" if device.type == "cpu" else "seconds"
    times: dict[str, list[dict[str, float]]] = {key: [] for key in keys}
    faults: dict[str, list[int]] = {key: [] for key in keys}
    bounds: dict[str, float] = {}
    for rep in range(args.repeats):
        shift = rep % len(keys)
        for key in keys[shift:] + keys[:shift]:
            fn = configs[key][1]
            f0 = minor_faults()
            clocks, result = timed(lambda fn=fn: fn(images, k), device)
            faults[key].append(minor_faults() - f0)
            if key == "decoder-gemm":
                clocks = result  # the products' own time, without the set-up of the operands
            else:
                bounds[key] = float(result.double().mean())
            times[key].append(clocks)
            print(
                f"  {key}: {clocks['seconds']:.2f} s, CPU {clocks['cpu']:.2f} s "
                f"(load {load_average()})",
                flush=True,
            )

    def median(key: str, name: str) -> float:
        return statistics.median(t[name] for t in times[key])

    # The bound is the best repeat; the other configurations are read at their medians.
    gemm = min(t[clock] for t in times["decoder-gemm"]) if "decoder-gemm" in times else math.nan
    scale = (BIG_K * BIG_N) / (k * n)
    flops = sum(count * g.flops for g, count in gemms)
    table = []
    for key in keys:
        wall = [t["seconds"] for t in times[key]]
        bound = bounds.get(key)
        main = gemm if key == "decoder-gemm" else median(key, clock)
        table.append(
            [
                configs[key][0],
                f"{median(key, 'seconds'):.2f}",
                f"{min(wall):.2f}-{max(wall):.2f}",
                *([f"{median(key, 'cpu'):.2f}"] if clock == "cpu" else []),
                f"{main / gemm:.2f}",
                f"{statistics.median(faults[key]):,.0f}",
                "n/a" if bound is None else f"{bound:.2f}",
                f"{main:.0f}" if args.big else f"{main * scale:.0f}",
            ]
        )
    big = "measured" if args.big else f"extrapolated x{scale:.0f}"
    headers = [
        "configuration",
        "seconds",
        "min-max",
        *(["CPU seconds"] if clock == "cpu" else []),
        f"ratio to decoder GEMM ({'CPU' if clock == 'cpu' else 'wall'})",
        "minor faults",
        "mean IWAE bound (nats)",
        f"K={BIG_K}, N={BIG_N:,}: {'CPU ' if clock == 'cpu' else ''}s ({big})",
    ]
    print(f"\n## IWAE, K = {k}, {n:,} images ({args.repeats} run(s) each, median)\n")
    print(markdown_table(headers, table))
    print(
        f"\ndecoder GEMMs: {flops / 1e9:.0f} GFLOP for K x N = {k * n:,} codes"
        f" ({flops / median('decoder-gemm', 'seconds') / 1e9:.1f} GFLOP/s wall-clock)"
        if "decoder-gemm" in times
        else ""
    )
    print(f"load average at the end: {load_average()}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", type=int, default=1000, help="importance samples (default 1000)")
    parser.add_argument("--images", type=int, default=1000, help="test images (default 1,000)")
    parser.add_argument(
        "--big", action="store_true", help=f"measure K = {BIG_K} on {BIG_N:,} images (slow)"
    )
    parser.add_argument("--chunk", type=int, default=50, help="samples per pass (default 50)")
    parser.add_argument("--batch", type=int, default=50, help="images per pass (default 50)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per configuration")
    parser.add_argument(
        "--configs",
        default="all",
        help="comma-separated: evaluate, evaluate-generic, evidence, evidence-novalidate, "
        "handwritten, handwritten-fused, decoder-gemm (default all)",
    )
    parser.add_argument(
        "--train-epochs", type=int, default=1, help="training epochs first (0: random weights)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: steady on a shared machine; 0: torch's default)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
