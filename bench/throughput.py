"""Training throughput: the Trainer against a plain PyTorch loop, and the speed levers, side by side.

    python bench/throughput.py                       # resnet50 and vgg16, bf16, batch 128
    python bench/throughput.py --models vgg16 --repeats 5
    python bench/throughput.py --compile             # also torch.compile against eager
    python bench/throughput.py --input-size 48       # everything at train.py's default size for resnet50
    python bench/throughput.py --models resnet50 --size-sweep 32 40 48 56 64

For each model, in one process, alternating trials:
  (a) LitClassifier inside the Lightning Trainer, as train.py runs it (logger,
      progress bar, checkpoint-free), and (b) a hand-written loop over the same
      model, batch, precision, optimiser and batch augmentation;
  then, in the plain loop, fp32 against bf16 and channels-last on against off,
  and with ``--compile`` the compiled model against the eager one, with the
  seconds the first compilation took (later ones hit the compile cache);
  with ``--size-sweep``, the plain loop at each input size and its cost
  relative to the first size (what a higher ``--input-size`` costs per epoch).
Prints medians (images/s) and ratios as Markdown tables. Data is synthetic
uint8 in memory (speed does not depend on pixel values). Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pytorch_lightning as pl

import _path  # noqa: F401  (puts the project root on sys.path)
from bench.common import markdown_table, median, plain_loop_throughput, synthetic_images
from cli import resolve_precision
from datamodules import CIFAR10DataModule
from datamodules.cifar10 import IMAGE_SIZE
from lit_modules import LitClassifier


class StepTimer(pl.Callback):
    """Time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0
        self.images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.images += batch[0].shape[0]
            self.end = time.perf_counter()


def trainer_throughput(model_name: str, batch_size: int, steps: int, warmup: int, precision: str, logdir: str,
                       input_size: int | None = None) -> float:
    images, labels = synthetic_images(batch_size * (steps + warmup) + 1)
    arrays = {"train_images": images, "train_labels": labels, "test_images": images[:1], "test_labels": labels[:1]}
    datamodule = CIFAR10DataModule.from_arrays(arrays, batch_size=batch_size, val_size=1, channels_last=True)
    module = LitClassifier(model_name, lr=0.01, label_smoothing=0.1, channels_last=True, input_size=input_size)
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision=precision, max_epochs=1, limit_val_batches=0,
        logger=pl.loggers.TensorBoardLogger(logdir, name="", default_hp_metric=False), log_every_n_steps=50,
        callbacks=[timer, pl.callbacks.TQDMProgressBar(refresh_rate=20)], enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.images / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per trial")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each trial")
    parser.add_argument("--repeats", type=int, default=3, help="alternated trials of each variant")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd model (minutes more)")
    parser.add_argument("--input-size", type=int, default=None, help="resize batches to this size (default: 32, as stored)")
    parser.add_argument("--size-sweep", type=int, nargs="+", default=None, metavar="SIZE",
                        help="instead: the plain loop's bf16 images/s at each input size, alternated")
    args = parser.parse_args()
    precision = resolve_precision("auto", "cpu")
    if args.size_sweep:
        size_sweep(args, precision)
        return
    trial = dict(batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, input_size=args.input_size)

    overhead_rows, lever_rows, compile_rows = [], [], []
    with tempfile.TemporaryDirectory() as logdir:
        for model in args.models:
            runs = {"trainer": [], "plain": [], "fp32": [], "cl_off": []}
            compile_seconds = []
            if args.compile:
                runs["compiled"] = []
            for _ in range(args.repeats):
                runs["trainer"].append(trainer_throughput(model, precision=precision, logdir=logdir, **trial))
                runs["plain"].append(plain_loop_throughput(model, precision=precision, channels_last=True, **trial))
                runs["fp32"].append(plain_loop_throughput(model, precision="32-true", channels_last=True, **trial))
                runs["cl_off"].append(plain_loop_throughput(model, precision=precision, channels_last=False, **trial))
                if args.compile:
                    timings = {}
                    runs["compiled"].append(plain_loop_throughput(model, precision=precision, channels_last=True,
                                                                  compile=True, timings=timings, **trial))
                    compile_seconds.append(timings["warmup_seconds"])
            m = {name: median(values) for name, values in runs.items()}
            overhead_rows.append([model, precision, str(args.batch_size), f"{m['trainer']:.1f}", f"{m['plain']:.1f}",
                                  f"{m['trainer'] / m['plain']:.3f}"])
            lever_rows.append([model, f"{m['fp32']:.1f}", f"{m['plain']:.1f}", f"{m['plain'] / m['fp32']:.2f}",
                               f"{m['cl_off']:.1f}", f"{m['plain'] / m['cl_off']:.2f}"])
            if args.compile:
                compile_rows.append([model, f"{m['plain']:.1f}", f"{m['compiled']:.1f}", f"{m['compiled'] / m['plain']:.2f}",
                                     f"{compile_seconds[0]:.0f}", f"{median(compile_seconds[1:] or compile_seconds):.0f}"])
            print(f"{model}: " + ", ".join(f"{k} {[round(v, 1) for v in vs]}" for k, vs in runs.items()), flush=True)

    size = args.input_size or IMAGE_SIZE
    print(f"\nTraining throughput, images/s (median of {args.repeats} alternated trials of {args.steps} steps; "
          f"input {size}x{size}; CPU)\n")
    print(markdown_table(["model", "precision", "batch", "(a) Trainer", "(b) plain loop", "ratio a/b"], overhead_rows))
    print()
    print(markdown_table(["model", "fp32", "bf16", "bf16/fp32", "bf16 channels-first", "channels-last/first"], lever_rows))
    if compile_rows:
        print()
        print(markdown_table(["model", "eager", "compiled", "compiled/eager", f"first warm-up s ({args.warmup} steps)",
                              "later warm-ups s"], compile_rows))


def size_sweep(args, precision: str) -> None:
    rows = []
    for model in args.models:
        runs = {size: [] for size in args.size_sweep}
        for _ in range(args.repeats):
            for size in args.size_sweep:
                runs[size].append(plain_loop_throughput(model, batch_size=args.batch_size, steps=args.steps,
                                                        warmup=args.warmup, precision=precision, channels_last=True,
                                                        input_size=size))
        print(f"{model}: " + ", ".join(f"{k} {[round(v, 1) for v in vs]}" for k, vs in runs.items()), flush=True)
        base = median(runs[args.size_sweep[0]])
        for size in args.size_sweep:
            rows.append([model, f"{size}x{size}", f"{median(runs[size]):.1f}", f"{base / median(runs[size]):.2f}"])
    print(f"\nPlain-loop training throughput by input size, images/s ({precision}, channels-last, batch "
          f"{args.batch_size}; median of {args.repeats} alternated trials of {args.steps} steps; CPU)\n")
    print(markdown_table(["model", "input", "images/s", f"time per image vs {args.size_sweep[0]}x{args.size_sweep[0]}"], rows))


if __name__ == "__main__":
    main()
