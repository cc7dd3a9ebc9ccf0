"""CIFAR-10 data: the LightningDataModule, batch transforms and the user-facing data error."""

from datamodules.cifar10 import CIFAR10_CLASSES, CIFAR10DataModule, load_cifar10
from datamodules.errors import DataError
from datamodules.transforms import CIFAR10_MEAN, CIFAR10_STD, normalize, train_augment

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10DataModule",
    "DataError",
    "load_cifar10",
    "normalize",
    "train_augment",
]
