"""Callbacks of this project."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loops import evaluation_loop as _evaluation_loop

from lit_modules.checkpointing import CheckpointNotWritten


class PeriodicCheckpoint(pl.Callback):
    """Save a full (resumable) checkpoint to ``path`` every ``every_n_steps`` optimiser steps.

    Pointed at ``last.ckpt`` it bounds the work a hard kill (SIGKILL) can lose
    to ``every_n_steps`` steps; the checkpoint IO plugin makes each write atomic.
    """

    def __init__(self, path: str | Path, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self._last_saved_step = -1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        # Saved before the next batch, when the previous one is fully counted as done (as on an interrupt);
        # a save inside on_train_batch_end would be resumed with that batch half-counted.
        step = trainer.global_step
        if step and step % self.every_n_steps == 0 and step != self._last_saved_step:
            trainer.save_checkpoint(self.path, weights_only=False)
            self._last_saved_step = step


class CheckpointOnInterrupt(pl.Callback):
    """Save a resumable checkpoint to ``path`` when training stops on an exception.

    That covers Ctrl-C (KeyboardInterrupt), a scheduler's SIGTERM (Lightning
    raises SIGTERMException at the next batch boundary) and a crash. Unlike
    Lightning's OnExceptionCheckpoint, the file is kept after teardown, so
    ``--ckpt-path last`` can continue from it.

    A stop after an epoch's last training batch and before that epoch's checkpoints
    are written (in or before its validation) would, resumed as Lightning records it,
    go on to the next epoch: a point missing from the ``val/acc`` curve, and an epoch
    the best checkpoint never competed for, so the final test could load another
    checkpoint than an uninterrupted run's. ``validates`` says the run validates at
    every epoch's end; such a stop is then saved as a validation restarted before its
    first batch (Lightning's mid-validation restart, pytorch-lightning 2.5 or newer):
    the resumed run validates that epoch in full, at the same logging step, and saves
    its checkpoints before it trains on.
    """

    def __init__(self, path: str | Path, validates: bool = False) -> None:
        self.path = Path(path)
        self.validates = validates
        self._checkpointed_epoch = -1
        self._saving_on_exception = False

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        # After a failed checkpoint write (a full disk) another write fails too; the last file written stays.
        if trainer.state.fn == "fit" and trainer.global_step > 0 and not isinstance(exception, CheckpointNotWritten):
            self._saving_on_exception = True
            try:
                trainer.save_checkpoint(self.path, weights_only=False)
            except CheckpointNotWritten:
                pass  # the stop goes on as it began, resumable from the last checkpoint written
            finally:
                self._saving_on_exception = False

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        if not self._epoch_trained(trainer):
            return
        if not self._saving_on_exception:
            self._checkpointed_epoch = trainer.current_epoch  # the epoch-end checkpoints, after validation
        elif self.validates and MID_VALIDATION_RESTART and self._checkpointed_epoch != trainer.current_epoch:
            restart_validation_before_first_batch(checkpoint)

    @staticmethod
    def _epoch_trained(trainer: pl.Trainer) -> bool:
        """Whether every training batch of the current epoch is processed, and the epoch validates at its end."""
        return (
            not trainer.sanity_checking
            and trainer.fit_loop.epoch_loop.batch_progress.current.processed >= trainer.num_training_batches
            and (trainer.current_epoch + 1) % trainer.check_val_every_n_epoch == 0
        )


MID_VALIDATION_RESTART = hasattr(getattr(_evaluation_loop, "_EvaluationLoop", None), "restarted_mid_evaluation")
"""Whether Lightning resumes a checkpoint saved inside a validation by running that validation."""


def restart_validation_before_first_batch(checkpoint: dict) -> None:
    """Rewrite a checkpoint's loop progress so that a resume first runs the current epoch's whole validation.

    Lightning takes a validation whose last batch was started but not processed for one
    stopped mid-way and runs it again over the whole validation set (nothing of a partial
    validation is kept: its metrics are not checkpointed). Training progress is marked
    complete: every training batch of the epoch was processed, and a stop inside the last
    batch's end hooks comes after its optimiser step. The logging step is set back to the
    one the epoch's validation logs at, in case the validation had already run.
    """
    progress = checkpoint["loops"]["fit_loop"]
    for counts in (progress["epoch_progress"]["total"], progress["epoch_progress"]["current"]):
        counts["processed"] = counts["completed"]  # the epoch's loop runs again, from its validation
    training = progress["epoch_loop.batch_progress"]
    for counts in (training["total"], training["current"]):
        counts["completed"] = counts["processed"]
    validation = progress["epoch_loop.val_loop.batch_progress"]
    earlier_validations = validation["total"]["completed"] - validation["current"]["completed"]
    validation["total"] = {"ready": earlier_validations + 1, "started": earlier_validations + 1,
                           "processed": earlier_validations, "completed": earlier_validations}
    validation["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    validation["is_last_batch"] = False
    # counts optimiser steps but the epoch's last, until its validation has logged
    progress["epoch_loop.state_dict"]["_batches_that_stepped"] = checkpoint["global_step"] - 1


class StopAfterEpochs(pl.Callback):
    """End training after ``epochs`` epochs of a longer planned schedule, with everything saved to resume.

    For time-sliced machines: the learning-rate schedule still spans the
    planned ``max_epochs``; ``--ckpt-path last`` later continues exactly where
    this stopped.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class StopOnDivergence(pl.Callback):
    """End training after an epoch whose mean training loss is not finite (nan or inf).

    Such weights do not recover: every later epoch would be wasted, and a test of
    them would score one class for every image. ``diverged_epoch`` is then that
    epoch (from 0). Checked once per epoch, from the loss the epoch already logs
    (synchronised across DDP processes, so all of them stop together).
    """

    def __init__(self) -> None:
        self.diverged_epoch: int | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("train/loss_epoch")
        if loss is not None and not torch.isfinite(loss).all():
            self.diverged_epoch = trainer.current_epoch
            trainer.should_stop = True


class EpochTimer(pl.Callback):
    """Log each training epoch's wall time, images per second (all processes) and peak GPU memory.

    Costs one counter update per batch; the numbers appear as ``perf/*`` scalars.
    An epoch resumed from a mid-epoch checkpoint is not timed.
    """

    def __init__(self) -> None:
        self._images = 0
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._images = 0
        self._start = time.perf_counter()
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._images += batch[0].shape[0]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self._start is None:
            return
        seconds = time.perf_counter() - self._start
        # Under DDP every process logs and the synchronised value is the slowest process's: its time, the images
        # of all processes over that time, the largest peak memory.
        metrics = {
            "perf/epoch_seconds": (seconds, "max"),
            "perf/train_images_per_sec": (self._images * trainer.world_size / seconds, "min"),
        }
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            metrics["perf/gpu_max_memory_gib"] = (torch.cuda.max_memory_allocated(pl_module.device) / 2**30, "max")
        for name, (value, slowest) in metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, reduce_fx=slowest, sync_dist=True)


# Lightning's weight-averaging callback arrived in pytorch-lightning 2.6; older versions train without --ema-decay.
_WeightAveraging = getattr(pl.callbacks, "WeightAveraging", None)
EMA_SUPPORTED = _WeightAveraging is not None


class ExponentialMovingAverage(_WeightAveraging or pl.Callback):
    """An exponential moving average of the weights (Polyak & Juditsky 1992), BatchNorm statistics included.

    After optimiser step ``n + 1`` (``n`` from 0) ``average = d * average + (1 - d) * weights``
    with ``d = min(decay, (1 + n) / (10 + n))``, the warm-up of TensorFlow's
    ``ExponentialMovingAverage`` with ``num_updates``. Without it the average would start as
    the weights after one step and hold ``decay ** n`` of them after ``n`` more: with
    ``decay = 0.999``, 35 % after 1,050 steps (three CIFAR-10 epochs at batch 128), which
    validates near chance. With it, ``d`` is 0.18 at the second step, 0.99 near step 900 and
    reaches ``decay`` (0.999) at step 8,991; from there the average spans about the last
    1,000 steps. Integer buffers (BatchNorm's batch counter) take the current value.

    Validation runs on the average, so ``val/acc`` and the best checkpoint are the average's.
    A checkpoint's ``state_dict`` holds the average (what the final test, ``evaluate.py``,
    ``predict.py`` and ``export.py`` load) and ``current_model_state`` the trained weights,
    which a resumed run goes on from. When training ends the network keeps the average.

    Two things differ from Lightning's ``WeightAveraging``: a checkpoint loaded for testing (not
    for resuming) keeps its averaged ``state_dict`` instead of swapping the trained weights back
    in, and a checkpoint saved while validation has the average in the network (an interrupt
    mid-validation) still stores the two the right way round.
    """

    def __init__(self, decay: float) -> None:
        if not EMA_SUPPORTED:
            raise RuntimeError("weight averaging needs pytorch-lightning 2.6 or newer")
        if not 0 < decay < 1:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay}")
        super().__init__(use_buffers=True, multi_avg_fn=self._update_average)
        self.decay = decay
        self._step_decay = decay
        self._network_holds_average = False

    def step_decay(self, step_idx: int) -> float:
        """The decay applied after optimiser step ``step_idx + 1`` (the first step only copies the weights)."""
        return min(self.decay, (1 + step_idx) / (10 + step_idx))

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        # Called with the zero-based index of the step just taken, right before each update. The decay is
        # set here from that Python int, not from the update's count argument, a tensor on the averaging
        # device whose read would stall a GPU every step.
        if step_idx is None:
            return False
        self._step_decay = self.step_decay(step_idx)
        return True

    @torch.no_grad()
    def _update_average(self, averages: list[torch.Tensor], currents: list[torch.Tensor], _updates_so_far) -> None:
        if torch.is_floating_point(averages[0]):
            torch._foreach_lerp_(averages, currents, 1 - self._step_decay)
        else:
            for average, current in zip(averages, currents):
                average.copy_(current)

    def _swap_models(self, pl_module) -> None:
        super()._swap_models(pl_module)
        self._network_holds_average = not self._network_holds_average

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._network_holds_average and "current_model_state" in checkpoint:
            checkpoint["state_dict"], checkpoint["current_model_state"] = (
                checkpoint["current_model_state"], checkpoint["state_dict"])

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
