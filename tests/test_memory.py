"""The training step's memory, measured before training, and the refusal of a batch that cannot fit."""

import json

import pytest
import torch

import lit_modules.memory as memory
from models import get_model
from tests.conftest import TINY_RUN
from tests.helpers import assert_one_line_error, run_in_process


def test_the_measure_leaves_the_network_as_it_was():
    network = get_model("resnet50")
    before = {name: value.clone() for name, value in network.state_dict().items()}
    memory.training_memory(network, "32-true")
    after = network.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # BatchNorm running statistics too


def test_the_measure_leaves_the_random_stream_as_it_was():
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Dropout(0.5), torch.nn.Flatten(),
                                  torch.nn.Linear(8 * 30 * 30, 10))
    torch.manual_seed(0)
    memory.training_memory(network, "32-true")
    after_measure = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_measure, torch.rand(3))


def test_what_a_step_keeps_grows_with_the_image_and_shrinks_with_the_precision():
    network = get_model("vgg16")
    small = memory.training_memory(network, "32-true", image_size=32)
    large = memory.training_memory(network, "32-true", image_size=64)
    assert 3.5 < large.per_image / small.per_image < 4.5  # four times the pixels at every layer but the classifier
    half = memory.training_memory(network, "bf16-true")
    assert 1.8 < small.per_image / half.per_image <= 2  # 2-byte elements; max-pool indices stay 8 bytes
    weights = sum(parameter.numel() * 4 for parameter in network.parameters())
    assert memory.OPTIMISER_COPIES * weights <= small.fixed < (memory.OPTIMISER_COPIES + 1) * weights


def test_batch_arithmetic():
    step = memory.TrainingMemory(fixed=1000, per_image=10)
    assert step.for_batch(16) == 1160
    assert step.largest_batch(1160) == 16 and step.largest_batch(1169) == 16
    assert step.largest_batch(500) == 0


GROUP_FILES = {"v2": ("memory.max", "memory.current"), "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes")}


def write_group(folder, version, limit, usage, stat):
    folder.mkdir(parents=True, exist_ok=True)
    limit_file, usage_file = GROUP_FILES[version]
    (folder / limit_file).write_text(f"{limit}\n")
    (folder / usage_file).write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(stat)


def test_a_cgroup_v2_limit_counts_less_its_usage_with_page_cache_as_free(tmp_path):
    membership = tmp_path / "cgroup"
    membership.write_text("0::/job/step\n")
    write_group(tmp_path / "job", "v2", "max", 0, "anon 0\ninactive_file 0\n")
    write_group(tmp_path / "job" / "step", "v2", 8000, 5000, "anon 4000\ninactive_file 1000\n")
    assert memory.cgroup_headroom(membership, root=tmp_path) == 8000 - 5000 + 1000
    write_group(tmp_path / "job", "v2", 4500, 4000, "anon 4000\ninactive_file 0\n")  # a tighter parent wins
    assert memory.cgroup_headroom(membership, root=tmp_path) == 500
    write_group(tmp_path / "job" / "step", "v2", "max", 5000, "inactive_file 0\n")
    write_group(tmp_path / "job", "v2", "max", 0, "inactive_file 0\n")
    assert memory.cgroup_headroom(membership, root=tmp_path) is None


def test_a_cgroup_v1_limit_is_read_and_its_no_limit_value_ignored(tmp_path):
    membership = tmp_path / "cgroup"
    membership.write_text("5:cpu,cpuacct:/\n4:memory:/docker/abc\n0::/\nnot a membership line\n")
    write_group(tmp_path / "memory" / "docker" / "abc", "v1", 2**30, 2**29,
                f"inactive_file 7\ntotal_inactive_file {2**20}\n")
    assert memory.cgroup_headroom(membership, root=tmp_path) == 2**30 - 2**29 + 2**20
    write_group(tmp_path / "memory" / "docker" / "abc", "v1", 9223372036854771712, 2**29, "total_inactive_file 0\n")
    assert memory.cgroup_headroom(membership, root=tmp_path) is None


def test_inside_a_container_the_mount_is_the_groups_own_folder(tmp_path):
    membership = tmp_path / "cgroup"
    membership.write_text("4:memory:/kubepods/pod1/abc\n")  # a name seen from the host, absent in the container
    write_group(tmp_path / "memory", "v1", 3000, 1000, "total_inactive_file 0\n")
    assert memory.cgroup_headroom(membership, root=tmp_path) == 2000
    assert memory.cgroup_headroom(tmp_path / "no-such-file", root=tmp_path) is None


def test_free_cpu_memory_is_the_smaller_of_the_machines_and_the_cgroups(monkeypatch):
    monkeypatch.setattr(memory, "cgroup_headroom", lambda: None)
    machine = memory.free_memory(torch.device("cpu"))  # MemAvailable alone
    assert machine is not None and machine > 0
    monkeypatch.setattr(memory, "cgroup_headroom", lambda: 12345)
    assert memory.free_memory(torch.device("cpu")) == 12345
    monkeypatch.setattr(memory, "cgroup_headroom", lambda: 2**62)
    assert memory.free_memory(torch.device("cpu")) == pytest.approx(machine, rel=0.2)


@pytest.fixture
def free_memory_of(monkeypatch):
    """Make train.py see as free the memory of ``batches`` images' training step (per process), as measured for its run."""
    measured = {}
    training_memory = memory.training_memory

    def measure(*args, **kwargs):
        measured["step"] = training_memory(*args, **kwargs)
        return measured["step"]

    def set_free(batches: int, processes: int = 1) -> None:
        monkeypatch.setattr(memory, "training_memory", measure)
        monkeypatch.setattr(memory, "free_memory", lambda device: measured["step"].for_batch(batches) * processes)

    return set_free


@pytest.mark.parametrize("batches, processes, fragment", [
    (10, 1, "free to this process; use a --batch-size well below 10"),
    (0, 1, "free to this process; the network does not fit at any batch size"),
    (10, 2, "free to each of the 2 processes; use a --batch-size well below 10"),
])
def test_a_batch_that_cannot_fit_is_refused_before_the_run(free_memory_of, image_folder, tmp_path, batches, processes,
                                                            fragment):
    free_memory_of(batches, processes)
    result = run_in_process("train.py", "--data-dir", image_folder, "--cache-dir", tmp_path / "cache",
                            "--logdir", tmp_path / "logs", "--precision", "32-true", "--devices", processes,
                            *(["--strategy", "ddp"] if processes > 1 else []), *TINY_RUN)
    assert_one_line_error(result, "--batch-size 16 needs at least ", " MiB an image), more than the ", fragment)
    assert not list((tmp_path / "logs").glob("version_*"))


def test_a_batch_that_fits_trains(free_memory_of, image_folder, tmp_path):
    free_memory_of(16)
    result = run_in_process("train.py", "--data-dir", image_folder, "--cache-dir", tmp_path / "cache",
                            "--logdir", tmp_path / "logs", "--precision", "32-true", "--fast-dev-run", *TINY_RUN)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 140737488355328 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_running_out_of_memory_in_training_is_one_line_and_recorded(monkeypatch, image_folder, tmp_path, error):
    import pytorch_lightning as pl

    import train

    class OutOfMemory(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            raise error

    build_callbacks = train.build_callbacks

    def with_out_of_memory(*args):
        callbacks, best_checkpoint = build_callbacks(*args)
        return callbacks + [OutOfMemory()], best_checkpoint

    monkeypatch.setattr(train, "build_callbacks", with_out_of_memory)
    logdir = tmp_path / "logs"
    result = run_in_process("train.py", "--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--logdir", logdir,
                            "--precision", "32-true", *TINY_RUN)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("train.py: error: cpu ran out of memory at --batch-size 16 "
                                                      "during training; lower --batch-size")
    info = json.loads((logdir / "version_0" / "run_info.json").read_text())
    assert info["status"] == "failed" and info["error"].startswith(type(error).__name__ + ": ")
