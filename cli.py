"""What the command-line scripts share: one-line errors with exit code 2, the precision choice, and run records."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, Sequence

EXIT_USAGE = 2
DEFAULT_DATA_DIR = "./data"  # where CIFAR-10 is looked for, and downloaded when absent, unless told otherwise


class UserError(Exception):
    """A problem the user can fix; the scripts print its message on one line and exit with code 2.

    DataError and CheckpointError derive from it, so catching it imports neither their modules nor
    Lightning: ``--help`` and a refused flag answer without the seconds that Lightning's import takes.
    """


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends each flag's help with its default, unless the help already says it in words (``(default: ...)``).

    A default of ``None`` reads "none", a switch's ``False`` "off" and a list its items, as they would be
    typed, instead of Python's words; a required flag states none.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not action.option_strings:  # a positional argument
            return super()._get_help_string(action)
        if "(default:" in (action.help or "") or action.required:
            return action.help
        if action.default is None:
            return f"{action.help} (default: none)"
        if action.default is False and action.nargs == 0:
            return f"{action.help} (default: off)"
        if isinstance(action.default, list):
            return f"{action.help} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and defaults shown in ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse's API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def parse_number(kind: type, text: str, requirement: str) -> int | float:
    """``kind(text)``, or the flag's requirement in argparse's one-line error where ``text`` is no such number."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{requirement}, got {text}") from None


def checked_number(kind: type, text: str, requirement: str, accepted) -> int | float:
    """``kind(text)`` where it parses and ``accepted(value)`` holds; else one error line stating the requirement."""
    value = parse_number(kind, text, requirement)
    if not accepted(value):
        raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
    return value


def existing_folder(text: str) -> Path:
    """``text`` as a Path where it names a folder; else argparse's one-line error (a mistyped run folder)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {'a file, not a folder' if path.exists() else 'no such folder'}")
    return path


def positive_int(text: str) -> int:
    return checked_number(int, text, "must be a positive integer", lambda value: value >= 1)


def non_negative_int(text: str) -> int:
    return checked_number(int, text, "must be zero or a positive integer", lambda value: value >= 0)


def view_shift(text: str) -> int:
    """``--test-time-shift``: 0 up to the training crops' padding, so that every view is a window training showed."""
    from datamodules.transforms import CROP_PADDING  # here, so that --help does not wait for Lightning's import

    value = non_negative_int(text)
    if value > CROP_PADDING:
        raise argparse.ArgumentTypeError(f"must be at most {CROP_PADDING}, the padding of the training crops, got {text}")
    return value


def positive_float(text: str) -> float:
    # "> 0" and isfinite also refuse nan and inf
    return checked_number(float, text, "must be a positive number", lambda value: value > 0 and math.isfinite(value))


def fraction(text: str) -> float:
    return checked_number(float, text, "must be in [0, 1)", lambda value: 0 <= value < 1)


def non_negative_float(text: str) -> float:
    return checked_number(float, text, "must be zero or positive", lambda value: value >= 0 and math.isfinite(value))


def int_or_fraction(text: str) -> int | float:
    """Lightning's limit_*_batches: a whole number of batches or a fraction in [0, 1]."""
    value = checked_number(float, text, "must be a batch count or a fraction in [0, 1]",
                           lambda value: value >= 0 and math.isfinite(value))
    if value.is_integer() and ("." not in text or value > 1):
        return int(value)
    if value > 1:
        raise argparse.ArgumentTypeError(f"a fraction must be at most 1, got {text}")
    return value


def positive_int_or_fraction(text: str) -> int | float:
    """A limit that keeps some batches: at least 1 of them, or a fraction in (0, 1]."""
    value = int_or_fraction(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a batch count of at least 1 or a fraction in (0, 1], got {text}")
    return value


def str_to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text}")


def error_summary(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message, as in ``TypeError: ...``."""
    message = str(error).strip()
    return type(error).__name__ + (f": {message.splitlines()[0]}" if message else "")


def os_error_behind(error: BaseException) -> OSError | None:
    """``error`` itself if it is an OSError, else the OSError it was raised while handling, if any.

    ``torch.save`` reports a failed write (ENOSPC) as a RuntimeError of its archive writer,
    raised while handling the OSError; the OSError holds the reason a person can act on.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def require_file(path: str | Path) -> Path:
    """``path`` as a Path, or a UserError at once when no such file exists (before any slow import).

    A folder, such as a run's ``version_N``, is answered with the checkpoints it holds.
    """
    path = Path(path)
    if path.is_dir():
        message = f"{path} is a folder, not a file"
        inside = sorted(path.glob("*.ckpt")) or sorted(path.glob("checkpoints/*.ckpt"))
        if inside:
            message += "; give one of its checkpoints: " + ", ".join(map(str, inside[:4])) + (", ..." if inside[4:] else "")
        raise UserError(message)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return path


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # the x86 CPU flags of native bfloat16 arithmetic


def cpu_flags() -> set[str] | None:
    """The words of ``/proc/cpuinfo`` (its ``flags`` and ``vendor_id`` lines among them), or None where it cannot
    be read."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def has_native_bf16(flags: set[str]) -> bool:
    """True where these ``cpu_flags()`` name native bfloat16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    return bool(flags & set(NATIVE_BF16_FLAGS))


def cpu_supports_bf16() -> bool:
    """True where this machine's CPU has native bfloat16 arithmetic."""
    return has_native_bf16(cpu_flags() or set())


def bf16_outpaces_fp32(flags: set[str]) -> bool:
    """True where bf16-mixed trains faster than 32-true on the CPU of these ``cpu_flags()``, as far as they tell:
    AMX-BF16, or AVX512-BF16 on an AMD CPU.

    Native bf16 instructions alone are not enough. Side by side (``bench/throughput.py``), bf16-mixed trained
    ResNet-50 1.5x and VGG-16 2.8x as fast as fp32 on an Intel Xeon with AMX, 1.7x to 2.2x and 1.8x to 1.9x
    on AMD EPYCs with AVX512-BF16, but 0.80x and 0.74x to 0.82x on an Intel Xeon whose flags show AVX512-BF16
    without AMX (RESULTS.md, "An Intel Xeon with bf16 but without AMX").
    """
    return "amx_bf16" in flags or ("avx512_bf16" in flags and "AuthenticAMD" in flags)


def slow_bf16_warning(precision: str, on_cpu: bool) -> str | None:
    """A one-line warning where bf16 is asked of an x86 CPU that trains it slower than fp32, else None.

    Results stay correct, only slower. Without bf16 instructions every bf16 product is emulated: ResNet-50
    trained 12x slower in bf16-mixed than in fp32 on a 2-core AMD EPYC with AVX2 only (``bench/throughput.py
    --emulated-bf16``; RESULTS.md, "A slower CPU without bf16: CPU family 23"). With AVX512-BF16 but neither
    AMX nor an AMD vendor, see ``bf16_outpaces_fp32``.
    Only a readable ``/proc/cpuinfo`` of an x86 CPU is judged; elsewhere the flags say nothing.
    """
    # Lightning trains a CPU's 16-mixed as bf16-mixed (fp16 autocast is for GPUs).
    flags = cpu_flags() if on_cpu and precision in ("bf16-mixed", "bf16-true", "16-mixed") else None
    if not flags or "sse2" not in flags or bf16_outpaces_fp32(flags):  # sse2: every x86-64 CPU
        return None
    asked = "16-mixed (bf16-mixed on a CPU)" if precision == "16-mixed" else precision
    if not has_native_bf16(flags):
        return (f"this CPU has no bf16 instructions (neither {' nor '.join(NATIVE_BF16_FLAGS)} in /proc/cpuinfo), "
                f"so --precision {asked} is emulated and many times slower than 32-true (12x for ResNet-50 "
                "on one such CPU); --precision auto chooses 32-true here")
    return (f"this CPU has avx512_bf16 but no amx_bf16 in /proc/cpuinfo and is not an AMD CPU, and --precision "
            f"{asked} trained slower than 32-true on such a CPU (0.74x to 0.82x the speed for ResNet-50 and VGG-16 "
            "on an Intel Xeon); --precision auto chooses 32-true here")


PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")  # --precision of train.py and evaluate.py


def resolve_precision(precision: str, accelerator: str) -> str:
    """``"auto"`` becomes ``"bf16-mixed"`` where the device trains bf16 faster than fp32, else ``"32-true"``."""
    if precision != "auto":
        return precision
    import torch

    wants_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if wants_gpu:
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if bf16_outpaces_fp32(cpu_flags() or set()) else "32-true"


def autocast_for(precision: str, device_type: str):
    """The autocast under which Lightning runs a ``*-mixed`` precision's forward pass on ``device_type``; for the
    ``*-true`` precisions, which convert the weights instead, a context that does nothing."""
    import contextlib

    import torch

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()


def trains_on_cpu(accelerator: str) -> bool:
    """True where ``--accelerator`` leaves training on the CPU (``auto`` without a CUDA or Apple GPU)."""
    import torch

    if accelerator != "auto":
        return accelerator == "cpu"
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a UserError (data and checkpoint errors included) becomes one line on stderr and exit code 2.

    ``--debug`` anywhere on the command line shows the traceback instead. A reader that stops early
    (``evaluate.py ... | head -1``) ends the run quietly with exit code 1, as other command-line tools do.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        status = main(arguments)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit where it cannot be caught
        return status
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's own final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except UserError as error:
        if "--debug" in arguments:
            traceback.print_exc()
        prog = Path(sys.argv[0]).name or "cli"
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


RUN_INFO_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # the times in run_info.json


def read_run_info(path: Path) -> dict:
    """A run folder's ``run_info.json``; empty when it is missing or unreadable."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def launch_history(run_info: dict) -> list[dict]:
    """The launches (command, start, end, status) a run_info.json records; one for a record without that list."""
    if "launches" in run_info:
        return list(run_info["launches"])
    fields = ("command", "started", "ended", "status", "precision", "resumed_from")
    return [{key: run_info[key] for key in fields if key in run_info}] if run_info.get("started") else []


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def check_output_file(path: Path, flag: str) -> None:
    """Refuse, before any work, an output ``path`` that is a folder or lies where no file can be made.

    Missing folders on the way are fine (the writers make them); nothing is created here.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: the folder {existing} is not writable; choose another place")


def is_not_a_library_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def quiet_library_notices() -> None:
    """Keep lines that no user can act on, or should not, out of the output of every run and benchmark.

    Lightning 2.6 still builds ``LeafSpec`` objects, which recent torch releases
    deprecate with a FutureWarning at each fit and test; Lightning prints a tip
    recommending an extra logging package whenever it is not installed; and on
    a machine of more than two cores it suggests DataLoader workers for every
    loader, where this project's images are already decoded in memory and
    augmented a batch at a time on the training device, so workers would only
    add copies between processes. The filters are installed once however often
    this runs in one process.
    """
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(is_not_a_library_tip)
