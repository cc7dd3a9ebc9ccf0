"""How much memory a training step needs, measured before training, and how much is free.

A batch too large for the machine ends a CPU run with the kernel's out-of-memory
kill (SIGKILL: no message, no checkpoint) at its first step, and a GPU run with
an out-of-memory error. ``train.py`` compares the two figures here first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

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


CGROUP_ROOT = Path("/sys/fs/cgroup")
NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as the largest page-aligned 64-bit number


def cgroup_headroom(membership: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int | None:
    """Bytes the memory limits of this process's cgroup and of its ancestors still allow (a container's or a batch
    job's limit, less what the group uses, its inactive page cache counted as free); None where none is set.

    Linux kills a process of a group that reaches its limit, whatever the machine's
    MemAvailable says. Reads cgroup v2 (``memory.max``) and v1 (``memory.limit_in_bytes``).
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    headrooms = []
    for line in lines:
        fields = line.split(":", 2)  # hierarchy-ID:controllers:path
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":
            mount, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            mount, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = mount / path.lstrip("/")
        if not folder.is_dir():  # in a container the mount is the group's own folder, under a name seen from outside
            folder = mount
        while True:
            headroom = group_headroom(folder, *files)
            if headroom is not None:
                headrooms.append(headroom)
            if folder == mount:
                break
            folder = folder.parent
    return min(headrooms, default=None)


def group_headroom(folder: Path, limit_file: str, usage_file: str, reclaimable_stat: str) -> int | None:
    """One cgroup's limit less its usage, plus its reclaimable page cache; None where it sets no limit."""
    try:
        limit_text = (folder / limit_file).read_text().strip()
        limit = None if limit_text == "max" else int(limit_text)
        if limit is None or limit >= NO_LIMIT:
            return None
        usage = int((folder / usage_file).read_text())
        stats = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if line.strip())
        reclaimable = int(stats.get(reclaimable_stat, 0))
    except (OSError, ValueError):
        return None
    return max(limit - usage + reclaimable, 0)


def free_memory(device: torch.device) -> int | None:
    """Bytes free for a new allocation on ``device``: the GPU's free memory, or on the CPU the smaller of Linux's
    MemAvailable and what the process's memory cgroup allows; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    limits = [value for value in (available, cgroup_headroom()) if value is not None]
    return min(limits, default=None)
