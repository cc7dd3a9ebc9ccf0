"""Classify image files with a checkpoint or an exported ONNX model.

    python predict.py lightning_logs/version_0/checkpoints/last.ckpt cat.png photos/ --top-k 3

Any image PIL opens, of any size or mode, is converted to RGB, resized to
32x32 and normalised exactly as in training. Folders are searched recursively.
A file that is not an image is reported by name and skipped; the exit code is
then 1. A missing path or an empty folder is an error (exit code 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from cli import ArgumentParser, UserError, positive_int, require_file, run_main


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a .ckpt written by train.py, or a .onnx written by export.py")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders")
    parser.add_argument("--top-k", type=positive_int, default=3, help="classes shown per image")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def collect_files(inputs: Sequence[str]) -> list[Path]:
    """Files named directly, plus every non-hidden file below each folder, in order."""
    files: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise UserError(f"{path} is an empty folder; give image files or a folder that holds some")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


class TorchClassifier:
    def __init__(self, checkpoint: str) -> None:
        from lit_modules import load_classifier

        self.module = load_classifier(checkpoint)
        self.class_names = self.module.class_names

    def probabilities(self, images):
        import torch

        with torch.inference_mode():
            return self.module(images).float().softmax(dim=1)


class OnnxClassifier:
    def __init__(self, path: str) -> None:
        import onnxruntime

        from lit_modules.classifier import CIFAR10_CLASS_NAMES

        try:
            self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise UserError(f"{path} is not a loadable ONNX model ({str(error).splitlines()[0][:160]})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        outputs = self.session.get_outputs()[0].shape[-1]
        default = list(CIFAR10_CLASS_NAMES) if outputs == 10 else [str(i) for i in range(outputs)]
        self.class_names = json.loads(metadata["class_names"]) if "class_names" in metadata else default

    def probabilities(self, images):
        import torch

        (logits,) = self.session.run(None, {self.session.get_inputs()[0].name: images.numpy()})
        return torch.from_numpy(logits).float().softmax(dim=1)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require_file(args.model)
    files = collect_files(args.inputs)

    import torch

    from datamodules import DataError, normalize
    from datamodules.cifar10 import read_rgb

    classifier = OnnxClassifier(args.model) if args.model.endswith(".onnx") else TorchClassifier(args.model)
    classes = len(classifier.class_names)
    if args.top_k > classes:
        raise UserError(f"--top-k {args.top_k} is more than the model's {classes} classes; use at most {classes}")
    readable, images, failures = [], [], []
    for path in files:
        try:
            images.append(torch.from_numpy(read_rgb(path, resize=True)).permute(2, 0, 1))
            readable.append(path)
        except DataError as error:
            failures.append(str(path))
            print(f"predict.py: skipped {error}", file=sys.stderr)
    results = []
    for start in range(0, len(images), args.batch_size):
        batch = normalize(torch.stack(images[start : start + args.batch_size]))
        probabilities = classifier.probabilities(batch)
        values, indices = probabilities.topk(args.top_k, dim=1)
        for path, row_values, row_indices in zip(readable[start:], values.tolist(), indices.tolist()):
            results.append({
                "file": str(path),
                "predictions": [
                    {"class": classifier.class_names[i], "probability": round(p, 6)} for p, i in zip(row_values, row_indices)
                ],
            })
    if args.json:
        print(json.dumps({"results": results, "failed": failures}, indent=2))
    else:
        for result in results:
            shown = ", ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in result["predictions"])
            print(f"{result['file']}: {shown}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
