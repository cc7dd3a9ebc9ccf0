"""Read finished train.py runs back from their folders: run_info.json plus TensorBoard scalars."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Sequence

from cli import RUN_INFO_TIME_FORMAT, launch_history
from datamodules.cifar10 import IMAGE_SIZE


def scalars(run_dir: Path) -> dict[str, list[tuple[float, int, float]]]:
    """tag -> [(wall_time, step, value)] over every event file of the run, in time order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[float, int, float]]] = {}
    for event_file in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.wall_time, e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(points) for tag, points in series.items()}


def timestamp(text: str | None) -> float | None:
    return datetime.strptime(text, RUN_INFO_TIME_FORMAT).timestamp() if text else None


def running_spans(info: dict, series: dict[str, list[tuple[float, int, float]]]) -> list[tuple[float, float]]:
    """(start, end) timestamps of each launch of a run: a resumed run's pauses are not running time.

    A launch with no recorded end (killed hard) ends at its last TensorBoard event.
    """
    launches = launch_history(info)
    event_times = sorted(wall for points in series.values() for wall, _, _ in points)
    spans = []
    for index, launch in enumerate(launches):
        start = timestamp(launch.get("started"))
        if start is None:
            continue
        end = timestamp(launch.get("ended"))
        if end is None:
            following = timestamp(launches[index + 1].get("started")) if index + 1 < len(launches) else float("inf")
            during = [wall for wall in event_times if start <= wall < following]
            end = during[-1] if during else start
        spans.append((start, end))
    return spans


def running_minutes(spans: list[tuple[float, float]], wall: float) -> float:
    """Minutes of running time from the run's start up to the timestamp ``wall``."""
    return sum(max(0.0, min(wall, end) - start) for start, end in spans) / 60


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """A short name for each run folder: its last two path parts, more where two folders would read alike.

    ["a/lightning_logs/version_1", "b/lightning_logs/version_1"] stay apart, where "lightning_logs/version_1" twice
    would not; the same folder given twice keeps one name.
    """
    parts = [Path(os.path.abspath(run_dir)).parts for run_dir in run_dirs]
    depths = [min(2, len(each)) for each in parts]
    while True:
        names = [Path(*each[len(each) - depth:]).as_posix() for each, depth in zip(parts, depths)]
        folders_named: dict[str, set[tuple[str, ...]]] = {}
        for name, each in zip(names, parts):
            folders_named.setdefault(name, set()).add(each)
        # folders whose name another, different folder shares, and that have parts left to show
        alike = [index for index, name in enumerate(names)
                 if len(folders_named[name]) > 1 and depths[index] < len(parts[index])]
        if not alike:
            return names
        for index in alike:
            depths[index] += 1


def run_summary(run_dir: Path) -> dict:
    """Model, epochs, running time (without a resumed run's pauses), best val/acc, test/acc and command of one run folder."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run_info.json").read_text()) if (run_dir / "run_info.json").is_file() else {}
    hparams_file = run_dir / "hparams.yaml"
    hparams = {}
    if hparams_file.is_file():
        import yaml

        hparams = yaml.safe_load(hparams_file.read_text()) or {}
    series = scalars(run_dir)
    val = [value for _, _, value in series.get("val/acc", [])]
    test = [value for _, _, value in series.get("test/acc", [])]
    spans = running_spans(info, series)
    wall_minutes = sum(end - start for start, end in spans) / 60 if spans else None
    epoch_seconds = [value for _, _, value in series.get("perf/epoch_seconds", [])]
    return {
        "model": hparams.get("model_name"),
        "stem": (hparams.get("model_options") or {}).get("stem", "-"),
        "optimizer": hparams.get("optimizer"),
        "lr": hparams.get("lr"),
        "input_size": hparams.get("input_size") or IMAGE_SIZE,
        "epochs": info.get("epochs") or len(val),
        "precision": info.get("precision"),
        "wall_minutes": wall_minutes,
        "median_epoch_seconds": sorted(epoch_seconds)[len(epoch_seconds) // 2] if epoch_seconds else None,
        "best_val_acc": max(val) if val else None,
        "test_acc": test[-1] if test else info.get("test_acc"),
        "status": info.get("status"),
        "command": info.get("command"),
        "started": info.get("started"),
        "spans": spans,
        "val_acc_points": series.get("val/acc", []),
    }
