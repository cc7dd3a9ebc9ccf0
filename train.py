"""Train a CIFAR-10 classifier (ResNet-50, VGG-16, ...) with PyTorch Lightning.

    python train.py --model resnet50 --accelerator cpu
    tensorboard --logdir lightning_logs

Each run writes ``LOGDIR/version_N/``: TensorBoard events, ``hparams.yaml`` and
``checkpoints/`` (the best by ``val/acc`` and ``last.ckpt``). After training,
the best checkpoint is tested and the script ends with ``Test accuracy: NN.NN %``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Sequence

from cli import (
    ArgumentParser,
    UserError,
    fraction,
    int_or_fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_precision,
    run_main,
    str_to_bool,
)
from models import list_models

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="resnet50", choices=list_models(), help="architecture")
    model.add_argument("--stem", default="imagenet", choices=("imagenet", "cifar"),
                       help="ResNet first layers: the paper's 7x7/2 conv + max-pool, or a 3x3/1 conv (16x the compute)")
    model.add_argument("--zero-init-residual", type=str_to_bool, default=True, metavar="BOOL",
                       help="start each residual block's last BatchNorm scale at zero (ResNets)")

    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="./data",
                      help="image folder (train/<class>/, test/<class>/) or the official CIFAR-10 folder; downloaded when empty")
    data.add_argument("--cache-dir", default=None,
                      help="where decoded images are cached (default: $CIFAR10_CACHE_DIR or ~/.cache/cifar10-lightning)")
    data.add_argument("--val-size", type=non_negative_int, default=5000, help="training images held out for validation")
    data.add_argument("--batch-size", type=positive_int, default=128, help="images per batch (per device)")
    data.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader workers (data is in memory)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=positive_int, default=25, help="training epochs")
    optim.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "adamw"), help="SGD uses Nesterov momentum")
    optim.add_argument("--lr", type=positive_float, default=0.05, help="peak learning rate")
    optim.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum")
    optim.add_argument("--weight-decay", type=non_negative_float, default=5e-4,
                       help="on conv and linear weights, not on BatchNorm or biases")
    optim.add_argument("--label-smoothing", type=fraction, default=0.1, help="cross-entropy label smoothing")
    optim.add_argument("--scheduler", default="onecycle", choices=("onecycle", "cosine", "none"),
                       help="learning-rate schedule, stepped every batch")
    optim.add_argument("--warmup-fraction", type=fraction, default=0.15, help="share of steps warming up (onecycle)")
    optim.add_argument("--seed", type=non_negative_int, default=42, help="random seed")

    hardware = parser.add_argument_group("hardware and speed")
    hardware.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="Lightning accelerator")
    hardware.add_argument("--devices", default="auto", help="number of devices, a list like 0,1, or auto")
    hardware.add_argument("--precision", default="auto", choices=PRECISIONS,
                          help="auto: bf16-mixed where the device computes bf16 natively, else 32-true")
    hardware.add_argument("--channels-last", type=str_to_bool, default=True, metavar="BOOL",
                          help="channels-last memory format for weights and batches")
    hardware.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    hardware.add_argument("--deterministic", action="store_true", help="deterministic algorithms only")

    run = parser.add_argument_group("run control")
    run.add_argument("--limit-train-batches", type=int_or_fraction, default=None, help="batches (int) or fraction per epoch")
    run.add_argument("--limit-val-batches", type=int_or_fraction, default=None, help="batches (int) or fraction")
    run.add_argument("--limit-test-batches", type=int_or_fraction, default=None, help="batches (int) or fraction")
    run.add_argument("--fast-dev-run", action="store_true", help="one batch of each stage, no logs or checkpoints")
    run.add_argument("--logdir", default="lightning_logs", help="TensorBoard runs go to LOGDIR/version_N")
    run.add_argument("--ckpt-path", default=None,
                     help="resume from this checkpoint, or 'last' for the newest run's last.ckpt in --logdir")
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


def parse_devices(text: str):
    if text == "auto":
        return "auto"
    if re.fullmatch(r"\d+", text):
        if int(text) < 1:
            raise UserError(f"--devices must be at least 1, got {text}")
        return int(text)
    if re.fullmatch(r"\d+(,\d+)*,?", text):
        return [int(part) for part in text.split(",") if part]
    raise UserError(f"--devices takes a count, a list like 0,1, or auto; got {text!r}")


def model_options(args) -> dict:
    if args.model.startswith("resnet"):
        return {"stem": args.stem, "zero_init_residual": args.zero_init_residual}
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logdir = Path(args.logdir)
    devices = parse_devices(args.devices)
    ckpt_path = None
    if args.ckpt_path is not None:
        ckpt_path = find_last_checkpoint(logdir) if args.ckpt_path == "last" else Path(args.ckpt_path)
        if not ckpt_path.is_file():
            raise UserError(f"--ckpt-path {ckpt_path}: no such file")

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
    from pytorch_lightning.loggers import TensorBoardLogger

    from datamodules import CIFAR10DataModule
    from datamodules.cifar10 import default_cache_dir
    from lit_modules import LitClassifier

    pl.seed_everything(args.seed, workers=True, verbose=False)
    precision = resolve_precision(args.precision, args.accelerator)

    datamodule = CIFAR10DataModule(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        val_size=args.val_size,
        cache_dir=args.cache_dir or default_cache_dir(),
        channels_last=args.channels_last,
    )
    datamodule.prepare_data()  # data problems surface here, before any run folder is made

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
    )
    if args.compile:
        module.model.compile()

    has_validation = args.val_size > 0 and args.limit_val_batches != 0
    checkpoint_callback = ModelCheckpoint(
        monitor="val/acc" if has_validation else None,
        mode="max",
        save_top_k=1,
        save_last=True,
        filename="best-{epoch:03d}" if has_validation else "epoch-{epoch:03d}",
    )
    callbacks = [checkpoint_callback]
    if args.progress_refresh > 0:
        callbacks.append(TQDMProgressBar(refresh_rate=args.progress_refresh))
    logger = TensorBoardLogger(
        save_dir=str(logdir),
        name="",
        version=run_version_of(ckpt_path, logdir) if ckpt_path else None,
        default_hp_metric=False,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=devices,
        precision=precision,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=args.progress_refresh > 0,
        log_every_n_steps=args.log_every_n_steps,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches if args.val_size > 0 else 0,
        limit_test_batches=args.limit_test_batches,
        fast_dev_run=args.fast_dev_run,
        deterministic=args.deterministic,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)

    best = checkpoint_callback.best_model_path or checkpoint_callback.last_model_path
    results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    if trainer.is_global_zero:
        if best:
            print(f"Checkpoint tested: {best}")
        print(f"Test accuracy: {100 * results[0]['test/acc']:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
