"""Train a CIFAR-10 classifier (ResNet-50, VGG-16, ...) with PyTorch Lightning.

    python train.py --model resnet50 --accelerator cpu
    tensorboard --logdir lightning_logs

Each run writes ``LOGDIR/version_N/``: TensorBoard events, ``hparams.yaml``,
``run_info.json`` (command line, seed, library versions, status, and each
launch of a resumed run with its own command, start and end) and
``checkpoints/`` (the best by ``val/acc`` and ``last.ckpt``). After training,
the best checkpoint is tested and the script ends with ``Test accuracy: NN.NN %``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import platform
import re
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from cli import (
    DEFAULT_DATA_DIR,
    PRECISIONS,
    RUN_INFO_TIME_FORMAT,
    ArgumentParser,
    UserError,
    error_summary,
    fraction,
    int_or_fraction,
    launch_history,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    positive_int_or_fraction,
    quiet_library_notices,
    read_run_info,
    require_file,
    resolve_precision,
    run_main,
    slow_bf16_warning,
    str_to_bool,
    trains_on_cpu,
    view_shift,
    write_json_atomic,
)
from models import list_models

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
DEFAULT_EPOCHS = 18
AUTO_INPUT_SIZE = 48  # for ResNets with the ImageNet stem; see resolve_input_size
FULL_PRECISIONS = ("32-true", "64-true")
RUN_VERSION_VARIABLE = "TRAIN_PY_RUN_VERSION"  # lets DDP worker processes log to the parent's version_N


def cutout_size(text: str) -> int:
    """``--cutout``: 0 (off) up to the side of a CIFAR-10 image, refused while parsing, before any work."""
    from datamodules.cifar10 import IMAGE_SIZE  # here, so that --help does not wait for Lightning's import

    value = non_negative_int(text)
    if value > IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {IMAGE_SIZE}, the side of a CIFAR-10 image, got {text}")
    return value


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="resnet50", choices=list_models(), help="architecture")
    model.add_argument("--stem", default="imagenet", choices=("imagenet", "cifar"),
                       help="ResNet first layers: the paper's 7x7/2 conv + max-pool, or a 3x3/1 conv (16x the compute)")
    model.add_argument("--zero-init-residual", type=str_to_bool, default=True, metavar="BOOL",
                       help="start each residual block's last BatchNorm scale at zero (ResNets)")
    model.add_argument("--input-size", type=input_size_arg, default="auto", metavar="N",
                       help=f"resize every batch to NxN (bilinear) before the network; auto: {AUTO_INPUT_SIZE} for ResNets "
                            "with the imagenet stem, except on a CPU at 32-bit precision; else the images' own 32")
    model.add_argument("--init-from", default=None, metavar="PATH",
                       help="start from these weights (a .ckpt or a state_dict file); a new run, fresh optimiser")
    model.add_argument("--init-strict", type=str_to_bool, default=True, metavar="BOOL",
                       help="with --init-from: refuse missing, unexpected or misshapen weights (false: load what fits)")

    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                      help="image folder (train/<class>/, test/<class>/) or the official CIFAR-10 folder; downloaded when empty")
    data.add_argument("--cache-dir", default=None,
                      help="where decoded images are cached (default: $CIFAR10_CACHE_DIR or ~/.cache/cifar10-lightning)")
    data.add_argument("--val-size", type=non_negative_int, default=5000, help="training images held out for validation")
    data.add_argument("--batch-size", type=positive_int, default=128, help="images per batch (per device)")
    data.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader workers (data is in memory)")
    data.add_argument("--cutout", type=cutout_size, default=0, metavar="N",
                      help="fill one random NxN square of each training image with the mean colour (0: off; at most 32)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=positive_int, default=None,
                       help=f"training epochs; the learning-rate schedule spans them (default: {DEFAULT_EPOCHS}, or the resumed run's)")
    optim.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "adamw"), help="SGD uses Nesterov momentum")
    optim.add_argument("--lr", type=positive_float, default=0.1, help="peak learning rate")
    optim.add_argument("--momentum", type=fraction, default=0.9, help="SGD momentum, in [0, 1)")
    optim.add_argument("--weight-decay", type=non_negative_float, default=5e-4,
                       help="on conv and linear weights, not on BatchNorm or biases")
    optim.add_argument("--label-smoothing", type=fraction, default=0.1, help="cross-entropy label smoothing")
    optim.add_argument("--scheduler", default="onecycle", choices=("onecycle", "cosine", "none"),
                       help="learning-rate schedule, stepped every batch")
    optim.add_argument("--warmup-fraction", type=fraction, default=0.15, help="share of steps warming up (onecycle)")
    optim.add_argument("--ema-decay", type=fraction, default=0.0, metavar="D",
                       help="validate, checkpoint and keep an exponential moving average of the weights, "
                            "updated every step with this decay (e.g. 0.999), ramped up as (1+n)/(10+n) over the "
                            "first steps n; 0: off")
    optim.add_argument("--seed", type=non_negative_int, default=42, help="random seed (weights, shuffling, augmentation)")
    optim.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms only: two runs with the same seed give identical results")

    hardware = parser.add_argument_group("hardware, speed and scale")
    hardware.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="Lightning accelerator")
    hardware.add_argument("--devices", default="auto", help="devices per node: a count, a list like 0,1, or auto")
    hardware.add_argument("--num-nodes", type=positive_int, default=1, help="machines (DDP across nodes)")
    hardware.add_argument("--strategy", default="auto", help="Lightning strategy: auto, ddp, ddp_spawn, ...")
    hardware.add_argument("--precision", default="auto", choices=PRECISIONS,
                          help="auto: bf16-mixed where the device trains it faster than 32-true (a GPU with bf16, a "
                               "CPU with AMX-BF16, an AMD CPU with AVX512-BF16), else 32-true")
    hardware.add_argument("--channels-last", type=str_to_bool, default=True, metavar="BOOL",
                          help="channels-last memory format for weights and batches")
    hardware.add_argument("--compile", action="store_true", help="compile the model with torch.compile")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--test-time-flip", type=str_to_bool, default=True, metavar="BOOL",
                            help="test on the mean of each image's and its mirror image's probabilities "
                                 "(validation stays single-view)")
    evaluation.add_argument("--test-time-shift", type=view_shift, default=0, metavar="PIXELS",
                            help="also test on copies shifted by this many pixels left, right, up and down, the "
                                 "uncovered border black as in the training crops (and their mirrors): "
                                 "10 views instead of 2; 0 turns it off, at most 4 (the padding of the training crops)")

    run = parser.add_argument_group("run control")
    run.add_argument("--limit-train-batches", type=positive_int_or_fraction, default=None,
                     help="batches per epoch: a count of at least 1, or a fraction in (0, 1] (default: all)")
    run.add_argument("--limit-val-batches", type=int_or_fraction, default=None,
                     help="validation batches: a count, or a fraction in [0, 1]; 0 skips validation (default: all)")
    run.add_argument("--limit-test-batches", type=positive_int_or_fraction, default=None,
                     help="test batches: a count of at least 1, or a fraction in (0, 1] (default: all)")
    run.add_argument("--fast-dev-run", action="store_true", help="one batch of each stage, no logs or checkpoints")
    run.add_argument("--logdir", default="lightning_logs", help="TensorBoard runs go to LOGDIR/version_N")
    run.add_argument("--ckpt-path", default=None,
                     help="resume from this checkpoint (optimiser, schedule, epoch, same version_N) with its run's "
                          "recipe and data settings, or 'last' for the newest run's last.ckpt in --logdir")
    run.add_argument("--stop-after-epochs", type=positive_int, default=None,
                     help="stop after this many of the --epochs (schedule unchanged); continue later with --ckpt-path last")
    run.add_argument("--checkpoint-every-n-steps", type=non_negative_int, default=200,
                     help="also refresh last.ckpt every N training steps, bounding work lost to a hard kill (0: only at epoch ends)")
    run.add_argument("--log-every-n-steps", type=positive_int, default=50, help="training scalars every N steps")
    run.add_argument("--progress-refresh", type=non_negative_int, default=20,
                     help="progress bar refresh every N batches (0 hides it)")
    run.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def find_last_checkpoint(logdir: Path) -> Path:
    """``last.ckpt`` of the highest-numbered ``version_N`` in ``logdir`` that has one."""
    candidates = []
    for path in logdir.glob("version_*/checkpoints/last.ckpt"):
        match = re.fullmatch(r"version_(\d+)", path.parent.parent.name)
        if match:
            candidates.append((int(match.group(1)), path))
    if not candidates:
        raise UserError(f"--ckpt-path last: no version_N/checkpoints/last.ckpt in {logdir}")
    return max(candidates)[1]


def run_version_of(checkpoint: Path, logdir: Path) -> int | None:
    """N where ``checkpoint`` lies in ``logdir/version_N/checkpoints``, so a resumed run keeps logging there."""
    run_dir = checkpoint.resolve().parent.parent
    match = re.fullmatch(r"version_(\d+)", run_dir.name)
    if match and checkpoint.resolve().parent.name == "checkpoints" and run_dir.parent == logdir.resolve():
        return int(match.group(1))
    return None


def next_version(logdir: Path) -> int:
    numbers = [int(m.group(1)) for p in logdir.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(numbers, default=-1) + 1


def parse_devices(text: str, accelerator: str):
    if text == "auto":
        return "auto"
    if re.fullmatch(r"\d+", text):
        count = int(text)
        if count < 1:
            raise UserError(f"--devices must be at least 1, got {text}")
        if accelerator == "cpu" and count > (os.cpu_count() or 1):
            raise UserError(f"--devices {count}: this machine has {os.cpu_count()} CPU cores; use at most that many")
        return count
    if re.fullmatch(r"\d+(,\d+)*,?", text):
        if accelerator == "cpu":
            raise UserError(f"--devices {text}: on the CPU --devices takes a count of processes, like 2")
        return [int(part) for part in text.split(",") if part]
    raise UserError(f"--devices takes a count, a list like 0,1, or auto; got {text!r}")


def check_strategy(strategy: str) -> None:
    """Refuse the strategies that train in child processes while the main one waits.

    train.py records the run (epochs trained, best validation accuracy, run_info.json) from the
    process that called ``fit``; after a spawned or forked fit that process holds none of it.
    """
    if re.match(r"ddp_(spawn|fork|notebook)", strategy):
        raise UserError(f"--strategy {strategy}: train.py records its run from the process that trains; "
                        "use --strategy ddp, which starts the same processes as a launcher")


def check_devices(accelerator: str, devices) -> None:
    """A GPU asked for where there is none, or more GPUs than exist: say so before Lightning does, in plainer words."""
    import torch

    if accelerator not in ("gpu", "cuda"):
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise UserError(f"--accelerator {accelerator}: no CUDA GPU is available on this machine; use --accelerator cpu or auto")
    wanted = devices if isinstance(devices, int) else (max(devices) + 1 if isinstance(devices, list) else 1)
    if wanted > available:
        raise UserError(f"--devices {devices}: this machine has {available} GPU(s); ask for at most that many")


def input_size_arg(text: str) -> str | int:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive integer, got {text}")
    return int(text)


def resolve_input_size(args, precision: str) -> int | None:
    """``--input-size``, with ``auto`` made concrete for the run's resolved ``precision``.

    The ImageNet stem shrinks a 32x32 image to 8x8 before the first stage. At
    48x48 (12x12) ResNet-50 reached 85.17 % in 18 epochs on the 2-core CPU in
    bf16 (85.5-85.8 % with three seeds on a GPU) against 84.6 % in 27 epochs at
    32x32, the same training time (RESULTS.md, resolution sweep). On a CPU at
    32-bit the larger image costs 2 to 2.5x the time, not 1.5x, and 32x32 is the
    better use of it: 76.06 % in 9 epochs (76.5 min) against 72.30 % in 5
    epochs at 48x48 (85 min) on an AVX2-only CPU; so there ``auto`` keeps
    32x32. The CIFAR stem and VGG-16 always keep 32x32.
    """
    if args.input_size != "auto":
        return args.input_size
    if not (args.model.startswith("resnet") and args.stem == "imagenet"):
        return None
    if precision in FULL_PRECISIONS and trains_on_cpu(args.accelerator):
        return None
    return AUTO_INPUT_SIZE


@contextlib.contextmanager
def notices_held_until_accepted():
    """Hold what Lightning says while the Trainer is built (precision, devices found) until the block ends.

    Checks that need the built Trainer (its process count) then refuse in one line;
    a block that raises drops the held notices, one that ends prints them.
    """
    library_logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    library_logger.addFilter(hold)
    try:
        with warnings.catch_warnings(record=True) as held_warnings:
            warnings.simplefilter("default")  # shown once each, as outside the block
            yield
    finally:
        library_logger.removeFilter(hold)
    for record in held:
        library_logger.handle(record)
    for warning in held_warnings:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


MODEL_OPTION_FLAGS = ("stem", "zero_init_residual")  # the flags that become get_model options


def model_options(args) -> dict:
    """The options of ``args.model`` from the flags: the ResNets take them all, VGG-16 none."""
    if args.model.startswith("resnet"):
        return {dest: getattr(args, dest) for dest in MODEL_OPTION_FLAGS}
    return {}


def check_model_flags(args, given: set[str]) -> None:
    """Refuse a model flag written for a network that does not take it, rather than ignore it."""
    taken = model_options(args)
    named = [f"--{dest.replace('_', '-')}" for dest in MODEL_OPTION_FLAGS if dest in given and dest not in taken]
    if named:
        raise UserError(f"{' and '.join(named)} only shape{'' if len(named) > 1 else 's'} the ResNets, "
                        f"not {args.model}; leave {'them' if len(named) > 1 else 'it'} out")


def estimated_checkpoint_bytes(num_parameters: int) -> int:
    """Weights plus one optimiser buffer in fp32, with room for metadata."""
    return num_parameters * 4 * 2 + 1_000_000


def check_logdir(logdir: Path, bytes_needed: int) -> None:
    """Refuse an unwritable --logdir or one without room for the checkpoints, before any work starts."""
    if logdir.exists() and not logdir.is_dir():
        raise UserError(f"--logdir {logdir} is a file, not a folder; choose a folder")
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        probe = logdir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--logdir {logdir} is not writable ({error.strerror or error}); choose another folder") from None
    free = shutil.disk_usage(logdir).free
    if free < bytes_needed:
        raise UserError(
            f"--logdir {logdir}: {free / 2**20:.0f} MiB free, about {bytes_needed / 2**20:.0f} MiB needed "
            "for checkpoints; free some space or choose another folder"
        )


def library_versions() -> dict[str, str]:
    import numpy
    import pytorch_lightning
    import torch
    import torchmetrics
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
        "numpy": numpy.__version__,
    }


def given_flags(argv: Sequence[str] | None) -> set[str]:
    """The flags (by ``dest``) written on the command line, as opposed to left at their defaults."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # a flag left out is then absent from the namespace
    return set(vars(parser.parse_args(argv)))


# Flags a checkpoint's hyperparameters record under the same name.
RESUMED_HPARAMS = ("optimizer", "lr", "momentum", "weight_decay", "label_smoothing", "scheduler", "warmup_fraction",
                   "channels_last", "test_time_flip", "test_time_shift", "ema_decay")
# Flags the data module's checkpoint state records: flag dest -> its key there.
RESUMED_DATA_SETTINGS = {"batch_size": "batch_size", "val_size": "val_size", "seed": "seed", "cutout": "cutout_size"}


def run_settings(checkpoint: dict) -> dict:
    """The flag values (by ``dest``) of the run a checkpoint belongs to, as far as the checkpoint records them.

    ``input_size`` is made concrete: a run that fed 32x32 images records ``None``.
    """
    from datamodules.cifar10 import IMAGE_SIZE, CIFAR10DataModule

    hparams = checkpoint["hyper_parameters"]
    settings = {"model": hparams["model_name"]}
    settings.update((key, value) for key, value in (hparams.get("model_options") or {}).items()
                    if key in ("stem", "zero_init_residual"))
    settings.update((key, hparams[key]) for key in RESUMED_HPARAMS if key in hparams)
    if "input_size" in hparams:
        settings["input_size"] = hparams["input_size"] or IMAGE_SIZE
    data_state = CIFAR10DataModule.saved_state(checkpoint)
    settings.update((dest, data_state[key]) for dest, key in RESUMED_DATA_SETTINGS.items() if key in data_state)
    # The training batches size the learning-rate schedule, as the epochs do; validation and test batches keep the
    # curve and the final test on the images the run started with.
    for stage in ("train", "val", "test"):
        if f"planned_limit_{stage}_batches" in checkpoint:
            settings[f"limit_{stage}_batches"] = checkpoint[f"planned_limit_{stage}_batches"]
    return settings


# Run settings a resume takes from the checkpoint when left out, but that a flag may change.
CHANGEABLE_ON_RESUME = ("limit_val_batches", "limit_test_batches")


def adopt_run_settings(args, given: set[str], checkpoint: dict, ckpt_path: Path) -> None:
    """A resumed run keeps the recipe, data settings and epoch count it started with.

    Flags left out take the run's values (a run started with ``--val-size 0``
    must not be resumed on a 45,000-image split); a flag given with another value
    than the run's is refused rather than silently ignored, except the validation
    and test limits, which a resume may change on purpose. ``--data-dir``,
    ``--cache-dir`` and ``--logdir`` left out are where the run had them (the
    logdir is the one the checkpoint lies in), so that ``--ckpt-path`` alone resumes.
    """
    from datamodules.cifar10 import IMAGE_SIZE, CIFAR10DataModule

    conflicts = []
    for dest, value in run_settings(checkpoint).items():  # model and stem come before input_size
        given_value = getattr(args, dest)
        if dest == "input_size" and given_value == "auto":
            precision = resolve_precision(args.precision, args.accelerator)
            given_value = resolve_input_size(args, precision) or IMAGE_SIZE
        if dest in given and dest in CHANGEABLE_ON_RESUME:
            continue
        if dest in given and given_value != value:
            conflicts.append(f"--{dest.replace('_', '-')} {value}, not {given_value}")
        setattr(args, dest, value)
    if conflicts:
        raise UserError(
            f"{ckpt_path} belongs to a run with {'; '.join(conflicts)}; "
            "leave those flags out to resume it, or start a new run with --init-from"
        )
    # Where the run lives may change (a given flag wins), but left out it is where the run was.
    data_dir, cache_dir = CIFAR10DataModule.run_location(
        checkpoint, ckpt_path,
        data_dir=args.data_dir if "data_dir" in given else None,
        cache_dir=args.cache_dir if "cache_dir" in given else None)
    args.data_dir, args.cache_dir = data_dir or args.data_dir, cache_dir or args.cache_dir
    run_logdir = ckpt_path.resolve().parent.parent.parent
    if "logdir" not in given and run_version_of(ckpt_path, run_logdir) is not None \
            and run_logdir != Path(args.logdir).resolve():
        args.logdir = str(run_logdir)
    planned = checkpoint.get("planned_epochs")
    if args.epochs is None:
        args.epochs = planned or DEFAULT_EPOCHS
    elif planned and args.epochs != planned and args.scheduler != "none":
        raise UserError(
            f"{ckpt_path} belongs to a run planned for {planned} epochs, whose learning-rate schedule ends there; "
            f"resume with --epochs {planned} (or leave --epochs out), or start a new run with --init-from"
        )


def build_module(args, resumed: dict | None, precision: str):
    """The LitClassifier to train: rebuilt from the checkpoint ``resumed`` when given, else from the flags."""
    from lit_modules import LitClassifier
    from lit_modules.checkpointing import classifier_from_hparams, init_weights

    if resumed is not None:
        return classifier_from_hparams(resumed["hyper_parameters"])
    args.epochs = args.epochs or DEFAULT_EPOCHS
    try:
        module = LitClassifier(
            model_name=args.model,
            model_options=model_options(args),
            optimizer=args.optimizer,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            label_smoothing=args.label_smoothing,
            scheduler=args.scheduler,
            warmup_fraction=args.warmup_fraction,
            channels_last=args.channels_last,
            test_time_flip=args.test_time_flip,
            test_time_shift=args.test_time_shift,
            input_size=resolve_input_size(args, precision),
            ema_decay=args.ema_decay,
        )
    except ValueError as error:  # an --input-size the network cannot take; argparse has checked the other flags
        raise UserError(f"{error} (--input-size)") from None
    if args.init_from:
        skipped = init_weights(module.model, args.init_from, strict=args.init_strict)
        print(f"Initialised from {args.init_from}" + (f"; skipped {len(skipped)}: {', '.join(skipped)}" if skipped else ""))
    return module


# Where launchers put a process's rank, in the order Lightning reads them: SLURM_PROCID is also set in a SLURM job
# whose processes Lightning starts itself, so the LOCAL_RANK it gives them comes first.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def launched_as_later_rank() -> bool:
    """Whether a launcher (Lightning's DDP, torchrun, SLURM's srun) started this process as other than the first.

    Only the first process checks the log folder, claims the run's ``version_N`` and keeps its records.
    """
    rank = next((int(os.environ[key]) for key in RANK_VARIABLES if key in os.environ), 0)
    return rank > 0 or int(os.environ.get("NODE_RANK", "0")) > 0


def claim_next_version(logdir: Path) -> int:
    """The next free version_N, its folder made at once: runs started together in one logdir get a folder each."""
    while True:
        version = next_version(logdir)
        try:
            (logdir / f"version_{version}").mkdir(parents=True)
        except FileExistsError:  # another run took it first
            continue
        return version


def run_version(ckpt_path: Path | None, logdir: Path, is_worker: bool, claim: bool) -> int | None:
    """The version_N to log to: the resumed run's, the parent process's (DDP workers), or the next free one,
    whose folder is made at once when ``claim``."""
    if ckpt_path is not None:
        version = run_version_of(ckpt_path, logdir)
    elif is_worker and RUN_VERSION_VARIABLE in os.environ:
        version = int(os.environ[RUN_VERSION_VARIABLE])
    else:
        version = claim_next_version(logdir) if claim else next_version(logdir)
    if version is not None and not is_worker:
        os.environ[RUN_VERSION_VARIABLE] = str(version)  # inherited by the DDP processes Lightning starts
    return version


def build_callbacks(args, checkpoint_dir: Path, has_validation: bool):
    """(callbacks, the best-checkpoint callback or None under --fast-dev-run)."""
    from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar

    from lit_modules.callbacks import CheckpointOnInterrupt, EpochTimer, PeriodicCheckpoint, StopAfterEpochs, StopOnDivergence

    callbacks: list = [EpochTimer(), StopOnDivergence()]
    best_checkpoint = None
    if not args.fast_dev_run:
        best_checkpoint = ModelCheckpoint(
            dirpath=checkpoint_dir,
            monitor="val/acc" if has_validation else None,
            mode="max",
            save_top_k=1,
            filename="best-{epoch:03d}" if has_validation else "epoch-{epoch:03d}",
        )
        # last.ckpt after every epoch. (ModelCheckpoint's save_last only refreshes it when a best checkpoint is
        # saved.) Listed after the best one, so it holds that callback's updated state.
        every_epoch = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                                      enable_version_counter=False)  # replace a last.ckpt left by an interrupt
        interrupt_checkpoint = CheckpointOnInterrupt(checkpoint_dir / "last.ckpt", validates=has_validation)
        callbacks += [best_checkpoint, every_epoch, interrupt_checkpoint]
        if args.checkpoint_every_n_steps:
            callbacks.append(PeriodicCheckpoint(checkpoint_dir / "last.ckpt", args.checkpoint_every_n_steps))
    if args.stop_after_epochs:
        callbacks.append(StopAfterEpochs(args.stop_after_epochs))
    if args.progress_refresh > 0:
        callbacks.append(TQDMProgressBar(refresh_rate=args.progress_refresh))
    return callbacks, best_checkpoint


def check_launcher(num_nodes: int, trainer) -> None:
    """Refuse ``--num-nodes`` above 1 where nothing starts the other nodes' processes.

    Lightning finds a launcher in the environment (SLURM's ``srun``, torchrun, MPI,
    LSF, Kubeflow); without one it falls back to a plain environment, where each
    node is told its ``NODE_RANK`` by hand. Without any of these the first process
    would wait, silently and for ever, for processes that no one starts.
    """
    from lightning_fabric.plugins.environments import LightningEnvironment

    if num_nodes == 1 or not isinstance(getattr(trainer.strategy, "cluster_environment", None), LightningEnvironment):
        return
    if os.environ.get("NODE_RANK"):
        return
    raise UserError(f"--num-nodes {num_nodes} needs a launcher that starts train.py on every node (srun, torchrun, "
                    "or NODE_RANK, MASTER_ADDR and MASTER_PORT set on each; README, Scaling out); alone this "
                    "process would wait for the others for ever")


def check_batch_limits(args, datamodule, processes: int) -> None:
    """Before the run folder is made, refuse a batch larger than a process trains on, or a stage without a batch.

    Lightning refuses a ``--limit-*-batches`` fraction worth less than one batch
    only when it reaches that stage, the test's after the whole training; a
    --batch-size above a process's training images would quietly shrink to them
    (or, under DDP, train on none), and a process without a validation or test
    image would leave the others waiting for it.
    """
    images = datamodule.images_per_process("train", processes)
    if args.batch_size > images:
        if processes == 1:
            raise UserError(f"--batch-size {args.batch_size} is more than the {images} training images; "
                            f"use at most {images}")
        raise UserError(f"each of the {processes} processes gets {images} training images, fewer than --batch-size "
                        f"{args.batch_size}; use at most {images} or fewer processes")
    for stage in ("train", "val", "test"):
        limit = getattr(args, f"limit_{stage}_batches")
        if stage == "val" and (args.val_size == 0 or limit == 0):
            continue
        batches = datamodule.batches_per_epoch(stage, processes)
        if batches == 0:
            held_out = f"--val-size {args.val_size}" if stage == "val" else "the test set"
            raise UserError(f"{held_out} holds fewer images than the {processes} processes, so one would have none; "
                            "use fewer processes")
        if isinstance(limit, float) and int(batches * limit) == 0:  # Lightning's own rounding
            name = {"train": "training", "val": "validation", "test": "test"}[stage]
            each = f" of each of the {processes} processes" if processes > 1 else ""
            raise UserError(f"--limit-{stage}-batches {limit} leaves none of the {batches} {name} batches{each}; "
                            f"give a count like 1 or a fraction of at least 1/{batches}")


def check_memory(batch_size: int, module, precision: str, trainer) -> None:
    """Refuse a --batch-size whose training step cannot fit in the memory free for each process.

    The step's needs are measured on a copy of ``module``'s network, before any
    ``torch.compile``. The measure (lit_modules.memory) is a lower bound, so a
    refused batch would have been killed at its first step; one that passes may
    still not fit. The processes of CPU DDP share this machine's memory.
    """
    import torch

    from lit_modules.memory import free_memory, training_memory

    step_memory = training_memory(torch.nn.Sequential(module.input_resize, module.model), precision,
                                  channels_last=module.hparams.channels_last)
    device = trainer.strategy.root_device
    free = free_memory(device)
    if free is None:
        return
    sharing = trainer.num_devices if device.type == "cpu" else 1
    free //= sharing
    needed = step_memory.for_batch(batch_size)
    if needed <= free:
        return
    if device.type != "cpu":
        where = f"on {device}"
    elif sharing > 1:
        where = f"to each of the {sharing} processes"
    else:
        where = "to this process"
    largest = step_memory.largest_batch(free)
    advice = f"use a --batch-size well below {largest}" if largest else "the network does not fit at any batch size"
    raise UserError(f"--batch-size {batch_size} needs at least {needed / 2**30:.1f} GiB for a training step "
                    f"({step_memory.per_image / 2**20:.1f} MiB an image), more than the {free / 2**30:.1f} GiB "
                    f"free {where}; {advice}")


def ran_out_of_memory(error: BaseException) -> bool:
    """A GPU's out-of-memory error, or the CPU allocator's refusal (where Linux overcommits, its kill comes instead)."""
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(error)


def build_trainer(args, devices, precision: str, logger, callbacks: list):
    """The Trainer the flags ask for; Lightning's refusals (say ``--devices 0,1`` on a CPU) as one-line errors."""
    import pytorch_lightning as pl
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from lit_modules.checkpointing import AtomicCheckpointIO

    try:
        return pl.Trainer(
            max_epochs=args.epochs,
            accelerator=args.accelerator,
            devices=devices,
            num_nodes=args.num_nodes,
            strategy=args.strategy,
            precision=precision,
            logger=logger or False,
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
            enable_progress_bar=args.progress_refresh > 0,
            log_every_n_steps=args.log_every_n_steps,
            limit_train_batches=args.limit_train_batches,
            limit_val_batches=args.limit_val_batches if args.val_size > 0 else 0,
            limit_test_batches=args.limit_test_batches,
            fast_dev_run=args.fast_dev_run,
            deterministic=args.deterministic,
        )
    except (MisconfigurationException, ValueError, RuntimeError, TypeError) as error:
        raise UserError(str(error).strip().splitlines()[0]) from None


def mark_killed(launch: dict) -> dict:
    """An earlier launch still ``running`` when its run is resumed ended without a record: killed outright (SIGKILL,
    power loss). Its end time stays unknown; bench/runs.py ends it at its last TensorBoard event."""
    return {**launch, "status": "killed"} if launch.get("status", "running") == "running" else launch


def now() -> str:
    return time.strftime(RUN_INFO_TIME_FORMAT)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logdir = Path(args.logdir)
    devices = parse_devices(args.devices, args.accelerator)
    check_strategy(args.strategy)
    ckpt_path = resumed = None
    given = given_flags(argv)
    if args.ckpt_path is not None:
        if args.init_from:
            raise UserError("--ckpt-path resumes a run and --init-from starts a new one; give only one")
        ckpt_path = find_last_checkpoint(logdir) if args.ckpt_path == "last" else require_file(args.ckpt_path)
        from lit_modules.checkpointing import read_lightning_checkpoint

        resumed = read_lightning_checkpoint(ckpt_path)
        adopt_run_settings(args, given, resumed, ckpt_path)
        logdir = Path(args.logdir)
    check_model_flags(args, given)
    if args.init_from:
        require_file(args.init_from)
    check_devices(args.accelerator, devices)

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from datamodules import CIFAR10DataModule
    from datamodules.cifar10 import default_cache_dir
    from lit_modules.callbacks import EMA_SUPPORTED, StopOnDivergence
    from lit_modules.checkpointing import CheckpointNotWritten, remove_partial_checkpoints

    if args.ema_decay and not EMA_SUPPORTED:
        raise UserError(f"--ema-decay needs pytorch-lightning 2.6 or newer; this is {pl.__version__}")
    pl.seed_everything(args.seed, workers=True, verbose=False)
    precision = resolve_precision(args.precision, args.accelerator)
    slow_precision = slow_bf16_warning(precision, trains_on_cpu(args.accelerator))
    if slow_precision and not launched_as_later_rank():
        print(f"train.py: warning: {slow_precision}", file=sys.stderr, flush=True)
    module = build_module(args, resumed, precision)

    datamodule = CIFAR10DataModule(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        val_size=args.val_size,
        seed=args.seed,
        cache_dir=args.cache_dir or default_cache_dir(),
        channels_last=module.hparams.channels_last,
        cutout_size=args.cutout,
    )
    datamodule.prepare_data()  # data problems surface here, before any run folder
    labelled = datamodule.labelled_images
    if args.val_size >= labelled:
        raise UserError(f"--val-size {args.val_size} leaves none of the {labelled} training images to train on; "
                        f"use at most {labelled - 1}")
    datamodule.setup()

    is_worker = launched_as_later_rank()
    if not args.fast_dev_run and not is_worker:
        num_parameters = sum(p.numel() for p in module.parameters())
        check_logdir(logdir, 3 * estimated_checkpoint_bytes(num_parameters))
    claims_folder = ckpt_path is None and not is_worker and not args.fast_dev_run
    version = run_version(ckpt_path, logdir, is_worker, claim=claims_folder)
    try:
        logger = TensorBoardLogger(save_dir=str(logdir), name="", version=version, default_hp_metric=False)
        run_dir = Path(logger.log_dir)
        checkpoint_dir = run_dir / "checkpoints"
        has_validation = args.val_size > 0 and args.limit_val_batches != 0
        callbacks, best_checkpoint = build_callbacks(args, checkpoint_dir, has_validation)
        divergence = next(callback for callback in callbacks if isinstance(callback, StopOnDivergence))
        quiet_library_notices()
        with notices_held_until_accepted():
            trainer = build_trainer(args, devices, precision, None if args.fast_dev_run else logger, callbacks)
            check_launcher(args.num_nodes, trainer)
            if not args.fast_dev_run:  # which ignores the limits
                check_batch_limits(args, datamodule, trainer.world_size)
            check_memory(args.batch_size, module, precision, trainer)
    except BaseException:
        if claims_folder:  # refused before the run wrote anything: leave no empty run folder
            with contextlib.suppress(OSError):
                (logdir / f"version_{version}").rmdir()
        raise
    if args.compile:
        module.model.compile()
        module.example_input_array = None  # the layer summary's one-image forward pass would compile a second graph

    keeps_records = trainer.is_global_zero and not args.fast_dev_run
    run_info_path = run_dir / "run_info.json"
    launch = {
        "command": shlex.join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "started": now(),
        "precision": precision,
        "resumed_from": str(ckpt_path) if ckpt_path else None,
        "status": "running",
    }
    earlier = read_run_info(run_info_path) if ckpt_path and keeps_records else {}
    run_info = {
        "command": earlier.get("command", launch["command"]),  # the run's first command line
        "seed": args.seed,
        "deterministic": args.deterministic,
        "precision": precision,
        "resumed_from": launch["resumed_from"],
        "versions": library_versions(),
        "status": "running",
        "started": earlier.get("started", launch["started"]),
        "launches": [*map(mark_killed, launch_history(earlier)), launch],
    }

    def record(status: str, quiet: bool = False, **results) -> None:
        """Write the run's outcome; an ``error`` is also kept on this launch, where a later resume still shows it.

        A disk that refuses the write (full, say) gets one line on stderr, unless ``quiet``; what was to
        be said next is said all the same.
        """
        ended = now()
        outcome = {"status": status, "ended": ended}
        if "error" in results:
            outcome["error"] = results["error"]
        launches = [*run_info["launches"][:-1], {**launch, **outcome}]
        try:
            write_json_atomic(run_info_path, {**run_info, **results, **outcome, "launches": launches})
        except OSError as error:
            if not quiet:
                print(f"train.py: could not mark the run {status} in {run_info_path} ({error.strerror or error})",
                      file=sys.stderr)

    def record_failure(error: BaseException) -> None:
        """Mark the run ``failed`` with the error's first line, and say how to resume when training had begun."""
        if not keeps_records:
            return
        record("failed", error=error_summary(error))
        last = checkpoint_dir / "last.ckpt"
        if trainer.state.fn == "fit" and trainer.global_step > 0 and last.is_file():
            print(f"train.py: training failed; last.ckpt holds step {trainer.global_step}; "
                  f"after fixing the cause, resume with --ckpt-path {last}", file=sys.stderr)

    if keeps_records:
        write_json_atomic(run_info_path, run_info)
        if ckpt_path is not None:
            partial = remove_partial_checkpoints(checkpoint_dir)
            if partial:
                print(f"Removed {len(partial)} partial checkpoint file{'s' if len(partial) > 1 else ''} that a kill "
                      f"during a write left in {checkpoint_dir}")

    # Our checkpoints hold only tensors and plain types; newer Lightning can load them without unpickling code.
    safe_load = {"weights_only": True} if "weights_only" in inspect.signature(trainer.fit).parameters else {}

    def checkpoint_not_written(error: CheckpointNotWritten) -> UserError:
        """Mark the run ``failed`` and say what is kept and how to go on, in one line."""
        if keeps_records:
            record("failed", quiet=True, error=error_summary(error))
        last = checkpoint_dir / "last.ckpt"
        then = (f"resume with --ckpt-path {last}" if last.is_file() else "run the same command again")
        remedy = "free some space" if error.disk_full else "fix the cause"
        return UserError(f"{error}, so training stopped at step {trainer.global_step}; the checkpoints written "
                         f"before are intact; {remedy} and {then}")

    def record_divergence(epoch: int, best: str) -> int:
        """Mark the run ``failed`` without testing it, and say what is left and what to change."""
        message = f"the mean training loss of epoch {epoch} was not finite (the weights diverged); training stopped there"
        if keeps_records:
            record("failed", error=f"TrainingDiverged: {message}")
        if trainer.is_global_zero:
            kept = (f"; the best checkpoint by val/acc is {best} (evaluate.py tests it)"
                    if best and epoch > 0 and has_validation else "")
            print(f"train.py: {message}{kept}. Lower --lr (or raise --warmup-fraction) and run again", file=sys.stderr)
        return 1

    def record_stop() -> int:
        """Mark the run ``interrupted``, say how to resume, and give the exit code of the signal."""
        by_sigterm = trainer.received_sigterm
        if keeps_records:
            record("interrupted")
            cause = "stopped by SIGTERM" if by_sigterm else "interrupted"
            last = checkpoint_dir / "last.ckpt"
            if trainer.state.fn == "test":
                cause += " during the final test (training is complete; the resume only tests)"
            if last.is_file():
                print(f"train.py: {cause}; resume with --ckpt-path {last}", file=sys.stderr)
            else:
                print(f"train.py: {cause} before the first training step, so there is nothing to resume; "
                      "run the same command again", file=sys.stderr)
        return 143 if by_sigterm else 130

    # Ctrl-C ends in Lightning's sys.exit(1), SIGTERM in SIGTERMException (a SystemExit with code 0, which
    # would pass for success); in training CheckpointOnInterrupt has saved last.ckpt first.
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, **safe_load)
        best = best_checkpoint.best_model_path or best_checkpoint.last_model_path if best_checkpoint else ""
        if divergence.diverged_epoch is not None:
            return record_divergence(divergence.diverged_epoch, best)
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False, **safe_load)
    except (SystemExit, SIGTERMException) as stop:
        if not trainer.interrupted:
            record_failure(stop)
            raise
        return record_stop()
    except CheckpointNotWritten as error:
        raise checkpoint_not_written(error) from error
    except Exception as error:
        record_failure(error)
        if ran_out_of_memory(error):
            phase = "the test" if trainer.state.fn == "test" else "training"
            raise UserError(f"{trainer.strategy.root_device} ran out of memory at --batch-size {args.batch_size} "
                            f"during {phase}; lower --batch-size") from error
        raise
    test_accuracy = results[0]["test/acc"]
    if keeps_records:
        metrics = {"hp/test_acc": test_accuracy}
        if best_checkpoint.best_model_score is not None:
            metrics["hp/best_val_acc"] = float(best_checkpoint.best_model_score)
        logger.log_hyperparams(module.hparams, metrics)
        logger.finalize("success")
        record("finished", test_acc=test_accuracy, best_checkpoint=best, epochs=trainer.current_epoch)
    if trainer.is_global_zero:
        if best:
            print(f"Checkpoint tested: {best}")
        print(f"Test accuracy: {100 * test_accuracy:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
