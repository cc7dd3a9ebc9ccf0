"""Print a Markdown table of train.py runs (for RESULTS.md) from their folders.

    python bench/summarize.py lightning_logs/version_0 lightning_logs/version_1
"""

from __future__ import annotations

import sys
from typing import Sequence

import _path  # noqa: F401  (puts the project root on sys.path)
from cli import ArgumentParser, UserError, existing_folder, run_main


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def cell(value) -> str:
    return "-" if value is None else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=existing_folder, help="lightning_logs/version_N folders")
    args = parser.parse_args(argv)
    from bench.common import markdown_table
    from bench.runs import run_names, run_summary

    rows, skipped = [], []
    for run_dir, name in zip(args.runs, run_names(args.runs)):
        s = run_summary(run_dir)
        if s["model"] is None and s["command"] is None:  # neither hparams.yaml nor run_info.json
            skipped.append(str(run_dir))
            continue
        rows.append([
            cell(s["model"]), cell(s["stem"]), f"{s['optimizer']} lr {s['lr']}, {s['input_size']} px", cell(s["epochs"]),
            cell(s["precision"]),
            "-" if s["wall_minutes"] is None else f"{s['wall_minutes']:.1f} min",
            "-" if s["median_epoch_seconds"] is None else f"{s['median_epoch_seconds']:.0f} s",
            percent(s["best_val_acc"]), percent(s["test_acc"]), name, f"`{s['command']}`" if s["command"] else "-",
        ])
    reason = "(no hparams.yaml or run_info.json)"
    if not rows:
        named = f"{skipped[0]} is not" if len(skipped) == 1 else f"none of {', '.join(skipped)} is"
        raise UserError(f"{named} a train.py run folder {reason}; give lightning_logs/version_N folders")
    for run_dir in skipped:
        print(f"summarize.py: skipped {run_dir}: not a train.py run folder {reason}", file=sys.stderr)
    print(markdown_table(["model", "stem", "recipe", "epochs", "precision", "wall time", "epoch (median)",
                          "best val acc %", "test acc %", "log", "command"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
