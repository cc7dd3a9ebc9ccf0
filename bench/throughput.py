"""Training throughput: the Trainer against a plain PyTorch loop, and the speed levers, side by side.

    python bench/throughput.py                       # resnet50 and vgg16, train.py's default precision, batch 128
    python bench/throughput.py --models vgg16 --repeats 5
    python bench/throughput.py --compile             # also torch.compile against eager
    python bench/throughput.py --input-size 48       # everything at the size train.py gives resnet50 in bf16
    python bench/throughput.py --models resnet50 --size-sweep 32 40 48 56 64
    python bench/throughput.py --models resnet50 --input-size 48 --batch-sweep 128 256 512
    python bench/throughput.py --flop-rate           # how close a training step comes to a large matrix product

For each model, in one process:
  (a) LitClassifier inside the Lightning Trainer, as train.py runs it (logger,
      progress bar, checkpoint-free), against (b) a hand-written loop over the
      same model, batch, precision, optimiser and batch augmentation. The two
      take turns step by step: after each Trainer step a callback trains one
      plain-loop step on its own copy of the model. A Trainer step is the time
      from the start of one batch to the start of the next (fetch, batch
      transform, forward, backward, optimiser step, logging and progress-bar
      hooks) less the plain step inside it. ``--repeats`` fresh Trainers.
      Whole steps of two models differ by several per cent from step to step on
      a shared machine, so the script also times the forward pass, backward pass
      and optimiser update inside both steps: what remains of each step (its own
      work) is a few milliseconds, free of the compute's variation, and the
      Trainer's cost is the difference between the two as a share of the plain step.
  Then plain-loop variants, again step by step in turn: fp32 against bf16 (where
  the CPU has bf16 instructions, even where ``--precision auto`` trains in fp32
  because bf16 is slower there; without them the bf16 cells say so, unless
  ``--emulated-bf16`` times the emulation), and
  at that default precision channels-last on against off, an exponential moving
  average of the weights updated every step (``--ema-decay``) against none,
  convolutions on tiny maps as one matrix product
  (``models.layers.Conv2d``, always on in train.py) against oneDNN's convolution for
  every map, 1x1 convolutions as matrix products (also always on) against oneDNN's,
  the weight gradients of convolutions with small output maps as one matrix product
  (also always on) against oneDNN's weight-gradient kernel, and with ``--compile`` the compiled model against
  the eager one, with the seconds of the warm-up steps where it compiles; with
  ``--size-sweep``, the plain loop at each input size and its cost relative to
  the first size (what a higher ``--input-size`` costs per epoch); with
  ``--batch-sweep``, the plain loop at each batch size and its images/s relative to
  the first (whether a larger ``--batch-size`` shortens an epoch on this CPU); with
  ``--flop-rate``, the plain loop's FLOP/s (torch's FLOP counter over one step:
  the forward and backward matrix products and convolutions) against that of one
  large matrix product at the same precision, taking turns: the share of the CPU's
  best matrix-product rate that a training step reaches, and so how much any kernel
  work could still gain.
The machine is shared, and other load can slow everything 2x for minutes; taking
turns step by step puts both sides of a ratio under the same load. Speeds are
images/s at a variant's median step; ratios are the median of the step-by-step
ratios, with their quartiles. Prints Markdown tables. Data is synthetic uint8 in
memory (speed does not depend on pixel values). Run by hand, not in CI.
"""

from __future__ import annotations

import sys
import tempfile
from typing import Sequence

import _path  # noqa: F401  (puts the project root on sys.path)
from cli import ArgumentParser, cpu_supports_bf16, non_negative_int, positive_int, resolve_precision, run_main

DEFAULT_MATRIX_SIZE = 2048
NO_NATIVE_BF16 = "no native bf16"  # the bf16 cell where this CPU has no bf16 instructions (auto picks fp32)


def ratio_cells(variant: list[float], reference: list[float]) -> list[str]:
    """The speed of ``variant`` relative to ``reference``: the median and quartiles of their step-by-step ratios.

    Both are step seconds of the same rounds; a step's speed ratio is the reference's
    seconds over the variant's (above 1 when the variant is faster).
    """
    from bench.common import paired_ratios, quartiles

    low, middle, high = quartiles(paired_ratios(reference, variant))
    return [f"{middle:.3f}", f"{low:.3f}-{high:.3f}"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"], help="models to time, one after another")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per training step")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per Trainer; the levers take steps x repeats rounds")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps (rounds) before timing starts")
    parser.add_argument("--repeats", type=positive_int, default=3, help="fresh Trainers, each for --steps timed steps")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd model (minutes more)")
    parser.add_argument("--emulated-bf16", action="store_true",
                        help="on a CPU without bf16 instructions, time bf16 all the same (emulated: many times slower)")
    parser.add_argument("--input-size", type=positive_int, default=None, help="resize batches to this size (default: 32, as stored)")
    sweeps = parser.add_mutually_exclusive_group()
    sweeps.add_argument("--size-sweep", type=positive_int, nargs="+", default=None, metavar="SIZE",
                        help="instead: the plain loop's images/s (default precision) at each input size, taking turns step by step")
    sweeps.add_argument("--batch-sweep", type=positive_int, nargs="+", default=None, metavar="BATCH",
                        help="instead: the plain loop's images/s (default precision) at each batch size, taking turns step by step")
    sweeps.add_argument("--flop-rate", action="store_true",
                        help="instead: the plain loop's FLOP/s (default precision) against a large matrix product's, "
                             "taking turns step by step")
    parser.add_argument("--matrix-size", type=positive_int, default=None, metavar="N",
                        help="with --flop-rate: the reference product multiplies two NxN matrices "
                             f"(default: {DEFAULT_MATRIX_SIZE})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and a mistyped flag answer before the slow imports below
    if args.matrix_size is not None and not args.flop_rate:
        parser.error("--matrix-size: only with --flop-rate")
    from bench.common import (PlainStep, check_model_names, interleaved_step_seconds, markdown_table, median,
                              median_step_throughput, trainer_and_plain_step_seconds)
    from datamodules.cifar10 import IMAGE_SIZE

    check_model_names(args.models)
    precision = resolve_precision("auto", "cpu")
    native_bf16 = cpu_supports_bf16()  # timed beside fp32 even where auto picks fp32, which shows why it does
    default = "bf16" if precision == "bf16-mixed" else "fp32"  # the variant at train.py's default precision
    if args.size_sweep:
        size_sweep(args, precision)
        return 0
    if args.batch_sweep:
        batch_sweep(args, precision)
        return 0
    if args.flop_rate:
        flop_rate(args, precision)
        return 0
    trial = dict(batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, input_size=args.input_size)

    overhead_rows, lever_rows, compile_rows = [], [], []
    with tempfile.TemporaryDirectory() as logdir:
        for model in args.models:
            trainer_seconds, plain_seconds, trainer_own, plain_own = [], [], [], []
            for _ in range(args.repeats):
                times = trainer_and_plain_step_seconds(model, precision=precision, logdir=logdir, **trial)
                trainer_seconds += times.trainer
                plain_seconds += times.plain
                trainer_own += times.trainer_own
                plain_own += times.plain_own
            # The Trainer's cost step by step: its own work beyond the plain loop's, as a share of the plain step.
            costs = [(own_a - own_b) / step_b
                     for own_a, own_b, step_b in zip(trainer_own, plain_own, plain_seconds, strict=True)]
            overhead_rows.append([model, precision, str(args.batch_size),
                                  f"{median_step_throughput(trainer_seconds, args.batch_size):.1f}",
                                  f"{median_step_throughput(plain_seconds, args.batch_size):.1f}",
                                  *ratio_cells(trainer_seconds, plain_seconds),
                                  f"{median(trainer_own) * 1000:.1f}", f"{median(plain_own) * 1000:.1f}",
                                  f"{median(costs):.2%}"])

            # The other levers are measured at train.py's default precision; bf16 where it is native or asked for.
            variants = {"fp32": PlainStep(model, "32-true", channels_last=True, input_size=args.input_size)}
            if native_bf16 or args.emulated_bf16:
                variants["bf16"] = PlainStep(model, "bf16-mixed", channels_last=True, input_size=args.input_size)
            variants["channels-first"] = PlainStep(model, precision, channels_last=False, input_size=args.input_size)
            variants["EMA"] = PlainStep(model, precision, channels_last=True, input_size=args.input_size,
                                        ema_decay=0.999)
            variants["conv tiny maps"] = PlainStep(model, precision, channels_last=True, input_size=args.input_size,
                                                   dense_tiny_maps=False)
            variants["conv 1x1"] = PlainStep(model, precision, channels_last=True, input_size=args.input_size,
                                             pointwise_as_matrix=False)
            variants["conv weight grads"] = PlainStep(model, precision, channels_last=True,
                                                      input_size=args.input_size, weight_grad_as_matrix=False)
            if args.compile:
                variants["compiled"] = PlainStep(model, precision, channels_last=True, input_size=args.input_size,
                                                 compile=True)
            seconds, warmup_seconds = interleaved_step_seconds(variants, args.batch_size, args.steps * args.repeats,
                                                               args.warmup)
            speed = {name: median_step_throughput(steps, args.batch_size) for name, steps in seconds.items()}
            emulated = "" if native_bf16 else " (emulated)"
            bf16_cells = ([f"{speed['bf16']:.1f}{emulated}", *ratio_cells(seconds["bf16"], seconds["fp32"])]
                          if "bf16" in seconds else [NO_NATIVE_BF16, "-", "-"])
            lever_rows.append([model, f"{speed['fp32']:.1f}", *bf16_cells,
                               f"{speed['channels-first']:.1f}", *ratio_cells(seconds[default], seconds["channels-first"]),
                               f"{speed['EMA']:.1f}", *ratio_cells(seconds["EMA"], seconds[default]),
                               f"{speed['conv tiny maps']:.1f}", *ratio_cells(seconds[default], seconds["conv tiny maps"]),
                               f"{speed['conv 1x1']:.1f}", *ratio_cells(seconds[default], seconds["conv 1x1"]),
                               f"{speed['conv weight grads']:.1f}",
                               *ratio_cells(seconds[default], seconds["conv weight grads"])])
            if args.compile:
                compile_rows.append([model, f"{speed[default]:.1f}", f"{speed['compiled']:.1f}",
                                     *ratio_cells(seconds["compiled"], seconds[default]),
                                     f"{warmup_seconds['compiled']:.0f}", f"{warmup_seconds[default]:.0f}"])
            print(f"{model} done", flush=True)

    size = args.input_size or IMAGE_SIZE
    print(f"\nTraining throughput, images/s at the median step (input {size}x{size}; CPU). Trainer against plain loop: "
          f"{args.repeats} Trainers of {args.steps} steps, each followed by a plain step; the levers: "
          f"{args.steps * args.repeats} rounds of one step of each variant. Ratios: median of the step-by-step ratios "
          "(quartiles beside it). Own work: each step less the model's forward pass, backward pass and optimiser "
          "update, timed inside both (ms at the median step); the Trainer's cost: its own work less the plain loop's, "
          "as a share of the plain step (median over the steps).\n")
    print(markdown_table(["model", "precision", "batch", "(a) Trainer", "(b) plain loop", "ratio a/b", "quartiles",
                          "(a) own ms", "(b) own ms", "Trainer's cost"], overhead_rows))
    print()
    print(f"Speed levers; channels-first, EMA, tiny maps, 1x1 convolutions, weight gradients and compiled at the "
          f"default precision "
          f"here, {precision}:\n")
    print(markdown_table(["model", "fp32", "bf16", "bf16/fp32", "quartiles", "channels-first",
                          "channels-last/first", "quartiles", "with EMA", "with/without EMA", "quartiles",
                          "tiny maps as conv", "matrix/conv", "quartiles", "1x1 as conv", "1x1 matrix/conv",
                          "quartiles", "weight grads as conv", "weight grads matrix/conv", "quartiles"],
                         lever_rows))
    if compile_rows:
        print()
        print(markdown_table(["model", "eager", "compiled", "compiled/eager", "quartiles",
                              f"compiled warm-up s ({args.warmup} steps)", f"eager warm-up s ({args.warmup} steps)"],
                             compile_rows))
    return 0


def size_sweep(args, precision: str) -> None:
    from bench.common import PlainStep, interleaved_step_seconds, markdown_table, median_step_throughput

    rows = []
    for model in args.models:
        variants = {size: PlainStep(model, precision, channels_last=True, input_size=size) for size in args.size_sweep}
        seconds, _ = interleaved_step_seconds(variants, args.batch_size, args.steps * args.repeats, args.warmup)
        base = args.size_sweep[0]
        for size in args.size_sweep:  # time per image at SIZE over that at BASE: BASE's speed relative to SIZE's
            rows.append([model, f"{size}x{size}", f"{median_step_throughput(seconds[size], args.batch_size):.1f}",
                         *ratio_cells(seconds[base], seconds[size])])
        print(f"{model} done", flush=True)
    print(f"\nPlain-loop training throughput by input size, images/s at the median step ({precision}, channels-last, "
          f"batch {args.batch_size}; {args.steps * args.repeats} rounds of one step at each size; CPU)\n")
    print(markdown_table(["model", "input", "images/s", f"time per image vs {args.size_sweep[0]}x{args.size_sweep[0]}",
                          "quartiles"], rows))


def batch_sweep(args, precision: str) -> None:
    from bench.common import PlainStep, interleaved_step_seconds, markdown_table, median_step_throughput
    from datamodules.cifar10 import IMAGE_SIZE

    batches = list(dict.fromkeys(args.batch_sweep))
    rows = []
    for model in args.models:
        variants = {batch: PlainStep(model, precision, channels_last=True, input_size=args.input_size) for batch in batches}
        seconds, _ = interleaved_step_seconds(variants, {batch: batch for batch in batches}, args.steps * args.repeats,
                                              args.warmup)
        per_image = {batch: [step / batch for step in seconds[batch]] for batch in batches}
        for batch in batches:  # BATCH's speed per image relative to the first batch size's, round by round
            rows.append([model, str(batch), f"{median_step_throughput(seconds[batch], batch):.1f}",
                         *ratio_cells(per_image[batch], per_image[batches[0]])])
        print(f"{model} done", flush=True)
    size = args.input_size or IMAGE_SIZE
    print(f"\nPlain-loop training throughput by batch size, images/s at the median step ({precision}, channels-last, "
          f"input {size}x{size}; {args.steps * args.repeats} rounds of one step at each batch size; CPU)\n")
    print(markdown_table(["model", "batch", "images/s", f"images/s vs batch {batches[0]}", "quartiles"], rows))


def flop_rate(args, precision: str) -> None:
    from bench.common import (MatrixProductStep, PlainStep, interleaved_step_seconds, markdown_table, median,
                              median_step_throughput, paired_ratios, quartiles, synthetic_images, training_step_flops)
    from datamodules.cifar10 import IMAGE_SIZE

    n = args.matrix_size or DEFAULT_MATRIX_SIZE
    rows = []
    for model in args.models:
        step = PlainStep(model, precision, channels_last=True, input_size=args.input_size)
        step_flops = training_step_flops(step, *synthetic_images(args.batch_size))
        product = MatrixProductStep(n, precision)
        seconds, _ = interleaved_step_seconds({"step": step, "product": product}, args.batch_size,
                                              args.steps * args.repeats, args.warmup)
        # the step's FLOP/s over the product's, round by round: the FLOP ratio times the seconds' inverse ratio
        shares = [step_flops / product.flops * ratio for ratio in paired_ratios(seconds["product"], seconds["step"])]
        low, middle, high = quartiles(shares)
        rows.append([model, f"{median_step_throughput(seconds['step'], args.batch_size):.1f}",
                     f"{step_flops / args.batch_size / 1e9:.3f}", f"{step_flops / median(seconds['step']) / 1e9:.3g}",
                     f"{product.flops / median(seconds['product']) / 1e9:.3g}", f"{middle:.3f}", f"{low:.3f}-{high:.3f}"])
        print(f"{model} done", flush=True)
    size = args.input_size or IMAGE_SIZE
    print(f"\nTraining FLOP rate against a {n}x{n} matrix product ({precision}, channels-last, batch {args.batch_size}, "
          f"input {size}x{size}; {args.steps * args.repeats} rounds of one step and one product; CPU). FLOPs are "
          "torch's count of the forward and backward matrix products and convolutions of one step.\n")
    print(markdown_table(["model", "images/s", "training GFLOP per image", "step GFLOP/s", "product GFLOP/s",
                          "step/product", "quartiles"], rows))


if __name__ == "__main__":
    sys.exit(run_main(main))
