"""Running the project's scripts as a user would, and reading what they wrote."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args, cwd: Path | None = None, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` from the project root (or ``cwd``), output captured as text."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def run_in_process(script: str, *args) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` without a new interpreter: the script's ``main`` through ``run_main``, as its
    ``__main__`` block calls it, with ``sys.argv`` as the script would see it and its output captured.

    A fresh interpreter spends 4 to 8 seconds here importing torch and Lightning before it does anything;
    most of the suite's script runs need nothing that only a process of their own gives. Signals, kills,
    exit codes and DDP are tested in processes of their own (``ForkedProcess``, ``run_script``). What a run
    changes in this process is undone: the environment variables that seeding and train.py set, and
    PyTorch's deterministic-algorithms switch.
    Lightning's log lines reach the captured stderr as they reach a terminal's (under pytest they would
    otherwise go to pytest's log capture), so a test of "one line" sees them too.
    """
    import contextlib
    import importlib
    import io
    import logging
    import runpy

    import pytest
    import torch

    from cli import run_main
    from train import RUN_VERSION_VARIABLE

    arguments = [str(argument) for argument in args]
    out, err = io.StringIO(), io.StringIO()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [str(ROOT / script), *arguments])
        for name in ("pytorch_lightning", "lightning_fabric"):  # as each sets itself up outside pytest
            library_logger = logging.getLogger(name)
            patch.setattr(library_logger, "handlers", [logging.StreamHandler(err)])
            patch.setattr(library_logger, "propagate", False)
        for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG", RUN_VERSION_VARIABLE):
            patch.setenv(name, "")  # recorded, so that undoing the patch restores or removes what the run sets
            patch.delenv(name)
        if script.startswith("bench/"):  # loaded by path (``bench/data.py`` is no importable ``data``), not run
            patch.syspath_prepend(str(ROOT / "bench"))
            main = runpy.run_path(str(ROOT / script))["main"]
        else:
            main = importlib.import_module(Path(script).stem).main
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = run_main(main, arguments)
                except SystemExit as stop:  # argparse refusing a flag
                    code = stop.code
        finally:
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    return subprocess.CompletedProcess([script, *arguments], code, out.getvalue(), err.getvalue())


# What a forked run finds already imported: nearly all of a fresh interpreter's start-up time.
WARM_MODULES = ["torch", "torchvision", "pytorch_lightning", "torchmetrics", "tensorboard"]


@functools.cache
def _forkserver():
    """The forkserver context; its preload list takes effect when the server starts, at the first fork."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WARM_MODULES)
    return context


def _run_as_main(script: str, arguments: list[str], environment: dict[str, str], stdout_path: str,
                 stderr_path: str) -> None:
    """In the forked child: ``python SCRIPT ARGUMENTS`` as far as the script can tell (fds 1 and 2 onto files,
    Python's own SIGINT and SIGTERM handling, the caller's environment, ``sys.argv``, ``__main__``); its
    ``sys.exit`` code is the exit code."""
    import runpy
    import signal
    import traceback

    for fd, path in ((1, stdout_path), (2, stderr_path)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout.reconfigure(line_buffering=True)  # as PYTHONUNBUFFERED: what was printed survives a kill
    sys.stderr.reconfigure(line_buffering=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(ROOT)
    sys.argv = [script, *arguments]
    sys.path.insert(0, str(Path(script).parent))
    try:
        runpy.run_path(script, run_name="__main__")
    except KeyboardInterrupt:  # as Python ends on a Ctrl-C nothing caught: the traceback, then killed by SIGINT
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)


class ForkedProcess:
    """``python SCRIPT ARGS`` in a process of its own, forked from one that has imported torch and Lightning.

    A fresh interpreter spends 4 to 8 seconds here on those imports. The child is a separate process that
    sees this process's environment as it was at the start: a signal it gets or sends itself is real, and
    it ends with the script's exit code, or minus the signal that killed it, as ``subprocess.Popen``
    reports them (this class has the part of Popen's interface the tests use). Its output lands in
    ``output_dir``. Unlike a fresh interpreter it runs no ``atexit`` handlers, so tests of the start-up
    itself, and of a whole interpreter's exit, keep ``run_script``.
    """

    def __init__(self, script: str | Path, *args, output_dir: Path):
        output_dir.mkdir(parents=True, exist_ok=True)
        script = Path(script) if Path(script).is_absolute() else ROOT / script
        self.args = [str(script), *map(str, args)]
        self._output = output_dir / f"{script.stem}.stdout", output_dir / f"{script.stem}.stderr"
        self._process = _forkserver().Process(
            target=_run_as_main, args=(self.args[0], self.args[1:], dict(os.environ), *map(str, self._output)))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, number: int) -> None:
        os.kill(self.pid, number)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end and return (stdout, stderr); after ``timeout`` seconds, kill the run and raise
        ``subprocess.TimeoutExpired``."""
        self._process.join(timeout)
        timed_out = self._process.exitcode is None
        if timed_out:
            self._process.kill()
            self._process.join()
        stdout, stderr = (path.read_text(errors="replace") if path.exists() else "" for path in self._output)
        if timed_out:
            raise subprocess.TimeoutExpired(self.args, timeout, stdout, stderr)
        return stdout, stderr


def run_forked(script: str | Path, *args, output_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """A ``ForkedProcess`` to its end, as ``subprocess.run`` would report it."""
    process = ForkedProcess(script, *args, output_dir=output_dir)
    stdout, stderr = process.communicate(timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def scalar_tags(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar series in the TensorBoard event files of ``run_dir``: tag -> values in step order."""
    from bench.runs import scalars

    return {tag: [value for _, _, value in sorted(points, key=lambda point: point[1])]
            for tag, points in scalars(run_dir).items()}


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_each_default_stated_once(help_text: str) -> None:
    """No flag's help gives its default in words and then again as argparse's ``(default: ...)``, and no
    default reads as Python (``None``, ``False``, a list's brackets) rather than as a user would type it."""
    text = " ".join(help_text.split())
    assert not re.search(r"default: [^)]*\) \(default:", text), "a default stated twice"
    assert not re.search(r"\(default: (None|False|\[)", text), "a default in Python's words"
