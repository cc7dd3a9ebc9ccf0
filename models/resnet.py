"""Bottleneck ResNets for CIFAR-10, built by hand.

He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385), Table 1, 50-layer column.

Where the stride sits: in a downsampling Bottleneck the stride 2 is on the 3x3
convolution, not on the first 1x1 as the paper's Figure 5 reads literally
("ResNet v1.5", as in torchvision). A strided 1x1 convolution simply drops
three out of every four positions before any spatial filter sees them; on the
3x3 every input position still contributes. Parameter counts are identical.

Stems: ``stem="imagenet"`` is the paper's 7x7/2 convolution and 3x3/2 max-pool,
which cut a 32x32 CIFAR image to 8x8 before the first stage, so the last stage
runs on 1x1 maps. ``stem="cifar"`` is a 3x3/1 convolution without max-pool, the
usual CIFAR adaptation: every stage sees 4x larger maps per side (16x the
compute) and the network is far more accurate on 32x32 images.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from models.layers import Conv2d
from models.registry import register_model

STEMS = ("imagenet", "cifar")


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand by ``expansion``, each with BatchNorm.

    The shortcut is the identity unless the block changes the shape (stride or
    channel count); then it is a 1x1 projection with BatchNorm (option B of the paper).
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A stem, stages of Bottleneck blocks, global average pooling and a linear classifier.

    Args:
        blocks_per_stage: number of blocks in each stage, e.g. ``(3, 4, 6, 3)``.
        widths: bottleneck width of each stage (outputs are ``width * 4``).
        num_classes: size of the classifier output.
        stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool) or ``"cifar"`` (3x3/1 conv).
        downsample_at: ``"first"`` puts the stride-2 block first in stages 2 onwards
            (the paper); ``"last"`` puts it last, as the course seed did.
        zero_init_residual: start every block's last BatchNorm scale at zero, so each
            residual branch begins as the identity (Goyal et al. 2017, arXiv:1706.02677).
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        stem: str = "imagenet",
        downsample_at: str = "first",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
        if downsample_at not in ("first", "last"):
            raise ValueError(f"downsample_at must be 'first' or 'last', got {downsample_at!r}")
        stem_channels = 64
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)

        self.in_channels = stem_channels
        self.stages = nn.ModuleList(
            self._make_layer(width, num_blocks, stride=1 if index == 0 else 2, downsample_at=downsample_at)
            for index, (width, num_blocks) in enumerate(zip(widths, blocks_per_stage))
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.in_channels, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, width: int, num_blocks: int, stride: int, downsample_at: str) -> nn.Sequential:
        strides = [1] * num_blocks
        strides[0 if downsample_at == "first" else -1] = stride
        blocks = []
        for block_stride in strides:
            blocks.append(Bottleneck(self.in_channels, width, block_stride))
            self.in_channels = width * Bottleneck.expansion
        return nn.Sequential(*blocks)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The output of every stage, first to last."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)[-1]
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def resnet50(num_classes: int = 10, stem: str = "imagenet", zero_init_residual: bool = False) -> ResNet:
    """ResNet-50 (He et al. 2015, Table 1): stages of 3, 4, 6, 3 bottlenecks, 2048 features."""
    return ResNet((3, 4, 6, 3), num_classes=num_classes, stem=stem, zero_init_residual=zero_init_residual)


@register_model
def resnet50_seed(num_classes: int = 10, stem: str = "imagenet", zero_init_residual: bool = False) -> ResNet:
    """The course seed's shorter network: ResNet-50's first three stages (3, 4, 6 blocks).

    Stages 2 and 3 downsample in their last block instead of their first, and the
    network ends at 1024 channels: the fourth stage (3 blocks, 2048 channels) is missing.
    """
    return ResNet(
        (3, 4, 6),
        widths=(64, 128, 256),
        num_classes=num_classes,
        stem=stem,
        downsample_at="last",
        zero_init_residual=zero_init_residual,
    )
