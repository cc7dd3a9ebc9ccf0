"""Small CIFAR-10-shaped image folders written by the tests themselves (never the real data)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datamodules.cifar10 import CIFAR10_CLASSES  # noqa: E402


def write_image_folder(root: Path, train_per_class: int = 8, test_per_class: int = 3, seed: int = 0) -> Path:
    """``root/train/<class>/`` and ``root/test/<class>/`` of random 32x32 images, PNG and JPEG.

    Each class has its own tint, so a model can learn something in a few steps.
    """
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CIFAR10_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                pixels[..., label % 3] = 20 * label
                suffix = ".jpg" if index % 2 else ".png"
                Image.fromarray(pixels).save(folder / f"{index:04d}{suffix}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A valid tiny image folder: 80 training and 30 test images. Treat it as read-only."""
    return write_image_folder(tmp_path_factory.mktemp("cifar_tiny"))


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"
