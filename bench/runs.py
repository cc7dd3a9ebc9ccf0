"""Read finished train.py runs back from their folders: run_info.json plus TensorBoard scalars."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

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


def run_summary(run_dir: Path) -> dict:
    """Model, epochs, wall time, best val/acc, test/acc and command of one run folder."""
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
    started = info.get("started")
    ended = info.get("ended")
    wall_minutes = None
    if started and ended:
        fmt = "%Y-%m-%dT%H:%M:%S%z"
        wall_minutes = (datetime.strptime(ended, fmt) - datetime.strptime(started, fmt)).total_seconds() / 60
    epoch_seconds = [value for _, _, value in series.get("perf/epoch_seconds", [])]
    return {
        "run": f"{run_dir.parent.name}/{run_dir.name}",
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
        "started": started,
    }
