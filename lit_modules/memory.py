"""How much memory a training step needs, measured before training, and how much is free.

A batch too large for the machine ends a CPU run with the kernel's out-of-memory
kill (SIGKILL: no message, no checkpoint) at its first step, and a GPU run with
an out-of-memory error. ``train.py`` compares the two figures here first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

# The element type of what a training step keeps, for each Lightning precision; the mixed ones
# run the convolutions and matrix products in 16 bits (CPU autocast measures bf16 and fp16 alike).
TRUE_DTYPES = {"64-true": torch.float64, "32-true": torch.float32, "bf16-true": torch.bfloat16,
               "16-true": torch.float16}
OPTIMISER_COPIES = 4  # weights, gradients and up to two optimiser buffers (Adam's), each the size of the weights


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes a training step holds: ``fixed`` whatever the batch, ``per_image`` more for each image of it."""

    fixed: int
    per_image: int

    def for_batch(self, batch_size: int) -> int:
        return self.fixed + self.per_image * batch_size

    def largest_batch(self, free: int) -> int:
        return max(0, (free - self.fixed) // self.per_image)


def saved_tensor_bytes(network: nn.Module, images: torch.Tensor, autocast: bool) -> int:
    """The bytes of the distinct tensors, other than ``network``'s parameters, that one forward pass of ``images``
    keeps for the backward pass."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in network.parameters()}
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        network(images)
    return sum(storages.values())


def training_memory(network: nn.Module, precision: str, image_size: int = 32, channels_last: bool = False) -> TrainingMemory:
    """What a training step of ``network`` on ``image_size`` images needs, measured on a copy with two and four images.

    The tensors kept for the backward pass (activations, BatchNorm statistics,
    16-bit copies of the weights under autocast) grow with the batch; weights,
    gradients and optimiser buffers do not. Temporary tensors of the backward
    pass, the data set in memory and the libraries come on top, so the figure is
    a lower bound of the step's peak: a batch refused on it would surely not fit.
    The copy runs on the CPU in training mode and leaves ``network`` (its
    BatchNorm running statistics included) and the random stream as they were.
    """
    dtype = TRUE_DTYPES.get(precision, torch.float32)
    replica = copy.deepcopy(network).to(dtype=dtype).train()
    autocast = precision.endswith("-mixed")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def kept(batch_size: int) -> int:
        images = torch.zeros(batch_size, 3, image_size, image_size, dtype=dtype).to(memory_format=memory_format)
        return saved_tensor_bytes(replica, images, autocast)

    with torch.random.fork_rng(devices=[]):  # a dropout layer's draws would shift the run's random stream
        two, four = kept(2), kept(4)  # BatchNorm in training takes no single image on a network's 1x1 maps
    weights = sum(parameter.numel() * parameter.element_size() for parameter in replica.parameters())
    per_image = max((four - two) // 2, 1)
    return TrainingMemory(fixed=max(two - 2 * per_image, 0) + OPTIMISER_COPIES * weights, per_image=per_image)


def free_memory(device: torch.device) -> int | None:
    """Bytes free for a new allocation on ``device``: the GPU's free memory, or Linux's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
