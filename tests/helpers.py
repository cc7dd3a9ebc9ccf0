"""Running the project's scripts as a user would, and reading what they wrote."""

from __future__ import annotations

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


def run_in_process(script: str, *args, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` without a new interpreter: the script's ``main`` through ``run_main``, as its
    ``__main__`` block calls it, with ``sys.argv`` as the script would see it.

    For refusals that come before any training: a fresh interpreter spends seconds importing torch and
    Lightning before it can refuse. The exit-code plumbing itself is tested through real subprocesses.
    """
    import importlib
    import runpy

    from cli import run_main

    arguments = [str(argument) for argument in args]
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *arguments])
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # what seeding sets, undone after the test
        monkeypatch.delenv(name, raising=False)
    if script.startswith("bench/"):  # loaded by path (``bench/data.py`` is no importable ``data``), not run
        monkeypatch.syspath_prepend(str(ROOT / "bench"))
        main = runpy.run_path(str(ROOT / script))["main"]
    else:
        main = importlib.import_module(Path(script).stem).main
    capsys.readouterr()
    try:
        code = run_main(main, arguments)
    except SystemExit as stop:  # argparse refusing a flag
        code = stop.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([script, *arguments], code, out, err)


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
    """No flag's help gives its default in words and then again as argparse's ``(default: ...)``."""
    assert not re.search(r"\(default: [^)]*\) \(default:", " ".join(help_text.split())), "a default stated twice"
