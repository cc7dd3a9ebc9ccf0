"""The throughput benchmark runs end to end and prints well-formed ratio tables (its speeds are not asserted)."""

from cli import resolve_precision
from tests.helpers import run_script

TINY = ("--models", "resnet50_seed", "--steps", "2", "--warmup", "1", "--repeats", "1", "--batch-size", "8")


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
    result = run_script("bench/throughput.py", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    overhead, levers = table_rows(result.stdout)
    assert overhead["model"] == levers["model"] == "resnet50_seed" and overhead["batch"] == "8"
    assert float(overhead["(a) Trainer"]) > 0 and float(overhead["(b) plain loop"]) > 0
    assert_ratio_within_quartiles(overhead["ratio a/b"], overhead["quartiles"])
    if resolve_precision("auto", "cpu") == "bf16-mixed":
        assert float(levers["bf16"]) > 0 and float(levers["bf16/fp32"]) > 0
    else:  # no bf16 instructions: train.py trains in fp32, and the table says bf16 was not measured
        assert (levers["bf16"], levers["bf16/fp32"]) == ("no native bf16", "-")
    assert float(levers["fp32"]) > 0 and float(levers["channels-last/first"]) > 0
    assert float(levers["with EMA"]) > 0 and float(levers["with/without EMA"]) > 0


def test_size_sweep_gives_the_first_size_a_cost_of_one():
    result = run_script("bench/throughput.py", *TINY, "--size-sweep", "32", "48")
    assert result.returncode == 0, result.stderr[-3000:]
    base, larger = table_rows(result.stdout)
    assert (base["input"], larger["input"]) == ("32x32", "48x48")
    assert base["time per image vs 32x32"] == "1.000" and base["quartiles"] == "1.000-1.000"
    assert_ratio_within_quartiles(larger["time per image vs 32x32"], larger["quartiles"])
