"""Draw validation accuracy against wall time for train.py runs, from their TensorBoard logs.

    python bench/plot_results.py lightning_logs/version_0 lightning_logs/version_1 --out docs/val_acc_vs_time.png

Time runs from each run's start (run_info.json), so data loading and set-up
count; a resumed run's pauses between launches do not. A star marks the test
accuracy where the whole train.py run ended. Each label carries the run's date,
since the same CPU has run at different speeds on different days, and as much of
the run folder's path as tells it from the other runs drawn.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import _path  # noqa: F401  (puts the project root on sys.path)
from cli import ArgumentParser, UserError, check_output_file, existing_folder, run_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=existing_folder, help="lightning_logs/version_N folders")
    parser.add_argument("--out", type=Path, default=Path("docs/val_acc_vs_time.png"), help="the PNG to write")
    parser.add_argument("--title", default="CIFAR-10 (JPEG copy): validation accuracy against wall time",
                        help="the figure's title")
    args = parser.parse_args(argv)
    check_output_file(args.out, "--out")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.runs import run_names, run_summary, running_minutes

    figure, axes = plt.subplots(figsize=(8, 5))
    # The default cycle repeats after 10 colours; 20 distinct ones, and dashes for VGG-16, keep every curve apart.
    # tab20 comes in dark/light pairs of one hue: the 10 dark ones first, so that neighbouring runs differ in hue.
    colours = plt.get_cmap("tab20").colors[0::2] + plt.get_cmap("tab20").colors[1::2]
    drawn, skipped = 0, []
    for index, (run_dir, name) in enumerate(zip(args.runs, run_names(args.runs))):
        summary = run_summary(run_dir)
        points = summary["val_acc_points"]
        if not points:  # not a run folder, or a run without validation (--val-size 0)
            skipped.append(str(run_dir))
            continue
        drawn += 1
        spans = summary["spans"] or [(points[0][0], float("inf"))]  # no run_info.json: time from the first point
        minutes = [running_minutes(spans, wall) for wall, _, _ in points]
        is_vgg = summary["model"] == "vgg16"
        network = "vgg16" if is_vgg else f"{summary['model']} ({summary['stem']} stem)"
        day = summary["started"][:10] if summary["started"] else "date unknown"
        label = (f"{network}, {summary['input_size']} px, {summary['epochs']} epochs, lr {summary['lr']}"
                 f" - {name}, {day}")
        colour = colours[index % len(colours)]
        axes.plot(minutes, [100 * value for _, _, value in points], marker="o", markersize=3, label=label,
                  color=colour, linestyle="--" if is_vgg else "-")
        if summary["test_acc"] is not None and summary["wall_minutes"] is not None:
            axes.plot([summary["wall_minutes"]], [100 * summary["test_acc"]], marker="*", markersize=11, color=colour,
                      linestyle="none")
    if not drawn:
        named = f"{skipped[0]} holds no" if len(skipped) == 1 else f"none of {', '.join(skipped)} holds a"
        raise UserError(f"{named} val/acc curve in TensorBoard events; "
                        "give lightning_logs/version_N folders of runs with validation")
    for run_dir in skipped:
        print(f"plot_results.py: skipped {run_dir}: no val/acc in its TensorBoard events", file=sys.stderr)
    for level in (80, 85, 90):
        axes.axhline(level, color="grey", linewidth=0.5, linestyle="--")
    axes.set_xlabel("wall time since start (minutes)")
    axes.set_ylabel("validation accuracy (%); star: test accuracy at the run's end")
    axes.set_title(args.title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(args.out, dpi=110)
    except OSError as error:
        raise UserError(f"--out {args.out}: could not write it ({error.strerror or error})") from None
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
