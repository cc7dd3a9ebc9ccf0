"""Reading checkpoints safely: whole-run checkpoints, weights-only initialisation, atomic writes.

Everything is loaded on the CPU with ``torch.load(..., weights_only=True)``, so
a checkpoint saved on a GPU loads anywhere and a file cannot run code.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import signal
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import nn

from cli import UserError, os_error_behind
from lit_modules.classifier import LitClassifier
from models import list_models

# Prefixes that wrappers add to parameter names: DDP, torch.compile, a LightningModule's attribute.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used, with a one-line reason."""


class CheckpointNotWritten(Exception):
    """A checkpoint write that failed (a full disk, say); the file it was to replace is as it was."""

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(f"could not write the checkpoint {path} ({cause.strerror or cause})")
        self.path = path
        self.disk_full = cause.errno in (errno.ENOSPC, errno.EDQUOT)


def is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a zip archive holding TorchScript code, as ``torch.jit.save`` writes."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def is_onnx_model(path: Path) -> bool:
    """Whether ``path`` parses as an ONNX model with a graph, as ``export.py --format onnx`` writes."""
    try:
        import onnx

        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:  # not protobuf, not ONNX, or onnx not installed
        return False


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``; unreadable files raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # refused below in plainer words
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle of something else, plain text, ...
        for is_export, kind in ((is_torchscript_archive, "a TorchScript archive"), (is_onnx_model, "an ONNX export")):
            if is_export(path):
                raise CheckpointError(f"{path} is {kind} (export.py's), not a train.py checkpoint; "
                                      "give the .ckpt it was exported from (predict.py runs .onnx exports)") from None
        # The first sentence of torch's reason: its longer messages go on to advice about unpickling code.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0].rstrip(".")
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({reason}); it may be truncated or another kind of file"
        ) from None


def read_lightning_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by this project's train.py: weights plus the hyperparameters that rebuild the model."""
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint or "model_name" not in hparams:
        raise CheckpointError(
            f"{path} is not a train.py checkpoint (no model hyperparameters); "
            "use a .ckpt from lightning_logs/version_N/checkpoints, or --init-from for plain weights"
        )
    if hparams["model_name"] not in list_models():
        raise CheckpointError(
            f"{path} holds an unknown architecture {hparams['model_name']!r}; known: {', '.join(list_models())}"
        )
    return checkpoint


def classifier_from_hparams(hparams: dict) -> LitClassifier:
    accepted = inspect.signature(LitClassifier.__init__).parameters
    return LitClassifier(**{key: value for key, value in hparams.items() if key in accepted})


def load_classifier(path: str | Path) -> LitClassifier:
    """Rebuild a LitClassifier from a checkpoint's hyperparameters alone and load its weights (eval mode)."""
    return classifier_from_checkpoint(read_lightning_checkpoint(path), path)


def classifier_from_checkpoint(checkpoint: dict, path: str | Path) -> LitClassifier:
    """``load_classifier`` for a checkpoint already read with ``read_lightning_checkpoint``."""
    module = classifier_from_hparams(checkpoint["hyper_parameters"])
    problems = compare_state_dicts(module.state_dict(), checkpoint["state_dict"])
    if problems:
        raise CheckpointError(f"{path} does not match its own architecture: {describe(problems)}")
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def extract_model_weights(checkpoint: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The network's weights from a Lightning checkpoint, a plain state_dict, or {"state_dict"|"model": ...}.

    Lightning checkpoints name parameters ``model.<name>``; DDP and torch.compile
    add ``module.`` and ``_orig_mod.``. All such prefixes are removed.
    """
    state = checkpoint
    if isinstance(state, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state_dict of tensors (a dict of name -> tensor was expected)")
    if all(key.startswith("model.") for key in state if not key.endswith(("_acc.tp", "_confusion.confmat"))):
        state = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    cleaned = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        cleaned[key] = value
    return cleaned


def compare_state_dicts(expected: dict, found: dict) -> dict[str, list[str]]:
    """Missing, unexpected and shape-mismatched keys between a model's state_dict and a loaded one."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    mismatched = [
        f"{key} {tuple(found[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in found and tuple(found[key].shape) != tuple(expected[key].shape)
    ]
    return {name: keys for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys}


def describe(problems: dict[str, list[str]], shown: int = 4) -> str:
    parts = []
    for kind, keys in problems.items():
        more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
        parts.append(f"{kind}: {', '.join(keys[:shown])}{more}")
    return "; ".join(parts)


def init_weights(model: nn.Module, path: str | Path, strict: bool = True) -> list[str]:
    """Load weights from ``path`` into ``model``; returns the names skipped (non-strict only).

    Strict: any missing, unexpected or differently shaped key raises CheckpointError
    naming them. Non-strict: loads every key whose name and shape fit.
    """
    weights = extract_model_weights(read_checkpoint(path), path)
    expected = model.state_dict()
    problems = compare_state_dicts(expected, weights)
    if problems and strict:
        raise CheckpointError(f"{path} does not fit --model: {describe(problems)} (--init-strict false loads what fits)")
    fitting = {k: v for k, v in weights.items() if k in expected and tuple(v.shape) == tuple(expected[k].shape)}
    if not fitting:
        raise CheckpointError(f"{path}: none of its weights fits this model ({describe(problems)})")
    model.load_state_dict(fitting, strict=False)
    return [key for keys in problems.values() for key in keys]


@contextlib.contextmanager
def ctrl_c_held():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise its KeyboardInterrupt at the block's end.

    A KeyboardInterrupt raised inside ``torch.save``'s archive writer either
    corrupts the archive (the writer then fails with an unrelated RuntimeError)
    or is swallowed and the run goes on. Only Python's default handler is
    replaced, and only in the main thread; an ignored SIGINT stays ignored.
    """
    if threading.current_thread() is not threading.main_thread() or (
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


PARTIAL_CHECKPOINT_PATTERN = ".*.ckpt.*.tmp"  # AtomicCheckpointIO's temporary files


def remove_partial_checkpoints(folder: Path) -> list[Path]:
    """Delete the temporary files that checkpoint writes cut short by a kill (SIGKILL, power loss) left in ``folder``.

    Only for a folder no live process writes to, such as a resumed run's before it trains again.
    """
    removed = []
    for partial in sorted(Path(folder).glob(PARTIAL_CHECKPOINT_PATTERN)):
        with contextlib.suppress(OSError):
            partial.unlink()
            removed.append(partial)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, syncs it, then renames it into place.

    A kill while writing leaves the previous checkpoint intact (plus a stray
    temporary file, which :func:`remove_partial_checkpoints` clears when the run
    resumes), never a truncated file under the real name. A write
    that fails (a full disk) leaves it intact too, removes the temporary file and
    raises :class:`CheckpointNotWritten`. A Ctrl-C while writing takes effect
    once the file is in place (:func:`ctrl_c_held`).
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        try:
            self._write_atomically(checkpoint, path)
        except (OSError, RuntimeError) as error:
            disk_error = os_error_behind(error)
            if disk_error is None:
                raise
            raise CheckpointNotWritten(path, disk_error) from error

    @staticmethod
    def _write_atomically(checkpoint: dict, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would differ from a plain torch.save
        try:
            with ctrl_c_held():
                with os.fdopen(handle, "wb") as stream:
                    torch.save(checkpoint, stream)
                    stream.flush()
                    os.fsync(stream.fileno())
                os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
