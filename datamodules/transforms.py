"""Whole-batch augmentation and normalisation on uint8 image tensors.

Every function takes a ``(N, 3, H, W)`` batch and works with tensor operations
on whatever device the batch is on, so a GPU run augments on the GPU and no
image goes through PIL after it has been decoded once. The few random numbers a
batch needs are drawn from ``generator`` (on its own device, usually the CPU)
and then moved to the batch's device, so a seeded CPU generator gives the same
augmentation on every device, and its state can be saved in a checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CROP_PADDING = 4  # the seed's training crop: a 32x32 window of the image zero-padded by 4 pixels each side
# The mean colour as uint8 pixel values: what cutout fills with, and what normalize maps to about zero.
CIFAR10_MEAN_UINT8 = tuple(round(255 * m) for m in CIFAR10_MEAN)


def _randint(high: int, size: tuple, generator: torch.Generator | None) -> Tensor:
    return torch.randint(0, high, size, generator=generator, device=generator.device if generator else "cpu")


def _rand(size: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(size, generator=generator, device=generator.device if generator else "cpu")


def _channel_stats(images: Tensor, mean, std) -> tuple[Tensor, Tensor]:
    """``mean`` and ``std`` as ``(1, C, 1, 1)`` tensors on the batch's device."""
    return (torch.tensor(mean, device=images.device).view(1, -1, 1, 1),
            torch.tensor(std, device=images.device).view(1, -1, 1, 1))


def denormalize(images: Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> Tensor:
    """Inverse of :func:`normalize`, to [0, 1] floats, for showing images."""
    mean_t, std_t = _channel_stats(images, mean, std)
    return (images.float() * std_t + mean_t).clamp_(0, 1)


def normalize(images: Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> Tensor:
    """uint8 ``(N, 3, H, W)`` in [0, 255] -> float32, scaled to [0, 1], minus ``mean``, over ``std``."""
    mean_t, std_t = _channel_stats(images, mean, std)
    return (images.float().div_(255.0) - mean_t).div_(std_t)


def random_crop(images: Tensor, padding: int = CROP_PADDING, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad each side by ``padding`` and take one random HxW window per image.

    Equivalent to torchvision's ``RandomCrop(size, padding)`` applied image by
    image, done as one gather over the whole batch.
    """
    n, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    offsets = _randint(2 * padding + 1, (2, n), generator).to(images.device)
    rows = (offsets[0, :, None] + torch.arange(height, device=images.device)).view(n, 1, height, 1)
    cols = (offsets[1, :, None] + torch.arange(width, device=images.device)).view(n, 1, 1, width)
    batch_index = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    channel_index = torch.arange(channels, device=images.device).view(1, channels, 1, 1)
    return padded[batch_index, channel_index, rows, cols]


def random_horizontal_flip(images: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image left-right with probability ``p``."""
    flip = (_rand(images.shape[0], generator) < p).to(images.device)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def cutout(images: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Fill one ``size`` x ``size`` square per image with the mean colour.

    DeVries & Taylor, "Improved Regularization of Convolutional Neural Networks
    with Cutout", 2017 (arXiv:1708.04552): the square's centre is uniform over
    the image, so near a border only part of the square lies inside it. The fill
    is the CIFAR-10 mean in uint8, which :func:`normalize` maps to about zero,
    as the paper's zeroing of normalised images does.
    """
    if size == 0:
        return images
    n, _, height, width = images.shape
    top = _randint(height, (n,), generator).to(images.device) - size // 2
    left = _randint(width, (n,), generator).to(images.device) - size // 2
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + size).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + size).view(n, 1, 1)))
    fill = torch.tensor(CIFAR10_MEAN_UINT8, dtype=images.dtype, device=images.device)
    return torch.where(inside.unsqueeze(1), fill.view(1, -1, 1, 1), images)


def train_augment(images: Tensor, generator: torch.Generator | None = None, cutout_size: int = 0) -> Tensor:
    """The seed's training augmentation (4-pixel-padded random crop, random horizontal flip), then optional cutout."""
    images = random_horizontal_flip(random_crop(images, CROP_PADDING, generator), 0.5, generator)
    return cutout(images, cutout_size, generator)
