"""Test a checkpoint on the CIFAR-10 test set without training.

    python evaluate.py lightning_logs/version_0/checkpoints/last.ckpt

Without ``--data-dir`` the test images come from the folder the run trained on
(recorded in its checkpoint), else from ``./data``.

Prints the overall accuracy, the accuracy of each class and the confusion
matrix (rows: true class, columns: predicted); ``--json PATH`` writes them too.
The model is rebuilt from the checkpoint's hyperparameters alone, and scored as
``train.py`` tests it (with the mirror-image average unless the run turned it off;
``--test-time-flip false`` scores single views, ``--test-time-shift 2`` adds
shifted views), at the precision the run tested in, as its ``run_info.json``
records it: bf16 rounding moves a few of 10,000 predictions, so a checkpoint
scored in another precision can differ from the run's printed accuracy in the
second decimal.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from cli import (DEFAULT_DATA_DIR, PRECISIONS, ArgumentParser, UserError, autocast_for, check_output_file,
                 launch_history, positive_int, read_run_info, require_file, resolve_precision, run_main,
                 slow_bf16_warning, str_to_bool, view_shift, write_json_atomic)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt written by train.py")
    parser.add_argument("--data-dir", default=None,
                        help="image folder or official CIFAR-10 folder, as in train.py (default: the run's own, else ./data)")
    parser.add_argument("--cache-dir", default=None, help="decoded-image cache, as in train.py (default: the run's own)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per batch")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--test-time-flip", type=str_to_bool, default=None, metavar="BOOL",
                        help="average each image's and its mirror image's probabilities (default: as the run tested)")
    parser.add_argument("--test-time-shift", type=view_shift, default=None, metavar="PIXELS",
                        help="also average copies shifted by this many pixels each way (default: as the run tested)")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="as train.py's --precision (default: as the run tested, from the run_info.json of the "
                             "checkpoint's run folder; where there is none, auto: bf16-mixed where the device trains "
                             "it faster than 32-true, else 32-true)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def pick_device(name: str):
    import torch

    from cli import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


def run_precision(checkpoint_path: str) -> str | None:
    """The precision the run's last launch (the one that tested) recorded in its ``run_info.json``, if any.

    A checkpoint of train.py lies in ``version_N/checkpoints/``, the record in ``version_N/``.
    """
    folder = Path(checkpoint_path).resolve().parent
    if folder.name == "checkpoints":
        folder = folder.parent
    info = read_run_info(folder / "run_info.json")
    launches = launch_history(info)
    return (launches[-1].get("precision") if launches else None) or info.get("precision")


def scoring_precision(given: str | None, checkpoint_path: str, device) -> str:
    """``--precision``, else the run's, with ``auto`` made concrete for ``device``; refuses fp16 autocast on a CPU."""
    recorded = None if given else run_precision(checkpoint_path)
    precision = resolve_precision(given or recorded or "auto", "gpu" if device.type == "cuda" else "cpu")
    if precision == "16-mixed" and device.type != "cuda":
        source = "--precision 16-mixed" if given else "the run tested in 16-mixed, which"
        raise UserError(f"{source} needs a CUDA GPU (--device cuda); on the CPU give --precision bf16-mixed or 32-true")
    return precision


def predict_labels(module, loader, device, precision: str = "32-true") -> tuple:
    """(predicted, true) label tensors over a loader of uint8 batches, normalised as in training, at ``precision``
    as Lightning applies it: ``*-mixed`` under autocast, ``*-true`` with the weights converted."""
    import torch

    from datamodules import normalize

    module.to(device).eval()
    if precision in ("bf16-true", "64-true"):
        module.to(torch.bfloat16 if precision == "bf16-true" else torch.float64)
    predicted, true = [], []
    with torch.inference_mode(), autocast_for(precision, device.type):
        for images, labels in loader:
            logits = module.test_logits(normalize(images.to(device)))
            predicted.append(logits.argmax(dim=1).cpu())
            true.append(labels)
    return torch.cat(predicted), torch.cat(true)


def confusion_matrix(predicted, true, num_classes: int):
    import torch

    return torch.bincount(true * num_classes + predicted, minlength=num_classes**2).view(num_classes, num_classes)


def format_report(accuracy: float, class_names: list[str], per_class: list[float], matrix) -> str:
    width = max(len(name) for name in class_names) + 2
    lines = [f"Test accuracy: {100 * accuracy:.2f} %", "", "Per-class accuracy:"]
    lines += [f"  {name:<{width}}{100 * value:6.2f} %" for name, value in zip(class_names, per_class)]
    lines += ["", "Confusion matrix (rows: true, columns: predicted):"]
    short = [name[:5] for name in class_names]
    lines.append(" " * (width + 2) + "".join(f"{name:>7}" for name in short))
    for name, row in zip(class_names, matrix.tolist()):
        lines.append(f"  {name:<{width}}" + "".join(f"{count:>7}" for count in row))
    return "\n".join(lines)


def write_report(path: Path, report: dict) -> None:
    """``--json``: a write that fails after the scoring (a full disk, say) is one line; the printed report stands."""
    try:
        write_json_atomic(path, report)
    except OSError as error:
        raise UserError(f"--json {path}: could not write it ({error.strerror or error}); the report above is complete") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require_file(args.checkpoint)
    if args.json:
        check_output_file(Path(args.json), "--json")
    from datamodules import CIFAR10DataModule
    from datamodules.cifar10 import default_cache_dir
    from lit_modules.checkpointing import classifier_from_checkpoint, read_lightning_checkpoint

    checkpoint = read_lightning_checkpoint(args.checkpoint)
    module = classifier_from_checkpoint(checkpoint, args.checkpoint)
    data_dir, cache_dir = CIFAR10DataModule.run_location(checkpoint, args.checkpoint, args.data_dir, args.cache_dir)
    data_dir, cache_dir = data_dir or DEFAULT_DATA_DIR, cache_dir or default_cache_dir()
    del checkpoint  # a second copy of the weights
    if args.test_time_flip is not None:
        module.hparams.test_time_flip = args.test_time_flip
    if args.test_time_shift is not None:
        module.hparams.test_time_shift = args.test_time_shift
    device = pick_device(args.device)
    precision = scoring_precision(args.precision, args.checkpoint, device)
    slow_precision = slow_bf16_warning(precision, device.type == "cpu")
    if slow_precision:
        print(f"evaluate.py: warning: {slow_precision}", file=sys.stderr, flush=True)
    datamodule = CIFAR10DataModule(data_dir, batch_size=args.batch_size, val_size=0, cache_dir=cache_dir)
    datamodule.setup("test")
    predicted, true = predict_labels(module, datamodule.test_dataloader(), device, precision)
    class_names = module.class_names
    matrix = confusion_matrix(predicted, true, len(class_names))
    accuracy = float((predicted == true).float().mean())
    per_class = (matrix.diag().float() / matrix.sum(dim=1).clamp(min=1).float()).tolist()
    print(format_report(accuracy, class_names, per_class, matrix))
    print(f"\n{len(true)} test images, scored in {precision} on {device.type}")
    if args.json:
        write_report(Path(args.json), {
            "checkpoint": str(args.checkpoint),
            "model": module.hparams.model_name,
            "images": len(true),
            "test_time_flip": bool(module.hparams.test_time_flip),
            "test_time_shift": int(module.hparams.test_time_shift),
            "precision": precision,
            "accuracy": accuracy,
            "per_class_accuracy": dict(zip(class_names, per_class)),
            "class_names": class_names,
            "confusion_matrix": matrix.tolist(),
        })
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
