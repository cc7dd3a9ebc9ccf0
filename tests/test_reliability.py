"""Nothing lost on interruption, clear errors for bad input, the same result twice, and DDP."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import onnx
import pytest
import torch

from bench.runs import scalars
from lit_modules.callbacks import MID_VALIDATION_RESTART
from tests.conftest import DETERMINISTIC_RUN, TINY_RUN, deterministic_train
from tests.helpers import ROOT, ForkedProcess, assert_one_line_error, run_forked, run_in_process, scalar_tags

SMALL = ("--model", "resnet50_seed", "--precision", "32-true", *TINY_RUN)


def start_training(*args, cwd=ROOT) -> subprocess.Popen:
    """train.py in a child process that takes SIGINT as from a terminal.

    A suite started in the background (``pytest &``) inherits SIGINT ignored, as
    shells set it for background jobs; the child resets it so Ctrl-C tests still apply.
    """
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *map(str, args)],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_step(checkpoint, step: int, process: subprocess.Popen | ForkedProcess, timeout: float = 180) -> int:
    """Poll until ``checkpoint`` holds a global step of at least ``step``; returns that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if checkpoint.is_file():
            try:
                saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
            except Exception:
                saved = -1  # being replaced right now: os.replace makes that atomic, but be patient
            if saved >= step:
                return saved
        time.sleep(0.1)
    raise AssertionError(f"{checkpoint} never reached step {step}")


def test_ctrl_c_while_a_checkpoint_is_written_takes_effect_after_the_write(tmp_path, monkeypatch):
    import lit_modules.checkpointing as checkpointing

    real_save = torch.save

    def save_interrupted_midway(obj, stream):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives while the archive is being written
        real_save(obj, stream)

    monkeypatch.setattr(checkpointing.torch, "save", save_interrupted_midway)
    path = tmp_path / "last.ckpt"
    # Python's own Ctrl-C handler, whatever this process inherited (a shell's background job ignores SIGINT).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpointing.AtomicCheckpointIO().save_checkpoint({"weights": torch.arange(5)}, path)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# A scheduler's SIGTERM reaches train.py as a shell starts it; Ctrl-C a run forked without the import wait.
@pytest.mark.parametrize("stop_signal, exit_code, fresh_interpreter",
                         [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)], ids=["SIGTERM", "Ctrl-C"])
def test_interrupted_run_resumes_to_the_planned_epoch_count(image_folder, tmp_path, stop_signal, exit_code,
                                                            fresh_interpreter):
    logdir = tmp_path / "logs"
    planned_epochs = 2
    # Batches of 4 make epochs of 15 steps, so the signal sent after the periodic checkpoint at step 4 lands mid-epoch.
    common = ["--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--logdir", logdir, *SMALL, "--batch-size", "4"]
    planned = [*common, "--epochs", planned_epochs, "--checkpoint-every-n-steps", "4"]
    process = (start_training(*planned) if fresh_interpreter
               else ForkedProcess("train.py", *planned, output_dir=tmp_path / "output"))
    last = logdir / "version_0" / "checkpoints" / "last.ckpt"
    seen = wait_for_step(last, 4, process)
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code, stderr[-3000:]
    assert "Traceback" not in stderr
    interrupted = torch.load(last, map_location="cpu", weights_only=True)
    assert interrupted["global_step"] >= seen and interrupted["epoch"] < planned_epochs - 1
    if stop_signal == signal.SIGTERM:
        assert "stopped by SIGTERM; resume with --ckpt-path" in stderr
        assert json.loads((logdir / "version_0" / "run_info.json").read_text())["status"] == "interrupted"

    resumed = run_in_process("train.py", *common, "--ckpt-path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in logdir.iterdir()) == ["version_0"]
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["epoch"] == planned_epochs - 1 and final["global_step"] == planned_epochs * 15
    assert json.loads((logdir / "version_0" / "run_info.json").read_text())["epochs"] == planned_epochs
    assert len(scalar_tags(logdir / "version_0")["val/acc"]) == planned_epochs  # one validation per epoch


FAULT_RUNNER = textwrap.dedent(
    """
    # train.py's main with one more callback that runs `{fault}` in its hook {hook} when `{when}`.
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import pytorch_lightning as pl
    import train
    from cli import run_main

    class Fault(pl.Callback):
        def {hook}(self, trainer, pl_module, *args):
            if {when}:
                {fault}

    build_callbacks = train.build_callbacks
    train.build_callbacks = lambda *args: (lambda built: (built[0] + [Fault()], built[1]))(build_callbacks(*args))
    sys.exit(run_main(train.main))
    """
)


def fault_runner(path: Path, fault: str, hook: str = "on_train_batch_start",
                 when: str = "trainer.global_step == 5") -> Path:
    """A script at ``path`` that runs train.py with ``fault`` injected (default: as the batch after step 5 starts)."""
    path.write_text(FAULT_RUNNER.format(root=str(ROOT), hook=hook, when=when, fault=fault))
    return path


def test_hard_kill_mid_epoch_resumes_to_the_uninterrupted_result(deterministic_run, image_folder, tmp_path):
    """Killed (SIGKILL) in the middle of epoch 2, resumed from the periodic checkpoint: same weights, same test line.

    The resume names only where things are and how to run, not the recipe: model, epochs, seed, batch size and
    validation split come from the checkpoint.
    """
    reference_weights, reference_line = deterministic_run.weights, deterministic_run.test_line
    logdir = tmp_path / "logs"
    common = ["--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--logdir", logdir, *DETERMINISTIC_RUN]
    runner = fault_runner(tmp_path / "killed_train.py", "os.kill(os.getpid(), signal.SIGKILL)")
    killed = run_forked(runner, *common, "--checkpoint-every-n-steps", "2", output_dir=tmp_path / "output")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = logdir / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)  # whole, never truncated
    assert (saved["global_step"], saved["epoch"]) == (4, 1)  # one of epoch 2's three batches done
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"batches_done": 1}]
    partial = last.parent / ".last.ckpt.k9x2qz7w.tmp"  # as a kill during a checkpoint write leaves
    partial.write_bytes(b"PK\x03\x04 the first bytes")

    location = ["--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--logdir", logdir]
    resumed = run_in_process("train.py", *location, "--deterministic", "--log-every-n-steps", "1", "--progress-refresh", "0",
                             "--accelerator", "cpu", "--ckpt-path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr
    assert f"Removed 1 partial checkpoint file that a kill during a write left in {last.parent}" in resumed.stdout
    assert not partial.exists()
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == 6
    assert all(torch.equal(final["state_dict"][key], reference_weights[key]) for key in reference_weights)
    assert resumed.stdout.strip().splitlines()[-1] == reference_line
    info = json.loads((logdir / "version_0" / "run_info.json").read_text())
    assert [launch["status"] for launch in info["launches"]] == ["killed", "finished"]
    assert "ended" not in info["launches"][0] and info["status"] == "finished"


def test_crash_mid_epoch_is_recorded_and_resumes_to_the_planned_epochs(deterministic_run, image_folder, tmp_path):
    """An exception in epoch 2 saves last.ckpt at the failing step, marks the run failed, and the resume finishes it."""
    reference_weights, reference_line = deterministic_run.weights, deterministic_run.test_line
    logdir = tmp_path / "logs"
    location = ["--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--logdir", logdir]
    runner = fault_runner(tmp_path / "crashing_train.py", "raise RuntimeError('disk controller fault')")
    crashed = run_forked(runner, *location, *DETERMINISTIC_RUN, output_dir=tmp_path / "output")
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    assert "RuntimeError: disk controller fault" in crashed.stderr  # a crash keeps its traceback
    last = logdir / "version_0" / "checkpoints" / "last.ckpt"
    assert f"training failed; last.ckpt holds step 5; after fixing the cause, resume with --ckpt-path {last}" in crashed.stderr
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 5  # no periodic save at step 5
    info_path = logdir / "version_0" / "run_info.json"
    failed = json.loads(info_path.read_text())
    assert (failed["status"], failed["error"]) == ("failed", "RuntimeError: disk controller fault")
    assert failed["launches"][0]["status"] == "failed" and failed["launches"][0]["ended"]

    # The printed advice as it stands: the data, cache and log folders come from the run, not from flags.
    resumed = run_in_process("train.py", "--deterministic", "--log-every-n-steps", "1", "--progress-refresh", "0",
                             "--accelerator", "cpu", "--ckpt-path", last)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert (final["global_step"], final["epoch"]) == (6, 1)
    assert all(torch.equal(final["state_dict"][key], reference_weights[key]) for key in reference_weights)
    assert resumed.stdout.strip().splitlines()[-1] == reference_line
    finished = json.loads(info_path.read_text())
    assert finished["status"] == "finished" and "error" not in finished
    assert [(launch["status"], launch.get("error")) for launch in finished["launches"]] == [
        ("failed", "RuntimeError: disk controller fault"), ("finished", None)]


# Stops between the first epoch's last training step and its checkpoints, which Lightning writes after the other
# callbacks' epoch-end hooks. DETERMINISTIC_RUN's epochs have 3 training batches and 2 validation batches.
FIRST_EPOCH = "trainer.current_epoch == 0 and not trainer.sanity_checking"
STOPS_BEFORE_EPOCH_CHECKPOINTS = {
    "SIGTERM in validation": ("os.kill(os.getpid(), signal.SIGTERM)", 143, "on_validation_batch_start", "args[1] == 0"),
    "Ctrl-C in validation": ("raise KeyboardInterrupt", 130, "on_validation_batch_start", "args[1] == 0"),
    "Ctrl-C after the last training step": ("raise KeyboardInterrupt", 130, "on_train_batch_end", "args[2] == 2"),
    "Ctrl-C after validation": ("raise KeyboardInterrupt", 130, "on_train_epoch_end", "True"),
}


def validation_curve(run_dir: Path) -> dict[int, float]:
    """Step -> val/acc; a validation run again after a stop logs its point a second time, at the same step."""
    return {step: value for _, step, value in scalars(run_dir)["val/acc"]}


@pytest.mark.skipif(not MID_VALIDATION_RESTART, reason="needs pytorch-lightning 2.5 or newer (mid-validation restart)")
@pytest.mark.parametrize("stop", STOPS_BEFORE_EPOCH_CHECKPOINTS, ids=list(STOPS_BEFORE_EPOCH_CHECKPOINTS))
def test_stop_before_epoch_checkpoints_resumes_with_that_epochs_validation(deterministic_run, image_folder, tmp_path,
                                                                           stop):
    """The resume validates the stopped epoch in full and writes its checkpoints before it trains on.

    Same validation curve, best checkpoint, weights and test line as the uninterrupted run. Resumed as
    Lightning records such a stop, the run went on to the next epoch: the first epoch had no val/acc point,
    and its checkpoint, the best here, was never written, so the final test loaded another one.
    """
    fault, exit_code, hook, when = STOPS_BEFORE_EPOCH_CHECKPOINTS[stop]
    reference = deterministic_run
    logdir = tmp_path / "logs"
    runner = fault_runner(tmp_path / "stopped_train.py", fault, hook, f"{FIRST_EPOCH} and {when}")
    location = ["--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--logdir", logdir]
    stopped = run_forked(runner, *location, *DETERMINISTIC_RUN, output_dir=tmp_path / "output")
    assert stopped.returncode == exit_code, stopped.stderr[-3000:]
    run_dir = logdir / "version_0"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3

    resumed = run_in_process("train.py", "--deterministic", "--log-every-n-steps", "1", "--progress-refresh", "0",
                             "--accelerator", "cpu", "--ckpt-path", "last", *location)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert validation_curve(run_dir) == validation_curve(reference.run_dir)
    assert len(validation_curve(run_dir)) == 2
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert checkpoints == sorted(path.name for path in (reference.run_dir / "checkpoints").iterdir())
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(torch.equal(final["state_dict"][key], reference.weights[key]) for key in reference.weights)
    assert resumed.stdout.strip().splitlines()[-1] == reference.test_line


@pytest.mark.parametrize("fault, exit_code", [("os.kill(os.getpid(), signal.SIGTERM)", 143),
                                               ("raise KeyboardInterrupt", 130)], ids=["SIGTERM", "Ctrl-C"])
def test_stop_during_the_final_test_is_an_interruption_and_the_resume_tests(deterministic_run, image_folder, tmp_path,
                                                                            fault, exit_code):
    """The signal's exit code (not 0 or 1) and an interrupted run (not one left running), which a resume tests."""
    logdir = tmp_path / "logs"
    runner = fault_runner(tmp_path / "stopped_train.py", fault, "on_test_batch_start", "True")
    location = ["--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--logdir", logdir]
    stopped = run_forked(runner, *location, *DETERMINISTIC_RUN, output_dir=tmp_path / "output")
    assert stopped.returncode == exit_code, stopped.stderr[-3000:]
    assert "Test accuracy" not in stopped.stdout
    assert ("during the final test (training is complete; the resume only tests); resume with --ckpt-path"
            in stopped.stderr)
    info_path = logdir / "version_0" / "run_info.json"
    assert json.loads(info_path.read_text())["status"] == "interrupted"

    resumed = run_in_process("train.py", "--progress-refresh", "0", "--accelerator", "cpu", "--ckpt-path", "last",
                             *location)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines()[-1] == deterministic_run.test_line
    assert [launch["status"] for launch in json.loads(info_path.read_text())["launches"]] == ["interrupted", "finished"]


def test_stop_before_the_first_step_says_there_is_nothing_to_resume(image_folder, tmp_path):
    logdir = tmp_path / "logs"
    runner = fault_runner(tmp_path / "stopped_train.py", "os.kill(os.getpid(), signal.SIGTERM)",
                          "on_validation_batch_start", "trainer.sanity_checking")
    stopped = run_forked(runner, "--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--logdir", logdir,
                         *DETERMINISTIC_RUN, output_dir=tmp_path / "output")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        "train.py: stopped by SIGTERM before the first training step, so there is nothing to resume; "
        "run the same command again")
    assert not (logdir / "version_0" / "checkpoints" / "last.ckpt").exists()
    assert json.loads((logdir / "version_0" / "run_info.json").read_text())["status"] == "interrupted"


def test_a_diverged_run_stops_after_that_epoch_and_says_so_instead_of_testing(image_folder, tmp_path):
    logdir = tmp_path / "logs"
    result = run_in_process("train.py", "--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--logdir", logdir,
                            *SMALL, "--epochs", "5", "--lr", "1e4", "--warmup-fraction", "0")
    assert result.returncode == 1, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"train\.py: the mean training loss of epoch (\d) was not finite \(the weights diverged\); "
                        r"training stopped there.*\. Lower --lr \(or raise --warmup-fraction\) and run again", message)
    epoch = int(re.search(r"epoch (\d)", message).group(1))
    assert epoch < 4 and "Test accuracy" not in result.stdout
    run_dir = logdir / "version_0"
    assert len(scalars(run_dir)["val/acc"]) == epoch + 1  # no epoch after the one that diverged
    run_info = json.loads((run_dir / "run_info.json").read_text())
    assert run_info["status"] == "failed" and run_info["error"].startswith("TrainingDiverged: ")


def test_resume_refuses_flags_that_differ_from_the_run(trained_run, image_folder):
    """Recipe and data flags that contradict the checkpoint's run are refused, all named at once; nothing is written."""
    run_dir, _ = trained_run
    last = run_dir / "checkpoints" / "last.ckpt"
    before = hashlib.sha256(last.read_bytes()).hexdigest(), sorted(p.name for p in run_dir.parent.iterdir())
    result = run_in_process("train.py", "--ckpt-path", last, "--data-dir", image_folder, "--logdir", run_dir.parent,
                            "--lr", "0.05", "--val-size", "10", "--input-size", "32", "--seed", "7", "--batch-size", "16",
                            "--limit-train-batches", "2", "--limit-val-batches", "2", "--ema-decay", "0.9")
    assert_one_line_error(result, str(last), "--lr 0.1, not 0.05", "--val-size 20, not 10", "--input-size 48, not 32",
                          "--limit-train-batches 1.0, not 2", "--ema-decay 0.0, not 0.9", "leave those flags out")
    assert "--seed" not in result.stderr and "--batch-size" not in result.stderr  # given as the run had them
    assert "--limit-val-batches" not in result.stderr  # given on purpose: a resume may validate on other batches
    assert (hashlib.sha256(last.read_bytes()).hexdigest(), sorted(p.name for p in run_dir.parent.iterdir())) == before


def test_resume_takes_the_settings_left_out_from_the_checkpoint(tmp_path):
    """A resume that names no recipe flag gets the run's: its split, batches, seed, cutout, schedule length and the
    training, validation and test batches it was limited to."""
    import train

    argv = ["--ckpt-path", str(tmp_path / "last.ckpt")]
    args = train.build_parser().parse_args(argv)
    checkpoint = {
        "hyper_parameters": {"model_name": "vgg16", "model_options": {}, "lr": 0.05, "input_size": None,
                             "ema_decay": 0.999},
        "CIFAR10DataModule": {"val_size": 0, "batch_size": 64, "seed": 3, "cutout_size": 8},
        "planned_epochs": 4, "planned_limit_train_batches": 30, "planned_limit_val_batches": 20,
        "planned_limit_test_batches": 0.5,
    }
    train.adopt_run_settings(args, train.given_flags(argv), checkpoint, tmp_path / "last.ckpt")
    assert (args.model, args.lr, args.input_size, args.val_size, args.batch_size, args.seed, args.cutout, args.epochs,
            args.limit_train_batches, args.limit_val_batches, args.limit_test_batches, args.ema_decay) == (
        "vgg16", 0.05, 32, 0, 64, 3, 8, 4, 30, 20, 0.5, 0.999)

    argv += ["--limit-val-batches", "5"]  # validation and test limits given on resume are taken, not refused
    args = train.build_parser().parse_args(argv)
    train.adopt_run_settings(args, train.given_flags(argv), checkpoint, tmp_path / "last.ckpt")
    assert (args.limit_val_batches, args.limit_test_batches) == (5, 0.5)


def test_resume_finds_the_data_and_logs_where_the_run_had_them_unless_told_otherwise(tmp_path):
    import train

    from datamodules import DataError

    last = tmp_path / "runs" / "version_7" / "checkpoints" / "last.ckpt"
    data_dir = tmp_path / "cifar"
    data_dir.mkdir()
    checkpoint = {"hyper_parameters": {"model_name": "vgg16"},
                  "CIFAR10DataModule": {"data_dir": str(data_dir), "cache_dir": "/scratch/cache"}}
    argv = ["--ckpt-path", str(last)]
    args = train.build_parser().parse_args(argv)
    train.adopt_run_settings(args, train.given_flags(argv), checkpoint, last)
    assert (args.data_dir, args.cache_dir, Path(args.logdir)) == (str(data_dir), "/scratch/cache", tmp_path / "runs")

    data_dir.rmdir()  # gone: refused, not downloaded into
    with pytest.raises(DataError, match="was trained on .*, which is not there; pass --data-dir"):
        train.adopt_run_settings(train.build_parser().parse_args(argv), train.given_flags(argv), checkpoint, last)
    assert not data_dir.exists()

    argv += ["--data-dir", "moved/cifar", "--logdir", "elsewhere"]  # the data moved; a new log folder starts a new run
    args = train.build_parser().parse_args(argv)
    train.adopt_run_settings(args, train.given_flags(argv), checkpoint, last)
    assert (args.data_dir, args.cache_dir, args.logdir) == ("moved/cifar", "/scratch/cache", "elsewhere")


def test_periodic_checkpoint_saves_every_n_steps(image_folder, tmp_path):
    import pytorch_lightning as pl

    from datamodules import CIFAR10DataModule
    from lit_modules import LitClassifier
    from lit_modules.callbacks import PeriodicCheckpoint

    saved_at = []

    class Recorder(PeriodicCheckpoint):
        def on_train_batch_start(self, trainer, *args):
            before = self.path.stat().st_mtime_ns if self.path.exists() else None
            super().on_train_batch_start(trainer, *args)
            if self.path.exists() and self.path.stat().st_mtime_ns != before:
                saved_at.append(trainer.global_step)

    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Recorder(tmp_path / "last.ckpt", every_n_steps=2)])
    trainer.fit(LitClassifier("resnet50_seed"), datamodule=CIFAR10DataModule(image_folder, batch_size=16, val_size=20, cache_dir=None))
    assert saved_at == [2, 4, 6, 8]  # 3 epochs x 3 steps; each saved as the following batch starts


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    import lit_modules.checkpointing as checkpointing

    target = tmp_path / "last.ckpt"
    io = checkpointing.AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    original = target.read_bytes()

    def killed_half_way(obj, stream):
        stream.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    assert target.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_only_the_partial_files_of_checkpoint_writes_are_removed(tmp_path):
    from lit_modules.checkpointing import remove_partial_checkpoints

    names = ["last.ckpt", "best-epoch=003.ckpt", ".last.ckpt.a1b2c3d4.tmp", ".best-epoch=004.ckpt.e5f6g7h8.tmp",
             ".run_info.json.4242.tmp", "notes.tmp", ".hidden.ckpt"]
    for name in names:
        (tmp_path / name).write_bytes(b"kept unless a partial checkpoint")
    removed = remove_partial_checkpoints(tmp_path)
    assert sorted(path.name for path in removed) == [".best-epoch=004.ckpt.e5f6g7h8.tmp", ".last.ckpt.a1b2c3d4.tmp"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(set(names) - {path.name for path in removed})


def test_unwritable_logdir_is_refused_before_training(image_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_in_process("train.py", "--data-dir", image_folder, "--cache-dir", tmp_path / "cache",
                            "--logdir", blocker / "logs", *SMALL)
    assert_one_line_error(result, f"--logdir {blocker / 'logs'} is not writable")
    result = run_in_process("train.py", "--data-dir", image_folder, "--cache-dir", tmp_path / "cache",
                            "--logdir", blocker, *SMALL)
    assert_one_line_error(result, f"--logdir {blocker} is a file, not a folder")
    assert blocker.read_text() == ""


def test_full_disk_is_refused_before_training(image_folder, tmp_path, monkeypatch, capsys):
    import shutil

    import train
    from cli import run_main

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 5 * 2**20, 5 * 2**20))
    code = run_main(train.main, ["--data-dir", str(image_folder), "--cache-dir", str(tmp_path / "cache"),
                                 "--logdir", str(tmp_path / "logs"), *SMALL])
    assert code == 2
    assert "5 MiB free, about" in capsys.readouterr().err
    assert list((tmp_path / "logs").iterdir()) == []


def test_a_disk_that_fills_during_training_stops_in_one_line_and_the_run_resumes(image_folder, tmp_path, monkeypatch):
    """The second periodic checkpoint (step 8) meets a full disk: one line, no partial file, last.ckpt of step 4."""
    import errno

    import lit_modules.checkpointing as checkpointing
    import train

    real_save = torch.save
    checkpoint_writes = []

    def save_until_the_disk_fills(obj, target, *args, **kwargs):
        if isinstance(target, (str, Path)):  # the decoded-image cache, not a checkpoint
            return real_save(obj, target, *args, **kwargs)
        checkpoint_writes.append(target)
        if len(checkpoint_writes) == 1:
            return real_save(obj, target, *args, **kwargs)
        target.write(b"PK\x03\x04 the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_write_json = train.write_json_atomic

    def write_json_until_the_disk_fills(path, data):  # run_info.json: only the record of the start fits
        if data["status"] != "running":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_json(path, data)

    logdir = tmp_path / "logs"
    common = ["--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--logdir", logdir, *SMALL]
    monkeypatch.setattr(checkpointing.torch, "save", save_until_the_disk_fills)
    monkeypatch.setattr(train, "write_json_atomic", write_json_until_the_disk_fills)
    result = run_in_process("train.py", *common, "--batch-size", "4", "--epochs", "1", "--checkpoint-every-n-steps", "4")
    checkpoints = logdir / "version_0" / "checkpoints"
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    *_, last_line = result.stderr.strip().splitlines()  # after what Lightning prints as training starts
    assert last_line == (f"train.py: error: could not write the checkpoint {checkpoints / 'last.ckpt'} (No space left "
                         "on device), so training stopped at step 8; the checkpoints written before are intact; free "
                         f"some space and resume with --ckpt-path {checkpoints / 'last.ckpt'}")
    assert len(checkpoint_writes) == 2  # no second try on the interrupt
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]  # no partial file
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4

    monkeypatch.setattr(checkpointing.torch, "save", real_save)  # space freed
    monkeypatch.setattr(train, "write_json_atomic", real_write_json)
    resumed = run_in_process("train.py", "--ckpt-path", checkpoints / "last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 15
    run_info = json.loads((logdir / "version_0" / "run_info.json").read_text())
    assert run_info["status"] == "finished"
    assert [launch["status"] for launch in run_info["launches"]] == ["killed", "finished"]  # its end went unrecorded


@pytest.fixture(scope="module")
def bad_checkpoints(best_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_checkpoints")
    text = folder / "notes.ckpt"
    text.write_text("these are not weights")
    markdown = folder / "results.md"  # torch's reason for this one is a paragraph of advice
    markdown.write_text("# Results\n\nThe run reached 90 %.\n")
    truncated = folder / "truncated.ckpt"
    data = best_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    plain = folder / "plain.pt"
    torch.save({"weights": [1, 2, 3]}, plain)
    foreign = folder / "foreign.ckpt"
    checkpoint = torch.load(best_checkpoint, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["model_name"] = "efficientnet_b0"
    torch.save(checkpoint, foreign)
    torchscript = folder / "model.pt"  # as export.py --format torchscript writes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation, which export.py quiets too
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(torchscript))
    onnx_export = folder / "model.onnx"  # as export.py --format onnx writes, but tiny
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "relu",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])])
    onnx.save(onnx.helper.make_model(graph, producer_name="pytorch"), onnx_export)
    return {"text": text, "markdown": markdown, "truncated": truncated, "plain": plain, "foreign": foreign,
            "torchscript": torchscript, "onnx": onnx_export}


FRAGMENTS = {
    "text": "is not a readable PyTorch checkpoint",
    "markdown": "is not a readable PyTorch checkpoint",
    "truncated": "is not a readable PyTorch checkpoint",
    "plain": "is not a train.py checkpoint",
    "foreign": "unknown architecture 'efficientnet_b0'",
    "torchscript": "is a TorchScript archive (export.py's), not a train.py checkpoint; give the .ckpt",
    "onnx": "is an ONNX export (export.py's), not a train.py checkpoint; give the .ckpt",
}


def script_arguments(script, path, image_folder, tmp_path):
    return {
        "train.py": ["--ckpt-path", path, "--data-dir", image_folder, "--logdir", tmp_path / "logs"],
        "evaluate.py": [path, "--data-dir", image_folder],
        "predict.py": [path, ROOT / "README.md"],
        "export.py": [path, "--format", "onnx", "--out", tmp_path / "model.onnx"],
    }[script]


# Every kind of bad file through the shared loader once (evaluate.py), then every script once.
@pytest.mark.parametrize(
    "script, kind",
    [("evaluate.py", kind) for kind in FRAGMENTS] + [("train.py", "truncated"), ("predict.py", "plain"), ("export.py", "text")],
)
def test_bad_checkpoints_get_one_line_and_exit_2(bad_checkpoints, image_folder, tmp_path, script, kind):
    path = bad_checkpoints[kind]
    result = run_in_process(script, *script_arguments(script, path, image_folder, tmp_path))
    assert_one_line_error(result, str(path), FRAGMENTS[kind])
    reason = re.search(r"\((.*)\); it may be truncated", result.stderr)
    if reason:  # the library's reason is cut to its first sentence, never mid-word
        assert ". " not in reason.group(1) and len(reason.group(1)) <= 160, reason.group(1)
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "logs").exists()


def test_debug_flag_shows_the_traceback(bad_checkpoints, tmp_path):
    result = run_in_process("export.py", bad_checkpoints["text"], "--format", "onnx", "--out", tmp_path / "model.onnx", "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert FRAGMENTS["text"] in result.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_gpu_without_a_gpu_is_one_line(image_folder, tmp_path):
    result = run_in_process("train.py", "--accelerator", "gpu", "--data-dir", image_folder, "--cache-dir", tmp_path / "c",
                            "--logdir", tmp_path / "logs", "--val-size", "20")
    assert_one_line_error(result, "--accelerator gpu: no CUDA GPU is available on this machine")


def test_deterministic_runs_are_bit_identical(deterministic_run, image_folder, tmp_path):
    """The reference run (in the test process) and a run in a process of its own."""
    first, second = deterministic_run, deterministic_train(image_folder, tmp_path / "logs", tmp_path / "cache",
                                                           in_own_process=True)
    assert len(first.losses) == 6 and first.losses == second.losses and first.test_line == second.test_line
    assert all(torch.equal(first.weights[key], second.weights[key]) for key in first.weights)


DDP_RUNNER = textwrap.dedent(
    """
    # Records a hash of every training and test image each DDP process receives, then runs train.py's main.
    import hashlib, os, sys
    sys.path.insert(0, {root!r})
    import datamodules.cifar10 as cifar10
    original = cifar10.CIFAR10DataModule.on_after_batch_transfer

    def recording(self, batch, dataloader_idx):
        trainer = self.trainer
        if trainer is not None and (trainer.training or trainer.testing) and isinstance(batch, (tuple, list)):
            stage = "train" if trainer.training else "test"
            with open(os.path.join({out!r}, f"{{stage}}_rank{{trainer.global_rank}}.txt"), "a") as seen:
                for image in batch[0]:
                    seen.write(hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest() + "\\n")
        return original(self, batch, dataloader_idx)

    cifar10.CIFAR10DataModule.on_after_batch_transfer = recording
    import train
    from cli import run_main
    sys.exit(run_main(train.main))
    """
)


def test_ddp_on_two_cpu_processes_shards_data_and_syncs_metrics(image_folder, tmp_path):
    import shutil

    from datamodules import load_cifar10
    from datamodules.cifar10 import split_train_val

    # 29 test images: two processes cannot split them evenly, and none may be scored twice.
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    next((data / "test" / "cat").iterdir()).unlink()
    runner = tmp_path / "ddp_train.py"
    runner.write_text(DDP_RUNNER.format(root=str(ROOT), out=str(tmp_path)))
    logdir = tmp_path / "logs"
    result = subprocess.run(
        [sys.executable, str(runner), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
         "--model", "resnet50_seed", "--epochs", "1", "--batch-size", "10", "--val-size", "20", "--precision", "32-true",
         "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"), "--logdir", str(logdir),
         "--progress-refresh", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # Lightning warns for each value logged per epoch without synchronisation across the processes.
    assert "sync_dist=True" not in result.stderr
    # DDP's gradient buckets take each gradient as laid out (the channels-last 1x1 kernels included), no copy
    assert "strides do not match bucket view strides" not in result.stderr
    def hashes(images):
        return [hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest() for image in images]

    arrays = load_cifar10(data, cache_dir=None)
    train_index, _ = split_train_val(len(arrays["train_labels"]), 20, seed=0)
    seen = [(tmp_path / f"train_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 30
    assert set(seen[0]).isdisjoint(seen[1])
    # Recorded before augmentation: every training image exactly once.
    assert set(seen[0]) | set(seen[1]) == set(hashes(arrays["train_images"][train_index]))
    tested = [(tmp_path / f"test_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert sorted(map(len, tested)) == [14, 15] and sorted(tested[0] + tested[1]) == sorted(hashes(arrays["test_images"]))

    run_dir = logdir / "version_0"
    assert sorted(p.name for p in logdir.iterdir()) == ["version_0"]
    logged = scalar_tags(run_dir)["test/acc"][0]
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    evaluation = run_in_process("evaluate.py", best, "--data-dir", data, "--cache-dir", tmp_path / "cache",
                                "--json", tmp_path / "eval.json")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == pytest.approx(logged, abs=1e-6)


LAUNCHERS = {
    "by hand": {"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"},
    "srun": {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODELIST": "node[1-2]", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "42"},
    "torchrun": {"TORCHELASTIC_RUN_ID": "job", "RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                 "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"},
}


def without_launchers(monkeypatch) -> None:
    for name in {name for environment in LAUNCHERS.values() for name in environment}:
        monkeypatch.delenv(name, raising=False)


def test_several_nodes_without_a_launcher_are_refused_instead_of_waiting(image_folder, tmp_path, monkeypatch):
    without_launchers(monkeypatch)
    # In a process of its own with a time limit: without the refusal it would wait for the other node for ever.
    result = run_forked("train.py", "--data-dir", image_folder, "--cache-dir", tmp_path / "cache",
                        "--logdir", tmp_path / "logs", "--num-nodes", "2", *TINY_RUN, output_dir=tmp_path / "output",
                        timeout=120)
    assert_one_line_error(result, "--num-nodes 2 needs a launcher that starts train.py on every node",
                          "alone this process would wait for the others for ever")
    assert not list((tmp_path / "logs").glob("version_*"))


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_several_nodes_pass_under_a_launcher(monkeypatch, launcher):
    import pytorch_lightning as pl

    import train

    without_launchers(monkeypatch)
    for name, value in LAUNCHERS[launcher].items():
        monkeypatch.setenv(name, value)
    trainer = pl.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", logger=False)
    train.check_launcher(2, trainer)  # no refusal
