"""Callbacks of this project."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl


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

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0 and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path, weights_only=False)


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
