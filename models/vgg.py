"""VGG-16 with BatchNorm for CIFAR-10, built from a configuration table.

The convolutions keep their bias, as in the paper and torchvision's vgg16_bn
(redundant before BatchNorm, 4,224 parameters in all).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015 (arXiv:1409.1556), configuration D; BatchNorm after
every convolution (Ioffe & Szegedy 2015) as is usual when training from scratch.

The paper's three 4096-wide fully connected layers are sized for 7x7 maps of
224x224 inputs and hold 90% of its parameters; on 32x32 inputs the features are
1x1 after five max-pools, so the classifier here is adaptive average pooling to
1x1 followed by one linear layer. It accepts any input size of at least 32x32.
"""

from __future__ import annotations

from typing import Sequence, Union

from torch import Tensor, nn

from models.layers import Conv2d
from models.registry import register_model

# An int is a 3x3 convolution with that many output channels (+ BatchNorm + ReLU);
# "M" is a 2x2 max-pool with stride 2.
CONFIGS: dict[str, list[Union[int, str]]] = {
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def make_features(config: Sequence[Union[int, str]]) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [
                Conv2d(in_channels, item, kernel_size=3, padding=1),
                nn.BatchNorm2d(item),
                nn.ReLU(inplace=True),
            ]
            in_channels = item
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Convolutional features from a config table, global average pooling, a linear classifier."""

    def __init__(self, config: Sequence[Union[int, str]], num_classes: int = 10) -> None:
        super().__init__()
        self.features = make_features(config)
        feature_channels = [item for item in config if item != "M"][-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(feature_channels, num_classes)
        # Each max-pool halves the map, rounding down: a smaller image has no pixel left before the last one.
        self.min_input_size = 2 ** sum(item == "M" for item in config)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model
def vgg16(num_classes: int = 10) -> VGG:
    """VGG-16 (configuration D) with BatchNorm: 13 convolutions, 14,723,136 conv+BN parameters."""
    return VGG(CONFIGS["D"], num_classes=num_classes)
