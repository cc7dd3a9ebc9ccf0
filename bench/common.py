"""Shared pieces of the benchmarks: synthetic in-memory data, a plain PyTorch training loop, and the Trainer's step times."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import NamedTuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from cli import UserError, autocast_for, quiet_library_notices
from datamodules import CIFAR10DataModule
from datamodules.transforms import normalize, train_augment
from lit_modules import LitClassifier
from lit_modules.classifier import split_decay_groups
from models import InputResize, get_model, list_models
from models.layers import set_matrix_paths


def check_model_names(names: list[str]) -> None:
    """A UserError (one line, exit code 2 through ``run_main``) when a name in ``--models`` is not a registered model."""
    unknown = [name for name in names if name not in list_models()]
    if unknown:
        raise UserError(f"--models: unknown model {', '.join(unknown)}; choose from {', '.join(list_models())}")


def synthetic_images(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 CIFAR-shaped images and labels; speed does not depend on the pixel values."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 10, (count,), generator=generator)


class PlainStep:
    """One training step of a hand-written loop: augment, normalise, forward, backward, SGD step.

    Holds its own model and optimiser, so several variants (precision, memory format,
    ``torch.compile``) can take turns step by step in one process. With ``input_size``
    each 32x32 batch is resized to that size before the model, as
    ``LitClassifier(input_size=...)`` does. With ``ema_decay`` each step also updates an
    exponential moving average of the weights, as ``train.py --ema-decay`` does. With
    ``dense_tiny_maps=False`` the convolutions on tiny maps, with
    ``pointwise_as_matrix=False`` the 1x1 convolutions, and with
    ``weight_grad_as_matrix=False`` the weight gradients on small maps run through
    ``nn.Conv2d`` instead of the matrix products of ``models.layers.Conv2d``.
    Calling it returns the step's seconds; ``compute_seconds`` then holds the part
    of them spent in the model's forward pass, the backward pass and the optimiser's
    update, the work the Trainer's step shares with it.
    """

    def __init__(self, model_name: str, precision: str, channels_last: bool, compile: bool = False,
                 input_size: int | None = None, ema_decay: float = 0.0, dense_tiny_maps: bool = True,
                 pointwise_as_matrix: bool = True, weight_grad_as_matrix: bool = True) -> None:
        torch.manual_seed(0)
        model = get_model(model_name).train()
        set_matrix_paths(model, dense_tiny_maps=dense_tiny_maps, pointwise_as_matrix=pointwise_as_matrix,
                         weight_grad_as_matrix=weight_grad_as_matrix)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compile:
            model.compile()
        self.model, self.precision, self.channels_last = model, precision, channels_last
        self.resize = InputResize(input_size)
        self.optimizer = torch.optim.SGD(split_decay_groups(model, 5e-4), lr=0.01, momentum=0.9, nesterov=True)
        self.average = None
        if ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        start = time.perf_counter()
        with torch.enable_grad():
            batch = normalize(train_augment(images))
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast_for(self.precision, "cpu"):
                batch = self.resize(batch)
                forward_start = time.perf_counter()
                logits = self.model(batch)
                forward_seconds = time.perf_counter() - forward_start
                loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
            self.optimizer.zero_grad(set_to_none=True)
            backward_start = time.perf_counter()
            loss.backward()
            self.optimizer.step()
            self.compute_seconds = forward_seconds + time.perf_counter() - backward_start
            if self.average is not None:
                self.average.update_parameters(self.model)
        return time.perf_counter() - start


class MatrixProductStep:
    """One ``size x size`` by ``size x size`` matrix product at ``precision``'s compute type (bf16 for the bf16
    precisions, else fp32): the FLOP rate this CPU reaches on a large, well-shaped problem, the ceiling that a
    network's training step, mostly matrix products and convolutions, can approach. Calling it returns the
    product's seconds (the arguments, a batch, are ignored, so it can take turns with ``PlainStep``s).
    """

    def __init__(self, size: int, precision: str) -> None:
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
        generator = torch.Generator().manual_seed(0)
        self.left, self.right = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
        self.flops = 2 * size**3

    def __call__(self, *batch) -> float:
        start = time.perf_counter()
        torch.mm(self.left, self.right)
        return time.perf_counter() - start


def training_step_flops(step: PlainStep, images: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of one training step as torch's ``FlopCounterMode`` counts them: the matrix products and
    convolutions of the forward and backward passes (a multiply-add is two FLOPs). Elementwise work
    (BatchNorm, ReLU, the optimiser) is not counted, so FLOPs over a step's seconds is the rate of the
    work a faster kernel could speed up, comparable with :class:`MatrixProductStep`'s.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(images, labels)
    return counter.get_total_flops()


def interleaved_step_seconds(variants: dict[str, PlainStep], batch_size: int | Mapping[str, int], steps: int,
                             warmup: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each variant trains one step in turn, ``warmup + steps`` rounds; the seconds of the timed steps per variant.

    Neighbouring steps of different variants share whatever load the machine is under,
    so their ratios hold where separate trials minutes apart do not. The order within a
    round reverses every round. ``batch_size`` is one size for all or a size per variant.
    Also returns each variant's warm-up seconds (where a compiled model compiles).
    """
    sizes = batch_size if isinstance(batch_size, Mapping) else dict.fromkeys(variants, batch_size)
    batches = {size: synthetic_images(size) for size in set(sizes.values())}
    seconds = {name: [] for name in variants}
    warmup_seconds = dict.fromkeys(variants, 0.0)
    names = list(variants)
    for round_index in range(warmup + steps):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            elapsed = variants[name](*batches[sizes[name]])
            if round_index < warmup:
                warmup_seconds[name] += elapsed
            else:
                seconds[name].append(elapsed)
    return seconds, warmup_seconds


def plain_loop_step_seconds(model_name: str, batch_size: int, steps: int, warmup: int, precision: str,
                            channels_last: bool, **options) -> list[float]:
    """Seconds of each of ``steps`` timed steps of one plain-loop variant, after ``warmup`` untimed ones."""
    seconds, _ = interleaved_step_seconds({"only": PlainStep(model_name, precision, channels_last, **options)},
                                          batch_size, steps, warmup)
    return seconds["only"]


def paired_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Step-by-step ratios of two variants' step seconds, taken in the same rounds."""
    return [top / bottom for top, bottom in zip(numerator, denominator, strict=True)]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """Lower quartile, median and upper quartile."""
    if len(values) < 2:
        return (values[0],) * 3
    low, middle, high = statistics.quantiles(values, n=4)
    return low, middle, high


def median_step_throughput(step_seconds: list[float], batch_size: int) -> float:
    """Images per second at the median step: a burst of other load on the shared machine moves it less than the mean."""
    return batch_size / median(step_seconds)


def median(values: list[float]) -> float:
    return statistics.median(values)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class PlainStepBetweenBatches(pl.Callback):
    """After each Trainer step, one plain-loop step; records both steps' seconds from batch ``warmup`` on.

    The Trainer fetches a batch and runs the batch transform before that batch's
    start, so the span from one batch's start to the next holds one whole Trainer
    step plus the plain step run at its end. The trial runs one batch more than it
    times, to close the last span.

    It also times, inside each Trainer step, the work the plain step shares with it:
    the model's forward pass, the backward pass and the optimiser's update. Each
    side's step less that work is its own work (fetching, augmenting, the loss,
    metrics, logging and hooks for the Trainer; augmenting and the loss for the plain
    loop): a few milliseconds, free of the step-to-step variation of the compute,
    which on a shared machine reaches several per cent of a whole step.
    """

    def __init__(self, plain_step: PlainStep, batch_size: int, warmup: int, steps: int) -> None:
        self.plain_step, self.warmup, self.steps = plain_step, warmup, steps
        self.images, self.labels = synthetic_images(batch_size, seed=1)
        self.starts: list[float] = []
        self.plain_seconds: list[float] = []
        self.plain_compute_seconds: list[float] = []
        self.trainer_compute_seconds: list[float] = []
        self._compute = 0.0
        self._mark = 0.0

    def _start_timing(self, *_) -> None:
        self._mark = time.perf_counter()

    def _stop_timing(self, *_) -> None:
        self._compute += time.perf_counter() - self._mark

    def on_train_start(self, trainer, pl_module):
        pl_module.model.register_forward_pre_hook(self._start_timing)
        pl_module.model.register_forward_hook(self._stop_timing)
        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(self._stop_timing)

    def on_before_backward(self, trainer, pl_module, loss):
        self._start_timing()

    def on_after_backward(self, trainer, pl_module):
        self._stop_timing()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._start_timing()  # the optimiser's update follows; its step post-hook stops the clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._compute = 0.0
        if batch_idx >= self.warmup:
            self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup + self.steps:
            return
        trainer_compute = self._compute
        seconds = self.plain_step(self.images, self.labels)
        if batch_idx >= self.warmup:
            self.plain_seconds.append(seconds)
            self.plain_compute_seconds.append(self.plain_step.compute_seconds)
            self.trainer_compute_seconds.append(trainer_compute)

    @property
    def trainer_seconds(self) -> list[float]:
        spans = [end - start for start, end in zip(self.starts, self.starts[1:])]
        return [span - plain for span, plain in zip(spans, self.plain_seconds, strict=True)]

    @property
    def trainer_own_seconds(self) -> list[float]:
        """Each timed Trainer step less its forward pass, backward pass and update."""
        return [step - compute for step, compute in zip(self.trainer_seconds, self.trainer_compute_seconds, strict=True)]

    @property
    def plain_own_seconds(self) -> list[float]:
        """Each timed plain step less its forward pass, backward pass and update."""
        return [step - compute for step, compute in zip(self.plain_seconds, self.plain_compute_seconds, strict=True)]


class StepTimes(NamedTuple):
    """Seconds of each timed step, the Trainer's and the plain loop's, whole and less their shared compute."""

    trainer: list[float]
    plain: list[float]
    trainer_own: list[float]
    plain_own: list[float]


def trainer_and_plain_step_seconds(model_name: str, batch_size: int, steps: int, warmup: int, precision: str,
                                   logdir: str, input_size: int | None = None) -> StepTimes:
    """Seconds of each timed step of LitClassifier in the Trainer (set up as train.py sets it up) and of the plain loop."""
    images, labels = synthetic_images(batch_size * (steps + warmup + 1) + 1)
    arrays = {"train_images": images, "train_labels": labels, "test_images": images[:1], "test_labels": labels[:1]}
    datamodule = CIFAR10DataModule.from_arrays(arrays, batch_size=batch_size, val_size=1, channels_last=True)
    module = LitClassifier(model_name, lr=0.01, label_smoothing=0.1, channels_last=True, input_size=input_size)
    turns = PlainStepBetweenBatches(PlainStep(model_name, precision, channels_last=True, input_size=input_size),
                                    batch_size, warmup, steps)
    quiet_library_notices()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision=precision, max_epochs=1, limit_val_batches=0,
        logger=pl.loggers.TensorBoardLogger(logdir, name="", default_hp_metric=False), log_every_n_steps=50,
        callbacks=[turns, pl.callbacks.TQDMProgressBar(refresh_rate=20)], enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return StepTimes(turns.trainer_seconds, turns.plain_seconds, turns.trainer_own_seconds, turns.plain_own_seconds)
