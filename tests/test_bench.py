"""The throughput benchmark runs end to end and prints well-formed ratio tables (its speeds are not asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

from cli import cpu_supports_bf16
from tests.helpers import ROOT, assert_each_default_stated_once, assert_one_line_error, run_in_process

# three timed rounds: the quartiles of two values would be extrapolated beyond them
TINY = ("--models", "resnet50_seed", "--steps", "3", "--warmup", "1", "--repeats", "1", "--batch-size", "8")


def table_rows(stdout: str) -> list[dict[str, str]]:
    """Every Markdown table row in the output, as header -> cell."""
    rows, header = [], None
    for line in stdout.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(cells[0]) <= {"-"}:
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def assert_ratio_within_quartiles(ratio: str, quartiles: str) -> None:
    low, high = map(float, quartiles.split("-"))
    assert 0 < low <= float(ratio) <= high


def test_throughput_pairs_the_trainer_with_the_plain_loop_and_the_levers_step_by_step():
    result = run_in_process("bench/throughput.py", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "litlogger" not in result.stdout + result.stderr  # a library tip no user can act on
    overhead, levers = table_rows(result.stdout)
    assert overhead["model"] == levers["model"] == "resnet50_seed" and overhead["batch"] == "8"
    assert float(overhead["(a) Trainer"]) > 0 and float(overhead["(b) plain loop"]) > 0
    assert_ratio_within_quartiles(overhead["ratio a/b"], overhead["quartiles"])
    # own work: a step less its forward pass, backward pass and update; the Trainer's includes fetching and logging
    trainer_own, plain_own = float(overhead["(a) own ms"]), float(overhead["(b) own ms"])
    batch = int(overhead["batch"])
    assert 0 < plain_own < 1000 * batch / float(overhead["(b) plain loop"])  # a part of the median step's ms
    assert 0 < trainer_own < 1000 * batch / float(overhead["(a) Trainer"])
    assert overhead["Trainer's cost"].endswith("%") and -100 < float(overhead["Trainer's cost"].rstrip("%")) < 100
    if cpu_supports_bf16():  # timed even where train.py trains in fp32 because bf16 is slower there
        assert float(levers["bf16"]) > 0 and float(levers["bf16/fp32"]) > 0
    else:  # no bf16 instructions: train.py trains in fp32, and the table says bf16 was not measured
        assert (levers["bf16"], levers["bf16/fp32"]) == ("no native bf16", "-")
    assert float(levers["fp32"]) > 0 and float(levers["channels-last/first"]) > 0
    assert float(levers["with EMA"]) > 0 and float(levers["with/without EMA"]) > 0
    assert float(levers["tiny maps as conv"]) > 0 and float(levers["matrix/conv"]) > 0
    assert float(levers["1x1 as conv"]) > 0 and float(levers["1x1 matrix/conv"]) > 0
    assert float(levers["weight grads as conv"]) > 0 and float(levers["weight grads matrix/conv"]) > 0


def test_throughput_times_bf16_on_a_cpu_without_it_only_when_asked_and_marks_it_emulated():
    result = run_in_process("bench/throughput.py", "--models", "resnet50_seed", "--steps", "2", "--warmup", "0",
                            "--repeats", "1", "--batch-size", "4", "--emulated-bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    levers = table_rows(result.stdout)[1]
    speed = levers["bf16"]
    if not cpu_supports_bf16():  # no bf16 instructions: timed, and said to be emulated
        assert speed.endswith(" (emulated)")
        speed = speed.removesuffix(" (emulated)")
    assert float(speed) > 0 and float(levers["bf16/fp32"]) > 0


def test_size_sweep_gives_the_first_size_a_cost_of_one():
    result = run_in_process("bench/throughput.py", *TINY, "--size-sweep", "32", "48")
    assert result.returncode == 0, result.stderr[-3000:]
    base, larger = table_rows(result.stdout)
    assert (base["input"], larger["input"]) == ("32x32", "48x48")
    assert base["time per image vs 32x32"] == "1.000" and base["quartiles"] == "1.000-1.000"
    assert_ratio_within_quartiles(larger["time per image vs 32x32"], larger["quartiles"])


def test_batch_sweep_compares_images_per_second_with_the_first_batch_size():
    result = run_in_process("bench/throughput.py", *TINY, "--batch-sweep", "4", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    base, larger = table_rows(result.stdout)
    assert (base["batch"], larger["batch"]) == ("4", "8") and float(larger["images/s"]) > 0
    assert base["images/s vs batch 4"] == "1.000" and base["quartiles"] == "1.000-1.000"
    assert_ratio_within_quartiles(larger["images/s vs batch 4"], larger["quartiles"])


def test_flop_rate_counts_the_forward_and_backward_passes_and_compares_them_with_a_matrix_product():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import get_model

    result = run_in_process("bench/throughput.py", *TINY, "--flop-rate", "--matrix-size", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = table_rows(result.stdout)
    assert row["model"] == "resnet50_seed" and float(row["images/s"]) > 0
    model = get_model("resnet50_seed")
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32))
    forward = counter.get_total_flops()
    stem = 2 * model.conv1.weight[0].numel() * model.conv1.out_channels * 16 * 16  # 7x7/2 stem: 16x16 outputs
    # backward: an input and a weight gradient per layer, each as costly as its forward; the stem needs no input gradient
    assert float(row["training GFLOP per image"]) == pytest.approx((3 * forward - stem) / 1e9, abs=6e-4)
    assert float(row["step GFLOP/s"]) > 0 and float(row["product GFLOP/s"]) > 0
    assert_ratio_within_quartiles(row["step/product"], row["quartiles"])


@pytest.mark.parametrize("script, a_default", [("throughput", "(default: 128)"), ("data", "(default: 45000)"),
                                               ("plot_results", "(default: docs/val_acc_vs_time.png)"),
                                               ("summarize", "lightning_logs/version_N folders")])
def test_help_answers_without_importing_torch(script, a_default):
    """The benchmarks import torch and Lightning (seconds) only after their flags are read."""
    code = ("import runpy, sys\n"
            f"sys.path.insert(0, 'bench'); sys.argv = ['bench/{script}.py', '--help']\n"
            "try: runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as stop: assert stop.code == 0, stop.code\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}.py") and a_default in " ".join(result.stdout.split())
    assert_each_default_stated_once(result.stdout)
    assert result.stdout.splitlines()[-1] == "False"


@pytest.mark.parametrize(
    "script, args, fragment",
    [
        ("throughput", ["--models", "resnet18"], "--models: unknown model resnet18; choose from resnet50, resnet50_seed, vgg16"),
        ("data", ["--models", "resnet50", "vgg19"], "--models: unknown model vgg19"),
        ("throughput", ["--steps", "0"], "--steps: must be a positive integer, got 0"),
        ("data", ["--batch-size", "-8"], "--batch-size: must be a positive integer, got -8"),
        ("throughput", ["--batch-sweep", "128", "0"], "--batch-sweep: must be a positive integer, got 0"),
        ("throughput", ["--size-sweep", "32", "--batch-sweep", "128"], "--batch-sweep: not allowed with argument --size-sweep"),
        ("throughput", ["--matrix-size", "512"], "--matrix-size: only with --flop-rate"),
        ("plot_results", ["no/such/run"], "argument runs: no/such/run: no such folder"),
        ("summarize", ["README.md"], "argument runs: README.md: a file, not a folder"),
    ],
)
def test_bad_flags_get_one_line_and_exit_2(script, args, fragment):
    result = run_in_process(f"bench/{script}.py", *args)
    assert_one_line_error(result, f"{script}.py: error: ", fragment)


def test_run_names_show_as_much_of_each_path_as_tells_the_runs_apart():
    from bench.runs import run_names

    folders = [Path("a/lightning_logs/version_1"), Path("b/lightning_logs/version_1"), Path("lightning_logs/version_2"),
               Path("lightning_logs/version_2"), Path("/version_3")]
    assert run_names(folders) == ["a/lightning_logs/version_1", "b/lightning_logs/version_1",
                                  "lightning_logs/version_2", "lightning_logs/version_2", "/version_3"]
