"""Throughput of the training data path against the fastest model's training throughput.

    python bench/data.py

The data path is what feeds every training step: the in-memory DataLoader
(shuffled uint8 batches) followed by the batch transform (random crop, flip,
normalisation, channels-last) on the CPU. It must be at least 20x faster than
the fastest model trains, so that data never limits training. Run by hand.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

import _path  # noqa: F401  (puts the project root on sys.path)
from cli import ArgumentParser, positive_int, resolve_precision, run_main


def data_path_throughput(batch_size: int, images_per_trial: int) -> float:
    from bench.common import synthetic_images
    from datamodules import CIFAR10DataModule

    images, labels = synthetic_images(images_per_trial + 1)
    arrays = {"train_images": images, "train_labels": labels, "test_images": images[:1], "test_labels": labels[:1]}
    datamodule = CIFAR10DataModule.from_arrays(arrays, batch_size=batch_size, val_size=1, channels_last=True)
    datamodule.setup("fit")

    class Training:  # what on_after_batch_transfer asks of the trainer
        training = True
        global_rank = 0
        global_step = 0

    datamodule.trainer = trainer = Training()
    start = time.perf_counter()
    count = 0
    for batch in datamodule.train_dataloader():
        augmented, _ = datamodule.on_after_batch_transfer(batch, 0)
        count += augmented.shape[0]
        trainer.global_step += 1  # each batch draws its crops and flips from its own step's seed
    return count / (time.perf_counter() - start)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per batch, data path and training")
    parser.add_argument("--images", type=positive_int, default=45_000, help="images per data-path trial (one epoch)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="trials of each measurement; medians are printed")
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"],
                        help="models whose training speed the data path must exceed 20x")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and a mistyped flag answer before the slow imports below
    import torch

    from bench.common import check_model_names, markdown_table, median, median_step_throughput, plain_loop_step_seconds

    check_model_names(args.models)
    torch.manual_seed(0)
    precision = resolve_precision("auto", "cpu")
    data = [data_path_throughput(args.batch_size, args.images) for _ in range(args.repeats)]
    models = {
        name: median_step_throughput(
            [seconds for _ in range(args.repeats) for seconds in plain_loop_step_seconds(name, args.batch_size, 6, 2, precision, True)],
            args.batch_size,
        )
        for name in args.models
    }
    fastest = max(models, key=models.get)
    rows = [["data path (loader + augment + normalise)", f"{median(data):.0f}", ""]]
    rows += [[f"training {name} ({precision})", f"{value:.1f}", f"{median(data) / value:.0f}x"] for name, value in models.items()]
    print(f"\nImages/s on the CPU, batch {args.batch_size}: data path, median of {args.repeats} one-epoch trials; "
          f"training, at the median step of {args.repeats} trials of 6 steps\n")
    print(markdown_table(["path", "images/s", "data path / this"], rows))
    ratio = median(data) / models[fastest]
    print(f"\nData path is {ratio:.0f}x the fastest model ({fastest}); required: at least 20x -> {'OK' if ratio >= 20 else 'TOO SLOW'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
