"""Training on several processes (``torchrun``): one global batch a step, split across ranks,
with the numbers of one process.

Every rank holds the whole training set and draws the same data order, the same dynamic
binarisation and the same guide noise as one process would, from the same seed: each draws
the step's global batch and its noise in full and keeps its own contiguous slice of rows
(drawing a batch's noise costs far less than the networks' passes over it). A rank's loss is
its slice's share of the pair's sum over the plate named ``"data"``, plus the terms outside
that plate divided by the world size; summed over ranks (``torch.distributed.all_reduce``),
loss and gradients are those of the whole batch on one process, up to the order of the
float sums.

Why one all-reduce of the param store's gradients rather than a ``DistributedDataParallel``
wrapper: Pyro's param store holds ``pyro.param`` values as plain tensors, which DDP cannot
register, and the compiled engine returns its gradients as graph outputs, which DDP's autograd
hooks never see. One coalesced ``all_reduce`` per step serves both engines; at the VAE's
0.65 M parameters it is a single bucket, the size DDP would use, so nothing is lost by not
overlapping it with the backward pass.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from pyro.distributions import Independent, TorchDistribution
from pyro.poutine.messenger import Messenger
from torch import Tensor
from torch.distributions import Distribution as _TorchDist
from torch.distributions import kl_divergence, register_kl

from ppl_vae.errors import ArgumentError, PeerLostError

__all__ = ["BACKENDS", "DATA_PLATE", "Distributed", "Shard", "launched_by_torchrun"]

BACKENDS = ("auto", "gloo", "nccl")
"""Values of ``--backend``: "auto" is NCCL on CUDA, gloo on the CPU."""

DATA_PLATE = "data"
"""The plate whose rows are split across ranks (the house convention for the data plate)."""

_NO_SHAPE = torch.Size()

DEFAULT_TIMEOUT_S = 120.0
"""How long a collective waits for a peer before the run stops with an error (seconds)."""


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Shard:
    """Rows ``lo:hi`` of a global batch of ``total`` rows, on one of ``world`` ranks."""

    lo: int
    hi: int
    total: int
    world: int


class Distributed:
    """This process's place in a ``torchrun`` job: rank, world size, backend and the
    collectives the training loop needs (each bounded by ``timeout_s``)."""

    def __init__(self, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if backend not in BACKENDS:
            raise ArgumentError(f"backend must be one of {BACKENDS}, not {backend!r}")
        needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        missing = [k for k in needed if k not in os.environ]
        if missing:
            raise ArgumentError(
                f"distributed training needs the variables torchrun sets ({', '.join(missing)} "
                "missing): launch with 'torchrun --nproc-per-node N -m ppl_vae train ...' or "
                "'ppl-vae train --nproc N ...'"
            )
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        self.backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
        self.timeout_s = timeout_s
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group(self.backend, timeout=datetime.timedelta(seconds=timeout_s))

    @property
    def device(self) -> torch.device:
        """This rank's device: its local GPU under NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, total: int) -> Shard:
        """This rank's contiguous rows of a global batch of ``total`` (sizes differing by at
        most one, the larger first, as ``torch.tensor_split`` cuts)."""
        base, extra = divmod(total, self.world)
        lo = self.rank * base + min(self.rank, extra)
        hi = lo + base + (1 if self.rank < extra else 0)
        return Shard(lo, hi, total, self.world)

    def check_batches(self, n: int, batch_size: int) -> None:
        """Refuse a data order with a batch smaller than the world: a rank would get no rows."""
        last = n % batch_size or batch_size
        if min(batch_size, last) < self.world:
            raise ArgumentError(
                f"{self.world} processes need at least {self.world} images a batch; batch "
                f"size {batch_size} on {n} images leaves a last batch of {last}: change "
                "--batch-size or the number of processes"
            )

    # ---- collectives ---------------------------------------------------------------------

    def _collective(self, what: str, op: Callable[[], Any]) -> Any:
        try:
            return op()
        except (RuntimeError, dist.DistBackendError) as exc:
            raise PeerLostError(
                f"rank {self.rank} of {self.world}: {what} failed, a peer process stopped or "
                f"did not answer within {self.timeout_s:g} s ({str(exc).splitlines()[0]})"
            ) from exc

    def sum_gradients(self, params: Sequence[Tensor]) -> None:
        """Replace every parameter's ``.grad`` by its sum over ranks (one coalesced
        all-reduce; a missing gradient counts as zero)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._collective("the gradient all-reduce", lambda: dist.all_reduce(flat))
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n

    def step_summary(self, loss: Tensor, signum: int | None) -> tuple[Tensor, int | None]:
        """The step's loss summed over ranks, and the signal any rank received (SIGTERM
        before SIGINT), so every rank stops at the same step boundary."""
        flags = torch.zeros(3, dtype=torch.float64, device=loss.device)
        flags[0] = loss.detach().to(torch.float64)
        flags[1] = float(signum == signal.SIGINT)
        flags[2] = float(signum == signal.SIGTERM)
        self._collective("the step's all-reduce", lambda: dist.all_reduce(flags))
        stop = signal.SIGTERM if flags[2] > 0 else signal.SIGINT if flags[1] > 0 else None
        return flags[0].to(loss.dtype), None if stop is None else int(stop)

    def gather_rows(self, rows: Tensor, shard: Shard) -> Tensor:
        """The global batch's ``(total,)`` values on every rank, from each rank's rows
        ``lo:hi`` (a zero-padded sum: exact, every row has one non-zero term)."""
        full = rows.new_zeros(shard.total)
        full[shard.lo : shard.hi] = rows
        self._collective("the validation all-reduce", lambda: dist.all_reduce(full))
        return full

    def sum_over_ranks(self, value: Tensor, what: str) -> Tensor:
        """``value`` summed over the ranks (on this rank's device for the collective, returned
        where it was)."""
        on_device = value.to(self.device)
        self._collective(what, lambda: dist.all_reduce(on_device))
        return on_device.to(value.device)

    def barrier(self) -> None:
        self._collective("a barrier", lambda: dist.barrier())

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class ShardMessenger(Messenger):
    """Run a pair on this rank's rows of the global batch as one process runs the whole.

    Inside the plate named ``"data"`` a site's terms are this rank's rows of the global sum;
    outside it, a site's terms are divided by the world size (every rank holds them in full).
    With ``draw_global`` (the guide), a sampled site in that plate draws its value for the
    global batch from this rank's (shared) random state and keeps its rows, so its noise is
    the noise one process draws for those rows."""

    def __init__(self, shard: Shard, *, draw_global: bool, split_shared: bool = True) -> None:
        super().__init__()
        self.shard = shard
        self.draw_global = draw_global
        self.split_shared = split_shared  # False: per-row terms only, nothing rescaled
        self.data_sites = 0

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] != "sample":
            return
        frame = next((f for f in msg["cond_indep_stack"] if f.name == DATA_PLATE), None)
        if frame is None:
            if self.split_shared:
                msg["scale"] = msg["scale"] / self.shard.world
            return
        self.data_sites += 1
        if not self.draw_global or msg["is_observed"] or msg["value"] is not None:
            return
        if frame.size != self.shard.hi - self.shard.lo:
            raise ArgumentError(
                f"site {msg['name']!r}: the plate {DATA_PLATE!r} has size {frame.size}, not the "
                f"{self.shard.hi - self.shard.lo} rows of this rank's batch"
            )
        msg["fn"] = GlobalDraw(msg["fn"], self.shard, frame.dim, site=msg["name"])


class GlobalDraw(TorchDistribution):
    """``base`` (batch dimension ``dim`` holding this rank's rows) whose draws are rows
    ``lo:hi`` of a draw for the whole global batch: its parameters padded to ``total`` rows
    with copies of the first, sampled, and sliced; log-densities are the base's."""

    arg_constraints: ClassVar[dict] = {}

    def __init__(self, base: Any, shard: Shard, dim: int, *, site: str) -> None:
        self.base, self.shard, self.dim, self.site = base, shard, dim, site
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]
        return self.base.has_rsample

    @property
    def support(self) -> Any:  # type: ignore[override]
        return self.base.support

    @property
    def has_enumerate_support(self) -> bool:  # type: ignore[override]
        return False

    def expand(self, batch_shape: Any, _instance: Any = None) -> GlobalDraw:
        return GlobalDraw(self.base.expand(batch_shape), self.shard, self.dim, site=self.site)

    def log_prob(self, value: Tensor) -> Tensor:
        return self.base.log_prob(value)

    def rsample(self, sample_shape: torch.Size = _NO_SHAPE) -> Tensor:
        return self._draw(sample_shape, reparameterised=True)

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> Tensor:
        with torch.no_grad():
            return self._draw(sample_shape, reparameterised=False)

    def _draw(self, sample_shape: torch.Size, *, reparameterised: bool) -> Tensor:
        padded = _padded(self.base, self.dim, self.shard, self.site)
        value = padded.rsample(sample_shape) if reparameterised else padded.sample(sample_shape)
        dim = self.dim - len(self.event_shape)  # the batch dimension, counted from the right
        return value.narrow(dim, self.shard.lo, self.shard.hi - self.shard.lo)

    @property
    def mean(self) -> Tensor:  # type: ignore[override]
        return self.base.mean

    @property
    def variance(self) -> Tensor:  # type: ignore[override]
        return self.base.variance

    def entropy(self) -> Tensor:
        return self.base.entropy()


@register_kl(GlobalDraw, _TorchDist)
def _kl_global_draw(p: GlobalDraw, q: _TorchDist) -> Tensor:
    # The analytic KL of a mean-field ELBO is the base's: the draw changes nothing in it.
    return kl_divergence(p.base, q)


def _padded(fn: Any, dim: int, shard: Shard, site: str) -> Any:
    """``fn`` with batch dimension ``dim`` padded from ``hi - lo`` to ``total`` rows (rows
    ``lo:hi`` its own), rebuilt from its parameters."""
    if isinstance(fn, Independent):
        base = _padded(fn.base_dist, dim - fn.reinterpreted_batch_ndims, shard, site)
        return Independent(base, fn.reinterpreted_batch_ndims, validate_args=False)
    names = [k for k in type(fn).arg_constraints if k in vars(fn)]
    if "logits" in names and "probs" in names:  # one was computed from the other: keep logits
        names.remove("probs")
    if not names or type(fn).__module__.startswith("pyro.distributions.torch_distribution"):
        raise ArgumentError(
            f"site {site!r}: distributed training draws each row's noise for the global batch "
            f"and cannot rebuild {type(fn).__name__} from its parameters; use a distribution "
            "of torch's (Normal, Bernoulli, Categorical, ...) or train on one process"
        )
    batch = len(fn.batch_shape)
    params = {}
    for name in names:
        value = getattr(fn, name)
        if not isinstance(value, Tensor):
            params[name] = value
            continue
        trailing = value.shape[batch:]  # a parameter's own event dimensions (logits' C)
        full = value.expand(*fn.batch_shape, *trailing)  # the batch dimensions first
        params[name] = _pad_rows(full, batch + dim, shard)
    return type(fn)(**params, validate_args=False)


def _pad_rows(value: Tensor, axis: int, shard: Shard) -> Tensor:
    edge = value.narrow(axis, 0, 1)
    shape = list(value.shape)
    parts = []
    if shard.lo:
        parts.append(edge.expand(*shape[:axis], shard.lo, *shape[axis + 1 :]))
    parts.append(value)
    if shard.total - shard.hi:
        parts.append(edge.expand(*shape[:axis], shard.total - shard.hi, *shape[axis + 1 :]))
    return torch.cat(parts, dim=axis)
