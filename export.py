"""Export a checkpoint's network to ONNX or TorchScript, and check it against PyTorch.

    python export.py lightning_logs/version_0/checkpoints/last.ckpt --format onnx --out resnet50.onnx

The exported model takes normalised ``(N, 3, 32, 32)`` float32 batches of any
batch size ``N`` (normalise with the CIFAR-10 mean and std, as ``predict.py``
does) and returns logits; the checkpoint's ``--input-size`` resize is built in.
The class names travel with it: ONNX metadata key ``class_names``,
TorchScript extra file ``class_names.json``. After writing,
the export is run on random batches of two sizes and compared with the
PyTorch model; a difference above ``--tolerance`` is an error.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from cli import ArgumentParser, UserError, check_output_file, error_summary, parse_number, positive_float, require_file, run_main

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17
OLDEST_OPSET = 11  # ONNX's Resize matches PyTorch's bilinear resize (a trained --input-size) from opset 11 on


def opset_version(text: str) -> int:
    value = parse_number(int, text, f"must be an integer of at least {OLDEST_OPSET}")
    if value < OLDEST_OPSET:
        raise argparse.ArgumentTypeError(f"must be at least {OLDEST_OPSET}, got {text}")
    return value


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt written by train.py")
    parser.add_argument("--format", required=True, choices=FORMATS, help="export format")
    parser.add_argument("--out", required=True, help="file to write (replaced atomically)")
    parser.add_argument("--opset", type=opset_version, default=DEFAULT_OPSET,
                        help=f"ONNX opset version, at least {OLDEST_OPSET}")
    parser.add_argument("--tolerance", type=positive_float, default=1e-4, help="largest accepted |difference| of logits")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


# Both exporters return the file's bytes and main writes them: torch.jit.save aborts the whole process when
# the disk fills under it, and the ONNX exporter's write errors would read as its errors for an opset.


def export_torchscript(model, class_names: list[str]) -> bytes:
    import torch

    example = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={"class_names.json": json.dumps(class_names)})
    return buffer.getvalue()


def export_onnx(model, class_names: list[str], opset: int) -> bytes:
    import onnx
    import torch

    example = torch.randn(2, 3, 32, 32)
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = "class_names", json.dumps(class_names)
    return proto.SerializeToString()


def run_export(path: Path, export_format: str, images):
    """Logits of the exported file for ``images`` (a float tensor), as a tensor."""
    import torch

    if export_format == "torchscript":
        loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return loaded(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    return torch.from_numpy(output)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    check_output_file(out, "--out")
    require_file(args.checkpoint)

    import torch

    from lit_modules import load_classifier

    module = load_classifier(args.checkpoint)
    model = torch.nn.Sequential(module.input_resize, module.model).float().to(memory_format=torch.contiguous_format).eval()
    missing_folders = [folder for folder in (out.parent, *out.parent.parents) if not folder.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():
            # The TorchScript and legacy ONNX exporters announce their own deprecation on every call. Tracing
            # fixes each branch on a map's size to its value at 32x32, the one image size the export takes (the
            # batch size stays free), and warns about every such branch; the check below runs two batch sizes.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            if args.format == "onnx":
                try:
                    exported = export_onnx(model, module.class_names, args.opset)
                except Exception as error:  # the exporter's errors for an opset it cannot serve vary in type
                    raise UserError(f"the ONNX export failed at --opset {args.opset} ({error_summary(error)}); "
                                    f"the default {DEFAULT_OPSET} works") from None
            else:
                exported = export_torchscript(model, module.class_names)
            try:
                temporary.write_bytes(exported)
            except OSError as error:
                raise UserError(f"--out {out}: could not write it ({error.strerror or error}); "
                                "free some space or choose another folder") from None
            worst = 0.0
            for batch_size in (1, 5):
                images = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(batch_size))
                with torch.no_grad():
                    expected = model(images)
                worst = max(worst, float((run_export(temporary, args.format, images) - expected).abs().max()))
        if worst > args.tolerance:
            raise UserError(f"the {args.format} export differs from PyTorch by {worst:.2e} (> {args.tolerance:g}); not written")
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
        if not out.exists():  # a failed export leaves no folders it made, innermost first
            for folder in missing_folders:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
    print(f"Wrote {out} ({args.format}, {module.hparams.model_name}); largest |logit difference| vs PyTorch: {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
