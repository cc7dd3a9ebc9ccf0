import re

import pytest

from tests.helpers import assert_one_line_error, run_script, scalar_tags

TINY_RUN = ["--val-size", "20", "--batch-size", "16", "--progress-refresh", "0", "--accelerator", "cpu"]


def test_train_end_to_end(image_folder, cache_dir, tmp_path):
    logdir = tmp_path / "logs"
    result = run_script(
        "train.py", "--model", "resnet50", "--data-dir", image_folder, "--cache-dir", cache_dir,
        "--logdir", logdir, "--epochs", "2", "--log-every-n-steps", "1", *TINY_RUN,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last_line = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"Test accuracy: (\d+\.\d\d) %", last_line)
    assert match and 0 <= float(match.group(1)) <= 100
    run_dir = logdir / "version_0"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(name.startswith("best-epoch=") for name in checkpoints)
    assert (run_dir / "hparams.yaml").is_file()
    tags = scalar_tags(run_dir)
    assert len(tags["val/acc"]) == 2 and all(0 <= v <= 1 for v in tags["val/acc"])
    assert {"train/loss_step", "train/acc", "val/loss", "test/acc", "train/lr"} <= set(tags)
    assert tags["test/acc"][0] == pytest.approx(float(match.group(1)) / 100, abs=1e-4)


def test_vgg16_fast_dev_run(image_folder, cache_dir, tmp_path):
    result = run_script(
        "train.py", "--model", "vgg16", "--data-dir", image_folder, "--cache-dir", cache_dir,
        "--logdir", tmp_path / "logs", "--fast-dev-run", *TINY_RUN,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^Test accuracy: \d+\.\d\d %$", result.stdout, re.M)


def test_help_documents_every_flag_with_its_default():
    result = run_script("train.py", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in ["--model", "--stem", "--data-dir", "--epochs", "--batch-size", "--lr", "--optimizer",
                 "--weight-decay", "--label-smoothing", "--seed", "--accelerator", "--devices", "--precision",
                 "--num-workers", "--limit-train-batches", "--limit-val-batches", "--limit-test-batches",
                 "--fast-dev-run", "--logdir", "--ckpt-path"]:
        assert flag in text
    assert text.count("(default:") >= 30
    for default in ["resnet50", "./data", "lightning_logs", "auto", "imagenet", "sgd"]:
        assert f"(default: {default})" in text


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "resnet18"], "invalid choice: 'resnet18'"),
        (["--epochs", "-1"], "--epochs: must be a positive integer"),
        (["--epochs", "0"], "--epochs: must be a positive integer"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer"),
        (["--lr", "0"], "--lr: must be a positive number"),
        (["--lr", "nan"], "--lr: must be a positive number"),
        (["--precision", "8"], "--precision: invalid choice"),
        (["--devices", "two"], "--devices takes a count"),
        (["--ckpt-path", "missing.ckpt"], "missing.ckpt: no such file"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(args, fragment, tmp_path):
    result = run_script("train.py", "--logdir", tmp_path / "logs", *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "logs").exists()


def make_wrong_layout(root):
    (root / "cat").mkdir(parents=True)


def make_nine_classes(root):
    from tests.conftest import write_image_folder
    import shutil

    write_image_folder(root, 1, 1)
    shutil.rmtree(root / "train" / "truck")


@pytest.mark.parametrize(
    "prepare, fragment",
    [
        (lambda root: root.mkdir(), "could not download CIFAR-10 into"),
        (make_wrong_layout, "train is missing"),
        (make_nine_classes, "found 9 class folders, missing truck"),
    ],
)
def test_bad_data_gets_one_line_and_exit_2(tmp_path, prepare, fragment, monkeypatch):
    data = tmp_path / "data"
    prepare(data)
    # An unreachable proxy keeps the download attempt offline even where a network exists.
    offline = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    result = run_script("train.py", "--data-dir", data, "--cache-dir", tmp_path / "cache", "--logdir",
                        tmp_path / "logs", *TINY_RUN, env=offline)
    assert_one_line_error(result, str(data), fragment, "accepted layouts")
    assert not (tmp_path / "logs").exists()
