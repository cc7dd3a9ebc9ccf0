import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import SUMMARY_COUNTS_FLOPS, TINY_RUN
from tests.helpers import ROOT, assert_each_default_stated_once, assert_one_line_error, run_forked, run_in_process, scalar_tags


def printed_test_accuracy(stdout: str) -> float:
    last_line = stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"Test accuracy: (\d+\.\d\d) %", last_line)
    assert match, last_line
    return float(match.group(1))


def test_train_end_to_end(trained_run, best_checkpoint):
    run_dir, result = trained_run
    accuracy = printed_test_accuracy(result.stdout)
    assert 0 <= accuracy <= 100
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and best_checkpoint.name in checkpoints
    assert f"Checkpoint tested: {best_checkpoint}" in result.stdout
    assert (run_dir / "hparams.yaml").is_file()
    assert not (run_dir.parent / "version_1").exists()
    tags = scalar_tags(run_dir)
    assert len(tags["val/acc"]) == 2 and all(0 <= v <= 1 for v in tags["val/acc"])
    assert {"train/loss_step", "train/acc", "val/loss", "test/acc", "train/lr"} <= set(tags)
    assert tags["test/acc"][0] == pytest.approx(accuracy / 100, abs=1e-4)
    output = result.stdout + result.stderr
    assert "LeafSpec" not in output and "litlogger" not in output  # library notices no user can act on
    assert re.search(r"^\S+ ?[KMGT]?\s+Total params$", output, re.M), output[:3000]  # the layer summary
    if SUMMARY_COUNTS_FLOPS:  # pytorch-lightning 2.6 and newer; at 48x48 here
        flops = re.search(r"^(\S+ ?[KMGT]?)\s+Total Flops$", output, re.M)
        assert flops and flops.group(1).strip() == "404 M", output[:3000]


def test_last_checkpoint_is_the_last_epoch_even_without_improvement(image_folder, tmp_path):
    # A learning rate of 1e-12 leaves the validation accuracy where it was: epoch 2 saves no new best.
    result = run_in_process("train.py", "--model", "resnet50_seed", "--epochs", "2", "--lr", "1e-12", "--scheduler", "none",
                            "--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--logdir", tmp_path / "logs",
                            *TINY_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = tmp_path / "logs" / "version_0" / "checkpoints"
    assert [p.name for p in checkpoints.glob("best-*.ckpt")] == ["best-epoch=000.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 6)


def test_run_info_records_command_seed_and_versions(trained_run):
    run_dir, result = trained_run
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["status"] == "finished" and info["seed"] == 7 and info["epochs"] == 2
    assert "--seed 7" in info["command"] and "train.py" in info["command"]
    assert {"torch", "torchvision", "pytorch_lightning", "torchmetrics", "python"} <= set(info["versions"])
    assert info["test_acc"] == pytest.approx(printed_test_accuracy(result.stdout) / 100, abs=1e-4)


@pytest.mark.parametrize(
    "args, precision, size",
    [
        ([], "bf16-mixed", 48),
        (["--model", "resnet50_seed"], "bf16-mixed", 48),
        (["--accelerator", "gpu"], "32-true", 48),
        (["--accelerator", "cpu"], "16-mixed", 48),
        (["--accelerator", "cpu"], "32-true", None),
        (["--accelerator", "cpu"], "64-true", None),
        (["--stem", "cifar"], "bf16-mixed", None),
        (["--model", "vgg16"], "bf16-mixed", None),
        (["--accelerator", "cpu", "--input-size", "48"], "32-true", 48),
        (["--input-size", "32"], "bf16-mixed", 32),
        (["--model", "vgg16", "--input-size", "64"], "bf16-mixed", 64),
    ],
)
def test_auto_input_size_upsamples_the_imagenet_stem_unless_a_cpu_trains_at_32_bit(args, precision, size):
    import train

    assert train.resolve_input_size(train.build_parser().parse_args(args), precision) == size


@pytest.mark.parametrize(
    "precision, on_cpu, words, warns",
    [
        ("bf16-mixed", True, {"flags", "sse2", "avx2"}, True),
        ("bf16-true", True, {"flags", "sse2", "avx2", "avx512f"}, True),
        ("16-mixed", True, {"flags", "sse2", "avx2"}, True),  # Lightning trains it as bf16-mixed on a CPU
        ("bf16-mixed", True, {"AuthenticAMD", "flags", "sse2", "avx512_bf16"}, False),
        ("bf16-mixed", True, {"GenuineIntel", "flags", "sse2", "avx512_bf16", "amx_bf16"}, False),
        ("32-true", True, {"flags", "sse2", "avx2"}, False),
        ("bf16-mixed", False, {"flags", "sse2", "avx2"}, False),  # a GPU trains
        ("bf16-mixed", True, {"Features", "asimd", "bf16"}, False),  # an Arm CPU: not judged by x86 flags
        ("bf16-mixed", True, None, False),  # no /proc/cpuinfo to read
    ],
)
def test_bf16_asked_of_a_cpu_without_bf16_instructions_is_warned_about(precision, on_cpu, words, warns, monkeypatch):
    import cli

    monkeypatch.setattr(cli, "cpu_flags", lambda: words)
    warning = cli.slow_bf16_warning(precision, on_cpu)
    if warns:
        assert f"--precision {precision}" in warning and "is emulated" in warning and "\n" not in warning
    else:
        assert warning is None


@pytest.mark.parametrize(
    "words, precision",
    [
        ({"GenuineIntel", "flags", "sse2", "avx512_bf16", "amx_bf16"}, "bf16-mixed"),  # Intel Xeon with AMX
        ({"AuthenticAMD", "flags", "sse2", "avx512_bf16"}, "bf16-mixed"),  # AMD EPYC with AVX512-BF16
        ({"GenuineIntel", "flags", "sse2", "avx512_bf16"}, "32-true"),  # Intel Xeon, AMX hidden: bf16 is slower
        ({"AuthenticAMD", "flags", "sse2", "avx2"}, "32-true"),  # no bf16 instructions
        (None, "32-true"),  # no /proc/cpuinfo to read
    ],
)
def test_auto_precision_on_a_cpu_is_bf16_only_where_bf16_trains_faster(words, precision, monkeypatch):
    import cli

    monkeypatch.setattr(cli, "cpu_flags", lambda: words)
    assert cli.resolve_precision("auto", "cpu") == precision
    assert cli.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"  # asked for: kept


@pytest.mark.parametrize(
    "words, native",
    [
        ({"GenuineIntel", "flags", "sse2", "avx512_bf16"}, True),  # bf16 instructions, even where fp32 trains faster
        ({"GenuineIntel", "flags", "sse2", "amx_bf16"}, True),
        ({"AuthenticAMD", "flags", "sse2", "avx2"}, False),
        (None, False),  # no /proc/cpuinfo to read
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(words, native, monkeypatch):
    import cli

    monkeypatch.setattr(cli, "cpu_flags", lambda: words)
    assert cli.cpu_supports_bf16() is native


def test_bf16_asked_of_an_intel_cpu_with_avx512_bf16_but_no_amx_is_warned_about(monkeypatch):
    import cli

    monkeypatch.setattr(cli, "cpu_flags", lambda: {"GenuineIntel", "flags", "sse2", "avx512_bf16"})
    warning = cli.slow_bf16_warning("bf16-mixed", True)
    assert "avx512_bf16 but no amx_bf16" in warning and "--precision bf16-mixed" in warning
    assert "auto chooses 32-true" in warning and "\n" not in warning
    assert cli.slow_bf16_warning("32-true", True) is None


def test_train_and_evaluate_warn_once_before_emulating_bf16(image_folder, best_checkpoint, tmp_path, monkeypatch):
    import cli

    monkeypatch.setattr(cli, "cpu_flags", lambda: {"flags", "sse2", "avx2"})  # an x86 CPU without bf16
    result = run_in_process("train.py", "--model", "resnet50_seed", "--data-dir", image_folder,
                            "--cache-dir", tmp_path / "cache", "--logdir", tmp_path / "logs", "--fast-dev-run",
                            *TINY_RUN, "--precision", "bf16-mixed", "--input-size", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "warning: this CPU has no bf16" in line]
    assert len(warnings) == 1 and warnings[0].startswith("train.py: warning:")
    assert re.search(r"^Test accuracy: \d+\.\d\d %$", result.stdout, re.M)  # warned, and trained all the same

    evaluation = run_in_process("evaluate.py", best_checkpoint, "--data-dir", image_folder, "--cache-dir",
                                tmp_path / "cache", "--device", "cpu", "--precision", "bf16-mixed")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert [line for line in evaluation.stderr.splitlines() if "warning: this CPU has no bf16" in line] == [
        f"evaluate.py: warning: {cli.slow_bf16_warning('bf16-mixed', True)}"]

    plain = run_in_process("evaluate.py", best_checkpoint, "--data-dir", image_folder, "--cache-dir",
                           tmp_path / "cache", "--device", "cpu", "--precision", "32-true")
    assert plain.returncode == 0 and "warning: this CPU" not in plain.stderr


def test_the_run_records_the_input_size_auto_chose_for_its_precision(deterministic_run):
    """``auto`` on the CPU: 48x48 under bf16, the images' own 32x32 (recorded as null) at 32-bit."""
    run_dir = deterministic_run.run_dir
    precision = json.loads((run_dir / "run_info.json").read_text())["precision"]
    expected = "input_size: null" if precision == "32-true" else "input_size: 48"
    assert precision in ("32-true", "bf16-mixed")
    assert expected in (run_dir / "hparams.yaml").read_text().splitlines()


def test_vgg16_fast_dev_run(image_folder, cache_dir, tmp_path):
    result = run_in_process(
        "train.py", "--model", "vgg16", "--data-dir", image_folder, "--cache-dir", cache_dir,
        "--logdir", tmp_path / "logs", "--fast-dev-run", *TINY_RUN,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^Test accuracy: \d+\.\d\d %$", result.stdout, re.M)
    assert not (tmp_path / "logs" / "version_0" / "checkpoints").exists()


def test_help_documents_every_flag_with_its_default():
    result = run_in_process("train.py", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in ["--model", "--stem", "--data-dir", "--epochs", "--batch-size", "--lr", "--optimizer",
                 "--weight-decay", "--label-smoothing", "--seed", "--accelerator", "--devices", "--precision",
                 "--num-workers", "--limit-train-batches", "--limit-val-batches", "--limit-test-batches",
                 "--fast-dev-run", "--logdir", "--ckpt-path", "--init-from", "--init-strict", "--strategy",
                 "--num-nodes", "--deterministic", "--compile", "--channels-last", "--checkpoint-every-n-steps", "--test-time-flip", "--test-time-shift",
                 "--ema-decay"]:
        assert flag in text
    assert text.count("(default:") >= 35
    for default in ["resnet50", "./data", "lightning_logs", "auto", "imagenet", "sgd"]:
        assert f"(default: {default})" in text
    assert "(default: $CIFAR10_CACHE_DIR or ~/.cache/cifar10-lightning)" in text
    assert_each_default_stated_once(text)


HELP_AND_REFUSALS = {
    "train": [(["--help"], None),
              (["--devices", "two"], "--devices takes a count"),
              (["--accelerator", "gpu", "--devices", "99"], "--accelerator gpu: no CUDA GPU"),
              (["--ckpt-path", "missing.ckpt"], "missing.ckpt: no such file"),
              (["--init-from", "missing.pt"], "missing.pt: no such file")],
    "evaluate": [(["--help"], None),
                 (["missing.ckpt"], "missing.ckpt: no such file")],
    "predict": [(["--help"], None),
                (["missing.ckpt", "README.md"], "missing.ckpt: no such file"),
                (["README.md", "missing.png"], "missing.png: no such file or folder")],
    "export": [(["--help"], None),
               (["missing.ckpt", "--format", "onnx", "--out", "missing.onnx"], "missing.ckpt: no such file"),
               (["missing.ckpt", "--format", "onnx", "--out", "missing.onnx", "--opset", "10"],
                "--opset: must be at least 11, got 10")],
}


@pytest.mark.parametrize("script", sorted(HELP_AND_REFUSALS))
def test_help_and_refusals_do_not_wait_for_lightning(script):
    """Importing Lightning takes seconds; ``--help``, a refused flag and a mistyped checkpoint path answer without it.

    One interpreter per script answers its cases in turn, each with its own output: the first case that
    imports Lightning is the one that fails.
    """
    cases = HELP_AND_REFUSALS[script]
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from cli import run_main
        import {script}
        for args in {[args for args, _ in cases]!r}:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    run_main({script}.main, args)
                except SystemExit:
                    pass
            print(json.dumps([out.getvalue(), err.getvalue(), "pytorch_lightning" in sys.modules]))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(answers) == len(cases), result.stdout[-500:]
    for (args, error), (out, err, imported_lightning) in zip(cases, answers):
        assert not imported_lightning, args
        if error is None:
            assert out.startswith("usage:") and err == "", args
            assert_each_default_stated_once(out)
        else:
            assert err.count("\n") == 1 and error in err, (args, err)


def test_a_reader_that_stops_early_ends_the_script_quietly():
    """`evaluate.py ... | head -1`: the closed pipe gives exit code 1 and no traceback."""
    writes_a_lot = "import sys; from cli import run_main; sys.exit(run_main(lambda arguments: print('line\\n' * 100_000) or 0, []))"
    process = subprocess.Popen([sys.executable, "-c", writes_a_lot], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader goes away while the script still has more than a pipe buffer to write
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1
    assert stderr == ""


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "resnet18"], "invalid choice: 'resnet18'"),
        (["--epochs", "-1"], "--epochs: must be a positive integer"),
        (["--epochs", "0"], "--epochs: must be a positive integer"),
        (["--epochs", "1.5"], "--epochs: must be a positive integer, got 1.5"),
        (["--seed", "x"], "--seed: must be zero or a positive integer, got x"),
        (["--lr", "fast"], "--lr: must be a positive number, got fast"),
        (["--momentum", "high"], "--momentum: must be in [0, 1), got high"),
        (["--weight-decay", "none"], "--weight-decay: must be zero or positive, got none"),
        (["--limit-val-batches", "all"], "--limit-val-batches: must be a batch count or a fraction in [0, 1], got all"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer"),
        (["--lr", "0"], "--lr: must be a positive number"),
        (["--lr", "nan"], "--lr: must be a positive number"),
        (["--lr", "inf"], "--lr: must be a positive number, got inf"),
        (["--weight-decay", "inf"], "--weight-decay: must be zero or positive, got inf"),
        (["--precision", "8"], "--precision: invalid choice"),
        (["--momentum", "1.5"], "--momentum: must be in [0, 1), got 1.5"),
        (["--test-time-shift", "5"], "--test-time-shift: must be at most 4, the padding of the training crops, got 5"),
        (["--optimizer", "rmsprop"], "--optimizer: invalid choice"),
        (["--input-size", "0"], "--input-size: must be 'auto' or a positive integer"),
        (["--input-size", "big"], "--input-size: must be 'auto' or a positive integer"),
        (["--cutout", "-1"], "--cutout: must be zero or a positive integer"),
        (["--cutout", "33"], "--cutout: must be at most 32"),
        (["--ema-decay", "1"], "--ema-decay: must be in [0, 1)"),
        (["--limit-train-batches", "0"], "--limit-train-batches: must be a batch count of at least 1 or a fraction in (0, 1]"),
        (["--limit-test-batches", "0.0"], "--limit-test-batches: must be a batch count of at least 1 or a fraction in (0, 1]"),
        (["--limit-val-batches", "1.5"], "--limit-val-batches: a fraction must be at most 1"),
        (["--limit-train-batches", "nan"], "--limit-train-batches: must be a batch count or a fraction in [0, 1], got nan"),
    ],
)
def test_bad_flag_values_get_one_line_and_exit_2(args, fragment, capsys):
    import train

    with pytest.raises(SystemExit) as stopped:
        train.build_parser().parse_args(args)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]


@pytest.mark.parametrize("opset, fragment", [("seventeen", "must be an integer of at least 11, got seventeen"),
                                              ("10", "must be at least 11, got 10")])
def test_an_opset_that_is_no_number_or_too_old_is_refused_while_parsing(opset, fragment, capsys):
    import export

    with pytest.raises(SystemExit) as stopped:
        export.build_parser().parse_args(["model.ckpt", "--format", "onnx", "--out", "model.onnx", "--opset", opset])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--opset: {fragment}" in lines[0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--devices", "two"], "--devices takes a count"),
        (["--accelerator", "cpu", "--devices", "512"], "this machine has"),
        (["--accelerator", "cpu", "--devices", "0,1"], "--devices 0,1: on the CPU --devices takes a count of processes"),
        (["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp_spawn"],
         "--strategy ddp_spawn: train.py records its run from the process that trains; use --strategy ddp"),
        (["--model", "vgg16", "--input-size", "16"],
         "input size 16 is too small for vgg16, which needs images of at least 32x32 (--input-size)"),
        (["--ckpt-path", "missing.ckpt"], "missing.ckpt: no such file"),
        (["--init-from", "missing.pt"], "missing.pt: no such file"),
        (["--cutout", "33"], "--cutout: must be at most 32, the side of a CIFAR-10 image, got 33"),
        (["--model", "vgg16", "--stem", "cifar"], "--stem only shapes the ResNets, not vgg16; leave it out"),
        (["--model", "vgg16", "--stem", "imagenet", "--zero-init-residual", "false"],
         "--stem and --zero-init-residual only shape the ResNets, not vgg16; leave them out"),
        # The folder holds 80 training and 30 test images: with 20 held out, 3 training batches of 16 and 2 test ones.
        (["--val-size", "80"], "--val-size 80 leaves none of the 80 training images to train on; use at most 79"),
        (["--val-size", "81"], "--val-size 81 leaves none of the 80 training images to train on; use at most 79"),
        (["--val-size", "20", "--batch-size", "61"], "--batch-size 61 is more than the 60 training images; use at most 60"),
        (["--val-size", "20", "--batch-size", "16", "--limit-train-batches", "0.3"],
         "--limit-train-batches 0.3 leaves none of the 3 training batches; give a count like 1 or a fraction of at least 1/3"),
        (["--val-size", "20", "--batch-size", "16", "--limit-test-batches", "0.4"],
         "--limit-test-batches 0.4 leaves none of the 2 test batches"),
        (["--val-size", "20", "--batch-size", "8", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
          "--limit-val-batches", "0.3"], "--limit-val-batches 0.3 leaves none of the 2 validation batches of each of the 2 processes"),
        (["--val-size", "20", "--batch-size", "40", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"],
         "each of the 2 processes gets 30 training images, fewer than --batch-size 40; use at most 30 or fewer processes"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(args, fragment, tmp_path, image_folder):
    result = run_in_process("train.py", "--logdir", tmp_path / "logs", "--data-dir", image_folder,
                            "--cache-dir", tmp_path / "cache", *args)
    assert_one_line_error(result, fragment)
    assert not list((tmp_path / "logs").glob("version_*"))  # no run folder, not even an empty one


def test_runs_started_together_in_one_logdir_get_a_folder_each(tmp_path, monkeypatch):
    """Two train.py processes started at once both choose their version_N before either has written to it."""
    import train

    monkeypatch.setenv(train.RUN_VERSION_VARIABLE, "")  # recorded, so that the test's end undoes what run_version sets
    logdir = tmp_path / "logs"
    first = train.run_version(None, logdir, is_worker=False, claim=True)
    second = train.run_version(None, logdir, is_worker=False, claim=True)
    assert (first, second) == (0, 1)
    assert sorted(path.name for path in logdir.iterdir()) == ["version_0", "version_1"]


@pytest.mark.parametrize("environment, later", [
    ({}, False),
    ({"SLURM_PROCID": "0"}, False),
    ({"SLURM_PROCID": "3"}, True),  # srun starts every task of the job itself
    ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, True),  # a SLURM job whose processes Lightning starts
    ({"RANK": "0", "LOCAL_RANK": "0", "NODE_RANK": "0"}, False),  # torchrun's first process
    ({"RANK": "5", "LOCAL_RANK": "1"}, True),
    ({"NODE_RANK": "1"}, True),
])
def test_only_the_first_process_of_a_launch_claims_the_run_folder(environment, later, monkeypatch):
    import train

    for name in (*train.RANK_VARIABLES, "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert train.launched_as_later_rank() is later


def make_nine_classes(root):
    import shutil

    from tests.conftest import write_image_folder

    write_image_folder(root, 1, 1)
    shutil.rmtree(root / "train" / "truck")


def make_unreadable_file(root):
    from tests.conftest import write_image_folder

    write_image_folder(root, 1, 1)
    (root / "train" / "ship" / "0009.png").write_bytes(b"not a png")


# The first case runs in a process of its own (the exit code a user sees); the others call train.py's main directly.
@pytest.mark.parametrize(
    "prepare, fragments, in_own_process",
    [
        (lambda root: root.mkdir(), ["could not download CIFAR-10 into", "accepted layouts"], True),
        (make_nine_classes, ["found 9 class folders, missing truck", "accepted layouts"], False),
        (make_unreadable_file, ["ship/0009.png is not a readable image"], False),
    ],
)
def test_bad_data_gets_one_line_and_exit_2(tmp_path, prepare, fragments, in_own_process, monkeypatch):
    data = tmp_path / "data"
    prepare(data)
    arguments = ["--data-dir", data, "--cache-dir", tmp_path / "cache", "--logdir", tmp_path / "logs", *TINY_RUN]
    # An unreachable proxy keeps the download attempt offline even where a network exists.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    if in_own_process:
        result = run_forked("train.py", *arguments, output_dir=tmp_path / "output")
    else:
        result = run_in_process("train.py", *arguments)
    assert_one_line_error(result, str(data), *fragments)
    assert not (tmp_path / "logs").exists()
