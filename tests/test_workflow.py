"""Resume, fine-tune from weights, evaluate, predict, export, and what TensorBoard receives."""

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import DETERMINISTIC_RUN, TINY_RUN
from tests.helpers import assert_one_line_error, run_in_process, scalar_tags

def final_weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_resume_continues_the_same_run_and_matches_an_uninterrupted_one(deterministic_run, image_folder, tmp_path):
    """Stopped after epoch 1 of 2 and resumed: the same curves, weights and test line as the uninterrupted run."""
    common = ["--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--logdir", tmp_path / "split", *DETERMINISTIC_RUN]
    first = run_in_process("train.py", *common, "--stop-after-epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((tmp_path / "split" / "version_0" / "run_info.json").read_text())["epochs"] == 1
    resumed = run_in_process("train.py", *common, "--ckpt-path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["version_0"]
    split_tags, straight_tags = scalar_tags(tmp_path / "split" / "version_0"), scalar_tags(deterministic_run.run_dir)
    assert len(split_tags["val/acc"]) == 2
    assert split_tags["train/loss_step"] == pytest.approx(straight_tags["train/loss_step"], abs=1e-6)
    assert split_tags["val/acc"] == pytest.approx(straight_tags["val/acc"], abs=1e-6)
    assert resumed.stdout.strip().splitlines()[-1] == deterministic_run.test_line
    split_weights = final_weights(tmp_path / "split" / "version_0")
    assert all(torch.equal(split_weights[key], deterministic_run.weights[key]) for key in deterministic_run.weights)
    checkpoint = torch.load(tmp_path / "split" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 6  # 2 epochs of 3 steps

    other_plan = run_in_process("train.py", *common, "--ckpt-path", "last", "--epochs", "5")
    assert_one_line_error(other_plan, "planned for 2 epochs", "--epochs 2")

    # run_info.json keeps the first command line and records each launch; the pause between them is not running time.
    from bench.runs import run_summary, timestamp

    info = json.loads((tmp_path / "split" / "version_0" / "run_info.json").read_text())
    assert "--stop-after-epochs 1" in info["command"] and info["status"] == "finished" and info["epochs"] == 2
    assert [("--ckpt-path last" in launch["command"], launch["status"]) for launch in info["launches"]] == [
        (False, "finished"), (True, "finished")]
    durations = [timestamp(launch["ended"]) - timestamp(launch["started"]) for launch in info["launches"]]
    assert run_summary(tmp_path / "split" / "version_0")["wall_minutes"] == pytest.approx(sum(durations) / 60)


def save_state_dict_variants(best_checkpoint, tmp_path):
    from lit_modules.checkpointing import extract_model_weights, read_checkpoint

    weights = extract_model_weights(read_checkpoint(best_checkpoint), best_checkpoint)
    paths = {"plain": tmp_path / "plain.pt", "state_dict": tmp_path / "wrapped.pt", "model": tmp_path / "model.pth"}
    torch.save(weights, paths["plain"])
    torch.save({"state_dict": weights}, paths["state_dict"])
    torch.save({"model": {f"module.{k}": v for k, v in weights.items()}, "epoch": 3}, paths["model"])
    return weights, paths


def test_init_weights_accepts_every_saved_form(best_checkpoint, tmp_path):
    from lit_modules.checkpointing import init_weights
    from models import get_model

    weights, paths = save_state_dict_variants(best_checkpoint, tmp_path)
    for path in [best_checkpoint, *paths.values()]:
        model = get_model("resnet50")
        assert init_weights(model, path) == []
        assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)


def test_init_strict_and_non_strict(best_checkpoint, tmp_path):
    from lit_modules.checkpointing import CheckpointError, init_weights
    from models import get_model

    head100 = tmp_path / "head100.pt"
    torch.save(get_model("resnet50", num_classes=100).state_dict(), head100)
    with pytest.raises(CheckpointError, match=r"shape mismatch: fc.weight \(100, 2048\) vs \(10, 2048\), fc.bias"):
        init_weights(get_model("resnet50"), head100)
    model = get_model("resnet50", num_classes=100)
    skipped = init_weights(model, best_checkpoint, strict=False)
    assert skipped == ["fc.weight (10, 2048) vs (100, 2048)", "fc.bias (10,) vs (100,)"]
    source = torch.load(best_checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(model.conv1.weight, source["model.conv1.weight"])


def test_init_from_on_the_command_line(best_checkpoint, image_folder, tmp_path):
    """The seed's workflow in one command: load weights, train one epoch on the CPU, print the test accuracy."""
    common = ["--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--logdir", tmp_path / "logs", *TINY_RUN]
    result = run_in_process("train.py", "--init-from", best_checkpoint, "--epochs", "1", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Initialised from {best_checkpoint}\n" in result.stdout
    assert re.search(r"Test accuracy: \d+\.\d\d %$", result.stdout.strip())
    assert (tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()

    vgg = tmp_path / "vgg16.pt"
    from models import get_model

    torch.save(get_model("vgg16").state_dict(), vgg)
    refused = run_in_process("train.py", "--init-from", vgg, "--fast-dev-run", *common)
    assert_one_line_error(refused, f"{vgg} does not fit --model", "missing: conv1.weight", "unexpected: features.0.weight")
    loose = run_in_process("train.py", "--model", "vgg16", "--init-from", best_checkpoint, "--init-strict", "false",
                           "--fast-dev-run", *common)
    assert loose.returncode == 2 and "none of its weights fits" in loose.stderr


def test_evaluate_prints_and_writes_the_report(trained_run, best_checkpoint, image_folder, tmp_path):
    _, training = trained_run
    report = tmp_path / "report.json"
    result = run_in_process("evaluate.py", best_checkpoint, "--json", report)  # the data the run trained on, by default
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == training.stdout.strip().splitlines()[-1]  # same test accuracy
    assert "Per-class accuracy:" in result.stdout and "Confusion matrix" in result.stdout
    data = json.loads(report.read_text())
    matrix = np.array(data["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 30 and (matrix.sum(axis=1) == 3).all()
    assert data["accuracy"] == pytest.approx(np.trace(matrix) / 30)
    assert data["per_class_accuracy"]["cat"] == pytest.approx(matrix[3, 3] / 3)
    assert data["model"] == "resnet50" and data["class_names"][0] == "airplane"
    assert data["test_time_flip"] is True and data["test_time_shift"] == 0  # as train.py tested it, by default
    # the run trained and tested in 32-true (its run_info.json), whatever --precision auto would pick on this CPU
    assert data["precision"] == "32-true" and result.stdout.splitlines()[-1] == "30 test images, scored in 32-true on cpu"

    single_view = run_in_process("evaluate.py", best_checkpoint, "--data-dir", image_folder, "--cache-dir", tmp_path / "cache",
                                 "--test-time-flip", "false", "--test-time-shift", "1", "--json", report)
    assert single_view.returncode == 0, single_view.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["test_time_flip"] is False and data["test_time_shift"] == 1 and np.array(data["confusion_matrix"]).sum() == 30


@pytest.mark.parametrize("script", ["evaluate.py", "export.py", "train.py --ckpt-path"])
def test_a_run_folder_for_a_checkpoint_is_answered_with_its_checkpoints(script, trained_run, tmp_path):
    run_dir, _ = trained_run
    checkpoints = ", ".join(str(path) for path in sorted((run_dir / "checkpoints").glob("*.ckpt")))
    assert checkpoints.endswith("last.ckpt") and "best-epoch=" in checkpoints
    name, *flag = script.split()
    after = ["--format", "onnx", "--out", tmp_path / "model.onnx"] if name == "export.py" else []
    for folder in (run_dir, run_dir / "checkpoints"):
        result = run_in_process(name, *flag, folder, *after)
        assert_one_line_error(result, f"{folder} is a folder, not a file; give one of its checkpoints: {checkpoints}")
    empty = run_in_process(name, *flag, tmp_path, *after)
    assert_one_line_error(empty, f"{tmp_path} is a folder, not a file")
    assert "give one of its checkpoints" not in empty.stderr
    assert sorted(tmp_path.iterdir()) == []


def test_report_files_that_cannot_be_written_are_refused_before_the_work(best_checkpoint, trained_run, tmp_path):
    run_dir, _ = trained_run
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept")
    for script, target, flag, fragment in [
        ("evaluate.py", tmp_path, "--json", f"--json {tmp_path} is a folder; give a file name"),
        ("evaluate.py", a_file / "report.json", "--json", f"--json {a_file / 'report.json'}: {a_file} is a file, not a folder"),
        ("bench/plot_results.py", tmp_path, "--out", f"--out {tmp_path} is a folder; give a file name"),
        ("export.py", tmp_path, "--out", f"--out {tmp_path} is a folder; give a file name"),
        ("export.py", a_file / "model.onnx", "--out", f"--out {a_file / 'model.onnx'}: {a_file} is a file, not a folder"),
    ]:
        inputs = {"evaluate.py": [best_checkpoint], "export.py": [best_checkpoint, "--format", "onnx"]}.get(script, [run_dir])
        refused = run_in_process(script, *inputs, flag, target)
        assert_one_line_error(refused, fragment)
        assert refused.stdout == ""  # refused before scoring or drawing anything
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"] and a_file.read_text() == "kept"


def test_a_failed_json_write_leaves_no_partial_file(tmp_path):
    from cli import write_json_atomic

    target = tmp_path / "report.json"
    target.mkdir()  # os.replace cannot put a file where a folder is
    with pytest.raises(OSError):
        write_json_atomic(target, {"accuracy": 0.5})
    assert [path.name for path in tmp_path.iterdir()] == ["report.json"] and target.is_dir()


def test_evaluate_refuses_a_recorded_data_folder_that_is_gone(best_checkpoint, image_folder, tmp_path):
    checkpoint = torch.load(best_checkpoint, map_location="cpu", weights_only=True)
    assert checkpoint["CIFAR10DataModule"]["data_dir"] == str(image_folder.resolve())
    gone = tmp_path / "moved-away"
    checkpoint["CIFAR10DataModule"]["data_dir"] = str(gone)
    moved = tmp_path / "moved.ckpt"
    torch.save(checkpoint, moved)

    refused = run_in_process("evaluate.py", moved)
    assert_one_line_error(refused, f"{moved} was trained on {gone}, which is not there", "--data-dir")
    assert not gone.exists()  # nothing was downloaded into it
    told = run_in_process("evaluate.py", moved, "--data-dir", image_folder, "--cache-dir", tmp_path / "cache")
    assert told.returncode == 0 and told.stdout.startswith("Test accuracy: "), told.stderr[-3000:]


def test_evaluate_scores_at_the_precision_the_run_recorded_unless_told(best_checkpoint, image_folder, tmp_path):
    from cli import resolve_precision

    run_dir = tmp_path / "version_0"
    (run_dir / "checkpoints").mkdir(parents=True)
    checkpoint = run_dir / "checkpoints" / "best.ckpt"
    checkpoint.write_bytes(best_checkpoint.read_bytes())
    data = ["--data-dir", image_folder, "--cache-dir", tmp_path / "cache", "--device", "cpu"]

    def scored_precision(*flags) -> str:
        report = tmp_path / "report.json"
        result = run_in_process("evaluate.py", checkpoint, *data, *flags, "--json", report)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(report.read_text())["precision"]

    assert scored_precision() == resolve_precision("auto", "cpu")  # no record beside the checkpoint
    launches = [{"started": "2026-12-01T10:00:00+0000", "precision": "32-true"},
                {"started": "2026-12-01T11:00:00+0000", "precision": "64-true"}]  # resumed: the last launch tested
    (run_dir / "run_info.json").write_text(json.dumps({"precision": "32-true", "launches": launches}))
    assert scored_precision() == "64-true"
    assert scored_precision("--precision", "bf16-true") == "bf16-true"

    fp16_on_cpu = run_in_process("evaluate.py", checkpoint, *data, "--precision", "16-mixed")
    assert_one_line_error(fp16_on_cpu, "--precision 16-mixed needs a CUDA GPU", "--precision bf16-mixed or 32-true")
    launches[-1]["precision"] = "16-mixed"
    (run_dir / "run_info.json").write_text(json.dumps({"precision": "16-mixed", "launches": launches}))
    recorded_fp16 = run_in_process("evaluate.py", checkpoint, *data)
    assert_one_line_error(recorded_fp16, "the run tested in 16-mixed, which needs a CUDA GPU")


@pytest.fixture
def prediction_inputs(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "small.png")
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(folder / "large.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8)).save(folder / "nested" / "gray.png")
    Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_on_files_and_folders(best_checkpoint, prediction_inputs, tmp_path):
    result = run_in_process("predict.py", best_checkpoint, prediction_inputs, "--top-k", "3", "--json")
    assert result.returncode == 1  # one file was not an image
    assert "notes.txt is not a readable image" in result.stderr and "Traceback" not in result.stderr
    data = json.loads(result.stdout)
    files = [r["file"].split("/images/")[1] for r in data["results"]]
    assert files == ["large.jpg", "nested/gray.png", "rgba.png", "small.png"]
    assert data["failed"] == [str(prediction_inputs / "notes.txt")]
    for entry in data["results"]:
        probabilities = [p["probability"] for p in entry["predictions"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1.0 + 1e-5

    text = run_in_process("predict.py", best_checkpoint, prediction_inputs / "small.png", "--top-k", "2")
    assert text.returncode == 0
    assert re.fullmatch(r".*small\.png: \w+ \d+\.\d%, \w+ \d+\.\d%\n", text.stdout)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_in_process("predict.py", best_checkpoint, empty), "empty folder")
    assert_one_line_error(run_in_process("predict.py", best_checkpoint, tmp_path / "nope.png"), "nope.png: no such file")
    assert_one_line_error(run_in_process("predict.py", best_checkpoint, prediction_inputs, "--top-k", "11"),
                          "--top-k 11 is more than the model's 10 classes; use at most 10")


@pytest.fixture(scope="module")
def exported(best_checkpoint, tmp_path_factory):
    """format -> (file, export.py's completed process, the warnings it raised), each exported once for the tests below."""
    folder = tmp_path_factory.mktemp("exported")
    files = {}
    for export_format in ("onnx", "torchscript"):
        out = folder / export_format / f"model.{export_format}"  # export.py makes the missing folder
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            result = run_in_process("export.py", best_checkpoint, "--format", export_format, "--out", out)
        files[export_format] = out, result, raised
    return files


@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_export_matches_pytorch(best_checkpoint, exported, export_format):
    from lit_modules import load_classifier

    out, result, raised = exported[export_format]
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.is_file() and f"Wrote {out}" in result.stdout
    assert [str(warning.message) for warning in raised] == []  # a user sees no tracer or deprecation notices
    reference = load_classifier(best_checkpoint).float().eval()  # resizes to the trained input size, as the export must
    assert reference.input_resize.size == 48
    for batch_size in (1, 7):
        images = torch.randn(batch_size, 3, 32, 32)
        with torch.no_grad():
            expected = reference(images)
        if export_format == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            (got,) = session.run(None, {"images": images.numpy()})
            got = torch.from_numpy(got)
            assert json.loads(session.get_modelmeta().custom_metadata_map["class_names"])[3] == "cat"
        else:
            files = {"class_names.json": ""}
            loaded = torch.jit.load(str(out), _extra_files=files)
            with torch.no_grad():
                got = loaded(images)
            assert json.loads(files["class_names.json"])[3] == "cat"
        assert got.shape == (batch_size, 10)
        assert (got - expected).abs().max() <= 1e-4


def test_an_opset_the_exporter_cannot_serve_is_one_line_and_writes_nothing(best_checkpoint, tmp_path):
    out = tmp_path / "new" / "folders" / "model.onnx"
    result = run_in_process("export.py", best_checkpoint, "--format", "onnx", "--out", out, "--opset", "99")
    assert_one_line_error(result, "the ONNX export failed at --opset 99", "the default 17 works")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_a_full_disk_under_the_export_is_one_line_and_writes_nothing(best_checkpoint, tmp_path, monkeypatch,
                                                                      export_format):
    import errno
    import pathlib

    real_write_bytes = pathlib.Path.write_bytes

    def full_disk(path, data):
        real_write_bytes(path, data[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)
    out = tmp_path / "new" / f"model.{export_format}"
    result = run_in_process("export.py", best_checkpoint, "--format", export_format, "--out", out)
    assert_one_line_error(result, f"--out {out}: could not write it (No space left on device); free some space")
    assert list(tmp_path.iterdir()) == []


def test_predict_runs_an_exported_onnx_model(best_checkpoint, exported, prediction_inputs):
    out, export, _ = exported["onnx"]
    assert export.returncode == 0, export.stderr[-3000:]
    from_onnx = run_in_process("predict.py", out, prediction_inputs / "small.png", prediction_inputs / "large.jpg", "--json")
    from_ckpt = run_in_process("predict.py", best_checkpoint, prediction_inputs / "small.png", prediction_inputs / "large.jpg", "--json")
    assert from_onnx.returncode == 0 and from_ckpt.returncode == 0
    onnx_results, ckpt_results = json.loads(from_onnx.stdout)["results"], json.loads(from_ckpt.stdout)["results"]
    for a, b in zip(onnx_results, ckpt_results):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        assert [p["probability"] for p in a["predictions"]] == pytest.approx([p["probability"] for p in b["predictions"]], abs=1e-4)


def test_tensorboard_gets_images_text_per_class_scalars_and_hparams(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = trained_run
    images, texts, hparams_tags = set(), set(), set()
    for event_file in run_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file), size_guidance={"images": 0, "tensors": 0})
        accumulator.Reload()
        images |= set(accumulator.Tags()["images"])
        texts |= set(accumulator.Tags()["tensors"])
        try:
            hparams_tags |= set(accumulator.PluginTagToContent("hparams"))
        except KeyError:  # this file holds no hparams summary
            pass
    assert {"val/confusion_matrix", "test/confusion_matrix", "test/misclassified"} <= images
    assert any(tag.startswith("model/summary") for tag in texts)
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= hparams_tags
    tags = scalar_tags(run_dir)
    assert len(tags["val/acc_class/cat"]) == 2 and "test/acc_class/truck" in tags
    assert tags["hp/test_acc"] == tags["test/acc"]


def test_plot_results_draws_runs_into_a_png_and_refuses_folders_without_curves(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "plots" / "curves.png"
    drawn = run_in_process("bench/plot_results.py", run_dir, tmp_path, "--out", out)
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    assert f"skipped {tmp_path}: no val/acc" in drawn.stderr
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (880, 550)
    assert len(set(image.convert("RGB").getdata())) > 20  # axes, curve and legend, not a blank canvas

    nothing = run_in_process("bench/plot_results.py", tmp_path, "--out", tmp_path / "empty.png")
    assert_one_line_error(nothing, f"plot_results.py: error: {tmp_path} holds no val/acc curve")
    assert not (tmp_path / "empty.png").exists()


def test_summarize_prints_a_row_per_run_and_refuses_folders_that_are_not_runs(trained_run, tmp_path):
    run_dir, _ = trained_run
    table = run_in_process("bench/summarize.py", run_dir, tmp_path)
    assert table.returncode == 0, table.stderr[-3000:]
    assert f"skipped {tmp_path}: not a train.py run folder" in table.stderr
    header, rule, *rows = table.stdout.strip().splitlines()
    assert header.startswith("| model |") and len(rows) == 1
    assert rows[0].startswith("| resnet50 | imagenet |") and "train.py" in rows[0]

    # The same run reached through another ".../logs/version_0": the log column tells the two apart.
    other_root = tmp_path / "other" / run_dir.parent.parent.name
    other_root.mkdir(parents=True)
    (other_root / "logs").symlink_to(run_dir.parent, target_is_directory=True)
    both = run_in_process("bench/summarize.py", run_dir, other_root / "logs" / run_dir.name)
    assert both.returncode == 0, both.stderr[-3000:]
    first, second = both.stdout.strip().splitlines()[2:]
    assert f"| {run_dir.parents[2].name}/{run_dir.parents[1].name}/logs/version_0 |" in first
    assert f"| other/{run_dir.parents[1].name}/logs/version_0 |" in second

    nothing = run_in_process("bench/summarize.py", tmp_path)
    assert_one_line_error(nothing, f"summarize.py: error: {tmp_path} is not a train.py run folder")
    assert nothing.stdout == ""
