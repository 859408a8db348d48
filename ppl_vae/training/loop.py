"""The training loop behind :func:`~ppl_vae.training.fit.fit`: epochs of steps over the
data order, validation after each, checkpoints at step boundaries, and how a run stops
(divergence, signals, patience). One process; :mod:`~ppl_vae.training.distributed_loop`
runs it across several.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import pyro
import torch
from torch import Tensor, nn

from ppl_vae.checkpoint import Checkpoint, restore, restore_optimizer, restore_rng
from ppl_vae.elbo import as_schedule
from ppl_vae.errors import TrainingDivergedError, TrainingInterrupted
from ppl_vae.training.config import HISTORY_COLUMNS, History, TrainConfig
from ppl_vae.training.engine import Engine
from ppl_vae.training.files import RunFiles
from ppl_vae.training.guard import BadStep, Diagnosis, LossGuard, nonfinite_parameters
from ppl_vae.training.order import Batch, BatchOrder
from ppl_vae.training.progress import Progress
from ppl_vae.training.signals import StopFlag, interrupted
from ppl_vae.training.state import RunState, check_resumable
from ppl_vae.training.validation import VALIDATION_COLUMNS, Validator, summarise

__all__ = ["TrainingLoop"]


class TrainingLoop:
    """One training run: its engine, state, data order, guard and checkpoints."""

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        train_images: Tensor,
        validation: Tensor | None,
        *,
        config: TrainConfig,
        modules: dict[str, nn.Module],
        files: RunFiles,
        device: torch.device,
        dynamic_binarize: bool,
        kwargs: dict[str, Any],
        beta_schedule: Callable[[int], float] | None,
        stop: StopFlag,
        labels: tuple[Tensor | None, int, float | None] = (None, 0, None),
    ) -> None:
        self.config, self.modules, self.files = config, modules, files
        self.kwargs, self.stop, self.device = kwargs, stop, device
        # The bar's running value is the ELBO when beta = 1, the beta-ELBO otherwise.
        self.plain = (
            beta_schedule is None
            and config.beta == 1
            and config.free_bits == 0
            and config.objective == "elbo"
        )
        self.beta_at = beta_schedule if beta_schedule is not None else as_schedule(config.beta)

        pyro.set_rng_seed(config.seed)
        x_train = train_images.to(device)  # moved once; batches are slices of it
        for m in modules.values():
            m.to(device)
        self.order = BatchOrder(
            x_train,
            batch_size=config.batch_size,
            seed=config.seed,
            device=device,
            dynamic_binarize=dynamic_binarize,
            labels=labels[0],
            labelled_batch=labels[1],
            labelled_weight=labels[2],
        )
        self.steps_per_epoch = self.order.steps_per_epoch
        # Validation and the divergence diagnosis get the plain pair: the ELBO.
        self.engine = Engine(
            model,
            guide,
            config,
            x_train[: config.batch_size],
            # Any beta: no gradient is taken (and a schedule function is not called early).
            {**kwargs, "beta": config.beta if isinstance(config.beta, float) else 1.0},
            device,
            dynamic_binarize,
            beta_varies=beta_schedule is not None or isinstance(config.beta, str),
        )
        self.validator = None
        if validation is not None:
            x_val = validation.to(device)
            self.validator = Validator.for_run(model, guide, x_val, kwargs, config, device, modules)
        self.guard = LossGuard(device)
        self.diagnosis = Diagnosis(
            model, guide, kwargs, config, device=device, steps_per_epoch=self.steps_per_epoch
        )
        self.state = RunState(History(out_dir=files.out), total=self.guard.zero())
        self.saves = files.ckpt_dir is not None  # checkpoints at step boundaries
        self.started = self.epoch_started = time.perf_counter()

    # ---- the run -------------------------------------------------------------------------

    def run(self, checkpoint: Checkpoint | None) -> History:
        config = self.config
        if checkpoint is not None:
            self._resume(checkpoint)
        self.files.write_config()  # after the resume's checks: a refused one changes nothing
        rows = self.state.history.rows
        progress = Progress(
            total=config.epochs * self.steps_per_epoch,
            initial=self.state.step,
            enabled=config.progress,
            label="elbo" if self.plain else config.objective.replace("elbo", "objective"),
            last_row=rows[-1] if rows else None,
        )
        try:
            for epoch in range(self.state.epoch + 1, config.epochs + 1):
                if self._out_of_patience():
                    break
                progress.end_epoch(self._epoch(epoch, progress))
                if self.stop.signum is not None and epoch < config.epochs:
                    raise self._interrupted()  # the epoch's checkpoint is written
            if self._out_of_patience() and self.state.epoch < config.epochs:
                self.state.history.stopped_early = self.state.epoch
        finally:
            progress.close()
        return self.state.history

    def _out_of_patience(self) -> bool:
        """``config.patience`` epochs have passed since the best validation ELBO; read off
        the history, so a resumed run stops where the uninterrupted one did."""
        patience, best = self.config.patience, self.state.history.best_epoch
        return patience is not None and best is not None and self.state.epoch - best >= patience

    def _epoch(self, epoch: int, progress: Progress) -> dict[str, Any]:
        """Train epoch ``epoch`` from the state's position, validate, save; its row."""
        state = self.state
        self.epoch_started = t0 = time.perf_counter()
        progress.start_epoch(epoch, self.config.epochs)
        perm = self.order.permutation(epoch)
        if state.position and state.order_state is not None:
            self.order.set_state(state.order_state)  # as it was at the position
        else:
            state.start_epoch(self.guard.zero())
        state.order_state = None
        lr = self.engine.lr()
        every = self.config.checkpoint_every if self.saves else None
        for index in range(state.position, self.steps_per_epoch):
            if self.stop.signum is not None:
                self._save(("last",))
                raise self._interrupted()
            self._step(self.order.batch(perm, index))
            state.position = index + 1
            progress.step(self._running_value)
            within = state.position < self.steps_per_epoch  # the epoch's end saves anyway
            if every is not None and state.step % every == 0 and within:
                self._save(("last",))
        bad = self.guard.drain()
        if bad is not None:
            raise self._diverged(bad)
        train_loss = float(state.total)  # the epoch's one read of the training loss
        if not math.isfinite(train_loss):  # the guard saw every step: cannot happen
            raise self.diagnosis.error(
                "the epoch's summed loss is not finite",
                step=state.step,
                site=None,
                checkpoint=self.files.last_good,
            )
        return self._end_epoch(epoch, lr, train_loss, self._epoch_train_seconds(), t0)

    def _running_value(self) -> float:
        return -float(self.state.total) / self.state.seen

    def _step(self, batch: Batch) -> None:
        state, engine, x = self.state, self.engine, batch.x
        beta = float(self.beta_at(state.step))
        # Argument checks run on the first step, where a model bug shows; later they would
        # cost a device sync per distribution and step, and NaN arguments then show as a NaN
        # loss, which the guard reports.
        checks = contextlib.nullcontext() if state.step == 0 else pyro.validation_enabled(False)
        try:
            with checks:
                loss = self._backward(x, {**self.kwargs, **batch.kwargs, "beta": beta})
        except (ValueError, RuntimeError) as exc:
            # NaN parameters make the next step's distributions reject their arguments;
            # report that as divergence.
            engine.discard()
            error = self._divergence_so_far()
            if error is not None:
                raise error from exc
            raise
        checked = self.guard.check(self._agree(loss), state.step + 1, x, beta)
        if checked.bad is not None:
            engine.discard()  # the bad step's update is not applied
            raise self._diverged(checked.bad)
        engine.update(skip=checked.skip)
        state.step += 1
        state.seen += batch.images
        state.total += checked.amount
        state.beta = beta

    def _backward(self, x: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The step's loss on batch ``x``, its gradients in ``.grad``."""
        return self.engine.backward(x, kwargs)

    def _agree(self, loss: Tensor) -> Tensor:
        """The step's loss as every process of the run sees it (here: the one process)."""
        return loss

    def _end_epoch(
        self, epoch: int, lr: float, train_loss: float, train_seconds: float, t0: float
    ) -> dict[str, Any]:
        state, history = self.state, self.state.history
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": state.step,
            "lr": lr,
            "beta": state.beta,
            "train_objective": -train_loss / self.order.n,
        }
        if self.validator is not None:
            row.update(summarise(*self.validator(), state.beta))
        else:
            row.update(dict.fromkeys(VALIDATION_COLUMNS))
        self.engine.end_epoch()  # scheduler step: the next epoch's rate
        score = row["val_elbo"] if self.validator is not None else row["train_objective"]
        row["best"] = bool(score > state.best_value)
        if row["best"]:
            state.best_value = score
            history.best_epoch = epoch
        row["train_seconds"] = train_seconds
        row["seconds"] = state.epoch_seconds + time.perf_counter() - t0  # with validation
        history.rows.append({k: row[k] for k in HISTORY_COLUMNS})
        state.epoch, state.position = epoch, 0
        if self.saves:
            self._save(("best", "last") if row["best"] else ("last",))
            self.files.write_history(history.rows)
        return row

    def _epoch_train_seconds(self) -> float:
        return self.state.epoch_seconds + time.perf_counter() - self.epoch_started

    # ---- checkpoints ---------------------------------------------------------------------

    def _save(self, names: tuple[str, ...]) -> None:
        """Write the named checkpoints at the current step boundary, once every loss so far
        is known to be finite and so is every parameter."""
        if self.files.ckpt_dir is None:
            return
        error = self._divergence_so_far()
        if error is not None:
            raise error
        counters, state = self.state.body(
            seconds=self.state.seconds + time.perf_counter() - self.started,
            train_seconds=self._epoch_train_seconds(),
            images=self._images(),
            order_device=self.order.device_type,
            order_state=self.order.get_state(),
        )
        self.files.save(names, self.engine, counters, state)

    def _images(self) -> list[int]:
        """What a checkpoint records of the training images: [count, values per image]."""
        return [self.order.n, int(self.order.images.shape[1])]

    def _resume(self, checkpoint: Checkpoint) -> None:
        check_resumable(
            checkpoint,
            self.files.configuration,
            self._images(),
            config_files=self.files.config_files(checkpoint),
        )
        self.state = RunState.read(
            checkpoint,
            self.state.history,
            zero=self.guard.zero(),
            order_device=self.order.device_type,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.config.epochs,
        )
        self.files.resume(checkpoint, self.state.history.rows)
        # Parameters, optimizer, scheduler, then every random state: nothing draws after this
        # before the next step.
        restore(checkpoint, modules=self.modules, rng=False, device=self.device)
        restore_optimizer(
            checkpoint, self.engine.optimizer, scheduler=self.engine.scheduler, modules=self.modules
        )
        restore_rng(checkpoint)

    # ---- how a run stops -----------------------------------------------------------------

    def _diverged(self, bad: BadStep) -> TrainingDivergedError:
        return self.diagnosis.loss(bad, checkpoint=self.files.last_good)

    def _divergence_so_far(self) -> TrainingDivergedError | None:
        """The divergence of the run so far, if any: a bad loss not yet read, or non-finite
        parameters (before a save, or behind a step that failed)."""
        bad = self.guard.drain()
        if bad is not None:
            return self._diverged(bad)
        broken = nonfinite_parameters()
        if broken:
            return self.diagnosis.parameters(
                broken, self.state.step, known=False, checkpoint=self.files.last_good
            )
        return None

    def _interrupted(self) -> TrainingInterrupted:
        return interrupted(
            self.stop,
            step=self.state.step,
            epoch=self.state.epoch,
            epochs=self.config.epochs,
            checkpoint=self.files.last_good,
            out=self.files.out,
        )
