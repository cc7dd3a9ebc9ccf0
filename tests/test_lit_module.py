import lightning_fabric.utilities.data
import pytorch_lightning as pl
import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.model_summary import ModelSummary

from cli import quiet_library_notices
from datamodules import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule, normalize
from lit_modules import LitClassifier
from lit_modules.callbacks import EMA_SUPPORTED, ExponentialMovingAverage
from lit_modules.classifier import split_decay_groups
from tests.conftest import SUMMARY_COUNTS_FLOPS


def small_trainer(tmp_path, **options) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    defaults.update(options)
    return pl.Trainer(**defaults)


@pytest.mark.parametrize("model_name, optimizer", [("resnet50", "sgd"), ("vgg16", "adam")])
def test_fast_dev_run_trains_validates_and_tests(image_folder, cache_dir, tmp_path, model_name, optimizer):
    pl.seed_everything(0)
    datamodule = CIFAR10DataModule(image_folder, batch_size=8, val_size=20, cache_dir=cache_dir)
    module = LitClassifier(model_name, optimizer=optimizer, lr=0.01)
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer = small_trainer(tmp_path, fast_dev_run=True)
    trainer.fit(module, datamodule=datamodule)
    logged = trainer.callback_metrics
    assert {"train/loss_step", "train/loss_epoch", "train/acc", "train/lr", "val/loss", "val/acc"} <= set(logged)
    assert any(not torch.equal(b, p) for b, p in zip(before, module.model.parameters()))
    result = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    assert {"test/loss", "test/acc", "test/acc_class/cat"} <= set(result) and 0.0 <= result["test/acc"] <= 1.0


def test_worker_suggestion_is_dropped_on_a_machine_of_many_cores(image_folder, cache_dir, tmp_path, monkeypatch, recwarn):
    """Lightning suggests DataLoader workers for each loader where more than two cores exist (a GPU machine, most
    laptops); the images are in memory already, so quiet_library_notices drops the suggestion."""
    monkeypatch.setattr(lightning_fabric.utilities.data, "_num_cpus_available", lambda: 16)
    datamodule = CIFAR10DataModule(image_folder, batch_size=8, val_size=20, cache_dir=cache_dir)
    module = LitClassifier("resnet50_seed")

    def worker_suggestions() -> list[str]:
        small_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(module, datamodule=datamodule)
        suggestions = [str(w.message) for w in recwarn if "does not have many workers" in str(w.message)]
        recwarn.clear()
        return suggestions

    assert len(worker_suggestions()) == 2  # the training and the validation loader
    quiet_library_notices()
    assert worker_suggestions() == []


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_true_precisions_train_with_the_layer_summary(image_folder, cache_dir, tmp_path, precision, dtype):
    """The summary's example image reaches the network in the weights' type, as the batches do."""
    datamodule = CIFAR10DataModule(image_folder, batch_size=8, val_size=20, cache_dir=cache_dir)
    module = LitClassifier("resnet50_seed")
    trainer = small_trainer(tmp_path, precision=precision, enable_model_summary=True, max_epochs=1,
                            limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=datamodule)
    assert {parameter.dtype for parameter in module.model.parameters()} == {dtype}
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["val/loss"])


@pytest.mark.skipif(not SUMMARY_COUNTS_FLOPS, reason="the layer summary counts FLOPs from pytorch-lightning 2.6 on")
def test_layer_summary_counts_forward_flops_per_image_at_the_size_the_network_sees():
    def summary_flops(**options) -> int:
        return ModelSummary(LitClassifier("resnet50", **options)).total_flops

    # ResNet-50 at 224x224 has 4.09 G multiply-adds (torchvision's model table); the counter counts two FLOPs each.
    assert summary_flops(num_classes=1000, input_size=224) == pytest.approx(2 * 4.09e9, rel=0.005)
    # At 32x32 the last stage's convolutions on 1x1 maps count only the taps that meet a pixel (models.layers):
    # 142.7 M, where the convolution formula counts 166.9 M.
    own_size = summary_flops()
    assert own_size == pytest.approx(142.7e6, rel=0.005)
    assert summary_flops(input_size=48) > 2 * own_size
    assert summary_flops(model_options={"stem": "cifar"}) == pytest.approx(2.596e9, rel=0.005)


def test_forward_returns_logits():
    module = LitClassifier("resnet50", num_classes=7, model_options={"stem": "cifar"}).eval()
    with torch.no_grad():
        assert module(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    assert module.model.conv1.stride == (1, 1)


def test_checkpoint_alone_rebuilds_the_model(tmp_path):
    module = LitClassifier("resnet50", num_classes=10, model_options={"stem": "cifar"}, lr=0.3, label_smoothing=0.2,
                           input_size=40)
    trainer = small_trainer(tmp_path, max_epochs=0)
    trainer.strategy.connect(module)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = LitClassifier.load_from_checkpoint(path).eval()
    module.eval()
    assert restored.hparams.lr == 0.3 and restored.hparams.model_options == {"stem": "cifar"}
    assert restored.input_resize.size == 40
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), module(images))


def test_input_size_resizes_what_the_network_sees_in_every_stage():
    torch.manual_seed(0)
    module = LitClassifier("resnet50", input_size=48).eval()
    seen = []
    module.model.conv1.register_forward_hook(lambda layer, inputs, output: seen.append(tuple(inputs[0].shape)))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = module(images)
        module.test_logits(images)
        expected = module.model(torch.nn.functional.interpolate(images, size=(48, 48), mode="bilinear"))
    assert seen == [(3, 3, 48, 48)] * 4  # plain; image and mirror, a forward pass each; reference
    torch.testing.assert_close(logits, expected)


def test_test_time_flip_averages_the_probabilities_of_image_and_mirror():
    torch.manual_seed(0)
    module = LitClassifier("vgg16", test_time_flip=True).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain = module(images)
        expected = ((plain.softmax(1) + module(images.flip(-1)).softmax(1)) / 2).log()
        averaged = module.test_logits(images)
        module.hparams.test_time_flip = False
        single = module.test_logits(images)
    torch.testing.assert_close(averaged, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(averaged.softmax(1), plain.softmax(1), atol=1e-4)
    torch.testing.assert_close(single, plain)


NORMALISED_BLACK = torch.tensor([-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD)]).view(1, 3, 1, 1)


def _shifted(images, dy, dx):
    """``images`` moved ``dy`` pixels down and ``dx`` right, the uncovered border black (as the training crop pads)."""
    moved = torch.roll(images, shifts=(dy, dx), dims=(-2, -1))
    border = torch.zeros_like(images, dtype=torch.bool)
    if dy > 0:
        border[..., :dy, :] = True
    elif dy < 0:
        border[..., dy:, :] = True
    if dx > 0:
        border[..., :, :dx] = True
    elif dx < 0:
        border[..., :, dx:] = True
    return torch.where(border, NORMALISED_BLACK.expand_as(images), moved)


def test_test_time_shift_averages_ten_shifted_and_mirrored_views():
    torch.manual_seed(0)
    module = LitClassifier("vgg16", test_time_flip=True, test_time_shift=2).eval()
    images = torch.randn(3, 3, 32, 32)
    shifted = [images] + [_shifted(images, dy, dx) for dy, dx in ((0, 2), (0, -2), (2, 0), (-2, 0))]
    views = shifted + [view.flip(-1) for view in shifted]
    with torch.no_grad():
        expected = torch.stack([module(view).softmax(1) for view in views]).mean(0).log()
        averaged = module.test_logits(images)
        module.hparams.test_time_flip = False
        unmirrored = module.test_logits(images)
        expected_unmirrored = torch.stack([module(view).softmax(1) for view in shifted]).mean(0).log()
    assert len(module.test_views(images)) == 5
    torch.testing.assert_close(averaged, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unmirrored, expected_unmirrored, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(averaged, unmirrored, atol=1e-4)


def test_shifted_views_are_windows_of_the_black_padded_image_as_the_training_crop_takes_them():
    module = LitClassifier("vgg16", test_time_shift=3, test_time_flip=False)
    raw = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    padded = torch.nn.functional.pad(raw, (3, 3, 3, 3))  # black, as datamodules.transforms.random_crop pads
    views = module.test_views(normalize(raw))
    windows = [padded[..., 3:35, 0:32], padded[..., 3:35, 6:38], padded[..., 0:32, 3:35], padded[..., 6:38, 3:35]]
    assert len(views) == 5
    torch.testing.assert_close(views[0], normalize(raw))
    for view, window in zip(views[1:], windows):
        torch.testing.assert_close(view, normalize(window))


@pytest.mark.parametrize("shift", [-1, 5])
def test_a_test_time_shift_outside_the_training_crops_is_refused(shift):
    with pytest.raises(ValueError, match=f"test_time_shift must be between 0 and 4, the padding of the training crops, got {shift}"):
        LitClassifier("vgg16", test_time_shift=shift)


def test_weight_decay_skips_batchnorm_and_biases():
    module = LitClassifier("vgg16")
    decay, no_decay = split_decay_groups(module.model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))


def test_onecycle_warms_up_then_decays(image_folder, cache_dir, tmp_path):
    datamodule = CIFAR10DataModule(image_folder, batch_size=8, val_size=20, cache_dir=cache_dir)
    module = LitClassifier("resnet50_seed", lr=0.1, scheduler="onecycle", warmup_fraction=0.25)
    rates = []

    class RecordLearningRate(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = small_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[RecordLearningRate()])
    trainer.fit(module, datamodule=datamodule)
    assert len(rates) == 14  # 2 epochs x 7 full batches of 8 out of 60 images
    peak = rates.index(max(rates))
    assert 0 < peak < len(rates) - 1
    assert max(rates) == pytest.approx(0.1, rel=0.05)
    assert rates[0] == pytest.approx(0.1 / 25) and rates[-1] < rates[0]
    assert trainer.optimizers[0].param_groups[0]["nesterov"] is True


@pytest.mark.parametrize("stop_at_step", [None, 4])
def test_per_step_scalars_are_written_with_their_own_step_values(image_folder, cache_dir, tmp_path, stop_at_step):
    """train/loss_step and train/lr are logged only on the steps a logger writes (every log_every_n_steps, and the
    step where a callback stops the run); each written value is that step's loss and the rate its update used."""
    from bench.runs import scalars

    datamodule = CIFAR10DataModule(image_folder, batch_size=8, val_size=20, cache_dir=cache_dir)
    module = LitClassifier("resnet50_seed", lr=0.1)
    losses, rates = [], []

    class RecordAndStop(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            if trainer.global_step == stop_at_step:
                trainer.should_stop = True

    logged_names, log = [], module.log

    def counted_log(name, *args, **kwargs):
        logged_names.append(name)
        return log(name, *args, **kwargs)

    module.log = counted_log
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="", default_hp_metric=False)
    trainer = small_trainer(tmp_path, max_epochs=1, limit_val_batches=0, logger=logger, log_every_n_steps=3,
                            callbacks=[RecordAndStop()])
    trainer.fit(module, datamodule=datamodule)
    series = {tag: {step: value for _, step, value in points} for tag, points in scalars(tmp_path / "version_0").items()}
    written_steps = [2, 5] if stop_at_step is None else [2, 3]  # 7 batches; steps counted from 0
    assert len(losses) == (7 if stop_at_step is None else 4) and len(set(losses)) == len(losses)
    assert sorted(series["train/loss_step"]) == sorted(series["train/lr"]) == written_steps
    for step in written_steps:
        assert series["train/loss_step"][step] == pytest.approx(losses[step], rel=1e-6)
        assert series["train/lr"][step] == pytest.approx(rates[step], rel=1e-6)
    # the per-step scalars are logged on the written steps only, the accuracy once, at the epoch's end
    assert logged_names.count("train/loss_step") == logged_names.count("train/lr") == len(written_steps)
    assert logged_names.count("train/acc") == 1 and logged_names.count("train/loss_epoch") == len(losses)
    assert len(series["train/loss_epoch"]) == len(series["train/acc"]) == 1


def test_an_input_size_below_what_the_network_takes_is_refused():
    """VGG-16's five max-pools need 32x32; ResNet-50's strided convolutions take any size."""
    with pytest.raises(ValueError, match="input size 31 is too small for vgg16, which needs images of at least 32x32"):
        LitClassifier("vgg16", input_size=31)
    assert LitClassifier("vgg16", input_size=32).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert LitClassifier("resnet50", input_size=4).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("option, value", [("optimizer", "rmsprop"), ("scheduler", "step")])
def test_unknown_optimiser_settings_raise(option, value):
    with pytest.raises(ValueError, match=f"unknown {option}"):
        LitClassifier("vgg16", **{option: value})


def test_momentum_of_one_or_more_is_refused():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.0"):
        LitClassifier("vgg16", momentum=1.0)


def test_ema_decay_out_of_range_is_refused():
    with pytest.raises(ValueError, match="ema_decay must be in"):
        LitClassifier("vgg16", ema_decay=1.0)


class TinyRegression(pl.LightningModule):
    """One linear layer trained by plain SGD, recording its weight after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1, bias=False)
        self.weights_after_step: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.layer(inputs), targets)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.weights_after_step.append(self.layer.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


@pytest.mark.skipif(not EMA_SUPPORTED, reason="weight averaging needs pytorch-lightning 2.6")
def test_ema_warms_up_so_the_first_weights_fade_within_a_few_steps(tmp_path):
    torch.manual_seed(0)
    inputs = torch.randn(80, 4)
    targets = inputs @ torch.tensor([[1.0], [-2.0], [3.0], [0.5]])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=4)
    module = TinyRegression()
    ema = ExponentialMovingAverage(0.999)
    small_trainer(tmp_path, max_epochs=1, callbacks=[ema]).fit(module, train_dataloaders=loader)

    weights = module.weights_after_step
    assert len(weights) == 20
    expected = weights[0]
    for step_idx, weight in enumerate(weights[1:], start=1):
        decay = min(0.999, (1 + step_idx) / (10 + step_idx))
        expected = decay * expected + (1 - decay) * weight
    # Training ends with the average in place; without the warm-up it would still be 98 % the first step's weights.
    assert torch.allclose(module.layer.weight, expected, atol=1e-6)
    assert not torch.allclose(module.layer.weight, 0.999 ** 19 * weights[0] + (1 - 0.999 ** 19) * weights[-1], atol=1e-3)
    assert [ema.step_decay(n) for n in (1, 890, 8990, 20000)] == pytest.approx([2 / 11, 0.99, 0.999, 0.999])


class SaveDuringValidation(pl.Callback):
    """Saves a checkpoint at the first validation batch of every epoch, while the network holds the average."""

    def __init__(self, path) -> None:
        self.path = path

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            trainer.save_checkpoint(self.path)


@pytest.mark.skipif(not EMA_SUPPORTED, reason="weight averaging needs pytorch-lightning 2.6")
def test_ema_checkpoints_and_tests_the_average_and_resumes_both(image_folder, cache_dir, tmp_path):
    pl.seed_everything(0)
    datamodule = CIFAR10DataModule(image_folder, batch_size=8, val_size=20, cache_dir=cache_dir)
    module = LitClassifier("resnet50_seed", lr=0.05, scheduler="none", ema_decay=0.5)
    end_of_epoch = ModelCheckpoint(dirpath=tmp_path, filename="end", monitor=None)
    trainer = small_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, num_sanity_val_steps=0,
                            callbacks=[SaveDuringValidation(tmp_path / "mid_validation.ckpt"), end_of_epoch])
    trainer.fit(module, datamodule=datamodule)
    assert [c.decay for c in trainer.callbacks if isinstance(c, ExponentialMovingAverage)] == [0.5]

    saved = torch.load(tmp_path / "end.ckpt", weights_only=True)
    average, trained = saved["state_dict"], saved["current_model_state"]
    assert any(not torch.equal(average[name], trained[name]) for name in average)
    final = module.state_dict()  # training ends with the average in the network
    assert all(torch.equal(final[name], average[name]) for name in average)
    # Saved mid-validation (as an interrupt would): still the average in state_dict, the trained weights beside it.
    mid = torch.load(tmp_path / "mid_validation.ckpt", weights_only=True)
    assert all(torch.equal(mid["state_dict"][n], average[n]) and torch.equal(mid["current_model_state"][n], trained[n])
               for n in average)

    # Testing a checkpoint scores its average, not the trained weights kept beside it.
    trainer.test(module, datamodule=datamodule, ckpt_path=tmp_path / "end.ckpt", verbose=False)
    tested = module.state_dict()
    assert all(torch.equal(tested[name], average[name]) for name in average)

    # Resuming trains on from the trained weights, with the average restored beside them.
    seen = {}

    class RecordStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            (ema,) = [c for c in trainer.callbacks if isinstance(c, ExponentialMovingAverage)]
            seen["trained"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            seen["average"] = {k[len("module."):]: v.clone() for k, v in ema._average_model.state_dict().items()
                               if k.startswith("module.")}

    resumed = LitClassifier("resnet50_seed", lr=0.05, scheduler="none", ema_decay=0.5)
    small_trainer(tmp_path, max_epochs=3, num_sanity_val_steps=0, callbacks=[RecordStart()]).fit(
        resumed, datamodule=datamodule, ckpt_path=tmp_path / "end.ckpt")
    assert all(torch.equal(seen["trained"][n], trained[n]) and torch.equal(seen["average"][n], average[n])
               for n in average)
