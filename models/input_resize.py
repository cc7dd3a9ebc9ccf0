"""Resizing of input batches to the resolution a network is trained at."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class InputResize(nn.Module):
    """Bilinearly resize ``(N, C, H, W)`` batches to ``size x size``; ``size=None`` passes them through.

    CIFAR-10 images are 32x32. A network with the ImageNet stem (stride 4
    before its first stage) then works on 8x8 maps in stage 1 and 1x1 in stage
    4; upsampling the input to 48x48 gives it 12x12 maps at about 1.4x the
    bf16 CPU cost of 32x32 for ResNet-50, not the 2.25x of the pixel count,
    because small maps use the hardware poorly (``bench/throughput.py
    --size-sweep``, RESULTS.md). A CPU at 32-bit pays 2 to 2.5x, so there
    ``train.py`` keeps 32x32. The resize holds no parameters, so it is part of
    the classifier's hyperparameters, not its weights, and is exported together
    with the network.
    """

    def __init__(self, size: int | None = None) -> None:
        super().__init__()
        if size is not None and size < 1:
            raise ValueError(f"input size must be positive, got {size}")
        self.size = size

    def forward(self, images: Tensor) -> Tensor:
        if self.size is None or tuple(images.shape[-2:]) == (self.size, self.size):
            return images
        # interpolate keeps a channels-last batch channels-last, the layout the weights expect
        return F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"
