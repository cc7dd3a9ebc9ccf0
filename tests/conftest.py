"""Small CIFAR-10-shaped image folders written by the tests themselves (never the real data)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pytorch_lightning.utilities.model_summary import ModelSummary

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


# pytorch-lightning 2.6 and newer count each layer's FLOPs in the model summary; 2.5 lists the layers only.
SUMMARY_COUNTS_FLOPS = hasattr(ModelSummary, "total_flops")

TINY_RUN = ("--val-size", "20", "--batch-size", "16", "--progress-refresh", "0", "--accelerator", "cpu")


@pytest.fixture(scope="session")
def trained_run(image_folder, tmp_path_factory):
    """One real 2-epoch train.py run of ResNet-50 on the tiny folder (fp32, 48x48, fixed seed), shared by many tests.

    Returns (run folder, completed process).
    """
    from tests.helpers import run_script

    root = tmp_path_factory.mktemp("trained")
    logdir = root / "logs"
    result = run_script(
        "train.py", "--model", "resnet50", "--data-dir", image_folder, "--cache-dir", root / "cache",
        "--logdir", logdir, "--epochs", "2", "--log-every-n-steps", "1", "--precision", "32-true", "--seed", "7",
        "--input-size", "48",
        *TINY_RUN,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return logdir / "version_0", result


@pytest.fixture(scope="session")
def best_checkpoint(trained_run) -> Path:
    run_dir, _ = trained_run
    (path,) = (run_dir / "checkpoints").glob("best-epoch=*.ckpt")
    return path


DETERMINISTIC_RUN = ("--model", "resnet50_seed", "--epochs", "2", "--seed", "5", "--deterministic",
                     "--log-every-n-steps", "1", *TINY_RUN)


@dataclass
class DeterministicRun:
    weights: dict
    losses: list[float]
    test_line: str
    run_dir: Path


def deterministic_train(image_folder, logdir, cache, in_own_process: bool = False) -> DeterministicRun:
    """One ``--deterministic`` train.py run of DETERMINISTIC_RUN: final weights, per-step losses, the printed test line.

    In this process unless ``in_own_process`` (forked: see ``tests.helpers.ForkedProcess``).
    """
    import torch

    from tests.helpers import run_forked, run_in_process, scalar_tags

    arguments = ["--data-dir", image_folder, "--cache-dir", cache, "--logdir", logdir, *DETERMINISTIC_RUN]
    if in_own_process:
        result = run_forked("train.py", *arguments, output_dir=logdir.parent / "output")
    else:
        result = run_in_process("train.py", *arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = logdir / "version_0"
    weights = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return DeterministicRun(weights, scalar_tags(run_dir)["train/loss_step"], result.stdout.strip().splitlines()[-1], run_dir)


@pytest.fixture(scope="session")
def deterministic_run(image_folder, tmp_path_factory) -> DeterministicRun:
    """One uninterrupted 2-epoch deterministic run: the reference for resumed, killed and repeated runs."""
    root = tmp_path_factory.mktemp("deterministic")
    return deterministic_train(image_folder, root / "logs", root / "cache")
