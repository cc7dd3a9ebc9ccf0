"""Callbacks of this project."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch


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
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        if trainer.state.fn == "fit" and trainer.global_step > 0:
            trainer.save_checkpoint(self.path, weights_only=False)


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
        metrics = {
            "perf/epoch_seconds": seconds,
            "perf/train_images_per_sec": self._images * trainer.world_size / seconds,
        }
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            metrics["perf/gpu_max_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, rank_zero_only=True)
