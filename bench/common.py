"""Shared pieces of the benchmarks: synthetic in-memory data and a plain PyTorch training loop."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from datamodules.transforms import normalize, train_augment
from lit_modules.classifier import split_decay_groups
from models import InputResize, get_model


def synthetic_images(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 CIFAR-shaped images and labels; speed does not depend on the pixel values."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 10, (count,), generator=generator)


def autocast_for(precision: str):
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def plain_loop_throughput(model_name: str, batch_size: int, steps: int, warmup: int, precision: str,
                          channels_last: bool, model_options: dict | None = None, compile: bool = False,
                          timings: dict | None = None, input_size: int | None = None) -> float:
    """Training images per second of a hand-written loop: augment, normalise, forward, backward, SGD step.

    With ``compile`` the model goes through ``torch.compile`` first; the compilation
    happens in the untimed warm-up steps, whose seconds land in ``timings["warmup_seconds"]``.
    With ``input_size`` each 32x32 batch is resized to that size before the model, as
    ``LitClassifier(input_size=...)`` does.
    """
    torch.manual_seed(0)
    model = get_model(model_name, **(model_options or {})).train()
    resize = InputResize(input_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    optimizer = torch.optim.SGD(split_decay_groups(model, 5e-4), lr=0.01, momentum=0.9, nesterov=True)
    images, labels = synthetic_images(batch_size * (steps + warmup))
    start = began = time.perf_counter()
    for step in range(steps + warmup):
        if step == warmup:
            start = time.perf_counter()
            if timings is not None:
                timings["warmup_seconds"] = start - began
        batch = normalize(train_augment(images[step * batch_size : (step + 1) * batch_size]))
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        target = labels[step * batch_size : (step + 1) * batch_size]
        with autocast_for(precision):
            loss = F.cross_entropy(model(resize(batch)), target, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - start)


def median(values: list[float]) -> float:
    return statistics.median(values)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
