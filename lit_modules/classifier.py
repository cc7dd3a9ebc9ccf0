"""LightningModule that trains any model of the ``models`` registry as a CIFAR-10 classifier."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from datamodules.cifar10 import IMAGE_SIZE
from datamodules.transforms import CROP_PADDING, normalize
from lit_modules import visuals
from models import InputResize, get_model

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("onecycle", "cosine", "none")
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MISCLASSIFIED_SHOWN = 32


def split_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: weight decay on conv/linear weights, none on BatchNorm and biases.

    Decaying BatchNorm scales and biases only fights their learned scale
    (Goyal et al. 2017, arXiv:1706.02677, section 5.1).
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class LitClassifier(pl.LightningModule):
    """Wraps ``get_model(model_name, num_classes, **model_options)``; the checkpoint alone rebuilds it.

    Args:
        model_name: a name from ``models.list_models()``.
        num_classes: classifier outputs.
        model_options: extra builder options, e.g. ``{"stem": "cifar", "zero_init_residual": True}``.
        optimizer: ``"sgd"`` (with Nesterov momentum), ``"adam"`` or ``"adamw"``.
        lr: peak learning rate.
        momentum: SGD momentum (Adam's beta1 is left at its default).
        weight_decay: applied to conv and linear weights only (see :func:`split_decay_groups`).
        label_smoothing: cross-entropy label smoothing (Szegedy et al. 2016).
        scheduler: ``"onecycle"`` (warm-up then cosine decay, Smith 2018), ``"cosine"``
            (cosine decay from ``lr``) or ``"none"``; stepped every batch.
        warmup_fraction: share of all steps spent warming up under ``"onecycle"``.
        channels_last: keep the weights in channels-last memory format (faster convolutions
            with bf16 on CPUs and tensor-core GPUs).
        test_time_flip: test on the mean of the class probabilities of each image and of
            its mirror image (see :meth:`test_logits`); validation stays single-view, so
            ``val/acc`` and checkpoint selection cost one forward pass per image.
        test_time_shift: with ``s > 0``, also test on four copies of each image shifted by
            ``s`` pixels left, right, up and down (mirrored too under ``test_time_flip``:
            10 views in all); see :meth:`test_views`.
        class_names: label names, saved with the checkpoint for prediction and reports
            (CIFAR-10's when ``num_classes`` is 10).
        input_size: the network sees every batch (train, validation, test, prediction)
            bilinearly resized to ``input_size x input_size``; ``None`` keeps the data's
            size. See :class:`models.InputResize`.
        ema_decay: with ``d > 0``, validate, checkpoint and keep an exponential moving
            average of the weights updated after every step with decay ``d``, warmed up
            over the first steps (:class:`lit_modules.callbacks.ExponentialMovingAverage`);
            0 trains without one.

    ``example_input_array`` is one normalised 32x32 image (the mean colour), so the
    layer summary printed when training starts lists each layer's output size and
    forward FLOPs per image at the size the network really sees (after
    ``input_size``).

    Besides the scalars, a TensorBoard logger receives the confusion matrix and
    per-class accuracy after every validation epoch and after testing, a grid of
    misclassified test images, and a text summary of the model. All of it is
    computed at epoch ends; training steps only update counters, and log the per-step
    scalars only on the steps a logger records.
    """

    def __init__(
        self,
        model_name: str = "resnet50",
        num_classes: int = 10,
        model_options: dict | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.0,
        scheduler: str = "onecycle",
        warmup_fraction: float = 0.15,
        channels_last: bool = False,
        test_time_flip: bool = True,
        test_time_shift: int = 0,
        class_names: list[str] | None = None,
        input_size: int | None = None,
        ema_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if not 0 <= test_time_shift <= CROP_PADDING:
            raise ValueError(f"test_time_shift must be between 0 and {CROP_PADDING}, the padding of the training "
                             f"crops, got {test_time_shift}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if class_names is None:
            class_names = list(CIFAR10_CLASS_NAMES) if num_classes == 10 else [str(i) for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.save_hyperparameters()
        self.input_resize = InputResize(input_size)
        self.model = get_model(model_name, num_classes, **(model_options or {}))
        smallest = getattr(self.model, "min_input_size", 1)
        if input_size is not None and input_size < smallest:
            raise ValueError(f"input size {input_size} is too small for {model_name}, "
                             f"which needs images of at least {smallest}x{smallest}")
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self._misclassified: list[tuple[Tensor, int, int]] = []
        self._step_lr = 0.0
        self.example_input_array = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    def forward(self, images: Tensor) -> Tensor:
        # Under --precision bf16-true or 64-true the weights change type; Lightning converts the batches to it,
        # but not example_input_array, which the layer summary runs through here.
        return self.model(self.input_resize(images.to(self.dtype)))

    def test_views(self, images: Tensor) -> list[Tensor]:
        """The views of a normalised batch that the test stage averages over.

        The batch itself; with ``test_time_shift = s`` four copies shifted by ``s``
        pixels (content moves right, left, down, up), the uncovered border black,
        exactly the windows the training's black-padded random crop can produce;
        with ``test_time_flip`` the left-right mirror of each of those.
        """
        views = [images]
        shift = self.hparams.test_time_shift
        if shift:
            height, width = images.shape[-2:]
            black_pixel = torch.zeros(1, images.shape[1], 1, 1, dtype=torch.uint8, device=images.device)
            black = normalize(black_pixel).to(images.dtype)
            padded = F.pad(images, (shift, shift, shift, shift))
            padded[..., :shift, :] = black
            padded[..., -shift:, :] = black
            padded[..., :, :shift] = black
            padded[..., :, -shift:] = black
            for dy, dx in ((0, -shift), (0, shift), (-shift, 0), (shift, 0)):
                views.append(padded[..., shift + dy:shift + dy + height, shift + dx:shift + dx + width])
        if self.hparams.test_time_flip:
            views += [view.flip(-1) for view in views]
        return views

    def test_logits(self, images: Tensor) -> Tensor:
        """Logits the test stage scores: plain for a single view, else the log of the mean
        of the softmax over the views of :meth:`test_views`.

        Left-right mirroring and small shifts are augmentations the training also
        applies, so these views are familiar to the network. Each view is a forward
        pass of its own, at the batch size: on a 2-core CPU with bf16, VGG-16 at 40x40
        scored ten views of batches of 128 1.35x faster than with the views stacked into
        one batch of 1280 (1.17x at 256; RESULTS.md, "A CPU with bf16 but without AMX").
        The result is a log-probability, so ``argmax`` and cross-entropy read it
        like any logits.
        """
        views = self.test_views(images)
        if len(views) == 1:
            return self(images)
        log_probs = torch.stack([self(view).float().log_softmax(dim=1) for view in views])
        return log_probs.logsumexp(dim=0) - math.log(len(views))

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        images, labels = batch
        logits = self.test_logits(images) if stage == "test" else self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        # Only accumulated here; the accuracy is computed and logged once, at the epoch's end (_log_accuracy).
        getattr(self, f"{stage}_acc").update(logits, labels)
        # The epoch's mean loss stays on each process until the epoch's end, then is synchronised once.
        name = "train/loss_epoch" if stage == "train" else f"{stage}/loss"
        self.log(name, loss, on_step=False, on_epoch=True, prog_bar=stage != "test", sync_dist=True)
        return loss, logits

    def _log_accuracy(self, stage: str) -> None:
        # Lightning computes a logged metric object (synchronised across processes) and resets it.
        self.log(f"{stage}/acc", getattr(self, f"{stage}_acc"), prog_bar=True)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, _ = self._shared_step(batch, "train")
        self._step_lr = self.trainer.optimizers[0].param_groups[0]["lr"]  # the rate this step's update uses
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Per-step scalars are logged only on the steps whose scalars Lightning writes (every
        # log_every_n_steps): each self.log call is about 0.2 ms of Python on a 2-core CPU, a cost
        # that weighs more the shorter the step (RESULTS.md, "Per-step scalars only on the steps a
        # logger writes"). Decided here, after the callbacks' batch-end hooks, as Lightning decides
        # (one of those may stop the run, and the step it stops at is written too).
        connector = getattr(self.trainer, "_logger_connector", None)
        if getattr(connector, "should_update_logs", True) or self.trainer.fast_dev_run:
            self.log("train/loss_step", outputs["loss"], on_step=True, on_epoch=False, prog_bar=True)
            self.log("train/lr", self._step_lr, on_step=True, on_epoch=False)

    def on_train_epoch_end(self) -> None:
        self._log_accuracy("train")

    def validation_step(self, batch, batch_idx: int) -> Tensor:
        loss, logits = self._shared_step(batch, "val")
        self.val_confusion.update(logits, batch[1])
        return loss

    def test_step(self, batch, batch_idx: int) -> Tensor:
        loss, logits = self._shared_step(batch, "test")
        images, labels = batch
        self.test_confusion.update(logits, labels)
        if len(self._misclassified) < MISCLASSIFIED_SHOWN:
            predicted = logits.argmax(dim=1)
            for index in torch.nonzero(predicted != labels).flatten()[: MISCLASSIFIED_SHOWN - len(self._misclassified)]:
                self._misclassified.append((images[index].float().cpu(), int(labels[index]), int(predicted[index])))
        return loss

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=1)

    # ---- TensorBoard extras, all at epoch ends -------------------------------------------------

    def _tensorboard(self):
        """The SummaryWriter of a TensorBoard logger on the main process, else None."""
        from pytorch_lightning.loggers import TensorBoardLogger

        if self.trainer.is_global_zero and isinstance(self.logger, TensorBoardLogger):
            return self.logger.experiment
        return None

    def _log_confusion(self, stage: str, confusion: MulticlassConfusionMatrix) -> None:
        matrix = confusion.compute().cpu()  # synchronised across processes
        confusion.reset()
        if self.trainer.sanity_checking:
            return
        per_class = matrix.diag().float() / matrix.sum(dim=1).clamp(min=1).float()
        for name, value in zip(self.class_names, per_class.tolist()):
            # The same value on every process: synchronising it changes nothing but is Lightning's contract.
            self.log(f"{stage}/acc_class/{name}", value, sync_dist=True)
        writer = self._tensorboard()
        if writer is not None:
            figure = visuals.confusion_matrix_figure(matrix, self.class_names, title=f"{stage} confusion matrix")
            writer.add_figure(f"{stage}/confusion_matrix", figure, global_step=self.global_step)

    def on_fit_start(self) -> None:
        writer = self._tensorboard()
        if writer is not None:
            writer.add_text("model/summary", visuals.model_summary_markdown(self), global_step=0)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")
        self._log_confusion("val", self.val_confusion)

    def on_test_epoch_start(self) -> None:
        self._misclassified = []

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")
        self._log_confusion("test", self.test_confusion)
        writer = self._tensorboard()
        if writer is not None and self._misclassified:
            figure = visuals.misclassified_figure(self._misclassified, self.class_names)
            writer.add_figure("test/misclassified", figure, global_step=self.global_step)
        self._misclassified = []

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The schedule's length is fixed by the epochs and batches per epoch planned at the start; a resumed run
        # must keep both, and validate and test on the batches it started with, so its curve compares like with like.
        if self._trainer is not None:
            checkpoint["planned_epochs"] = self._trainer.max_epochs
            for stage in ("train", "val", "test"):
                checkpoint[f"planned_limit_{stage}_batches"] = getattr(self._trainer, f"limit_{stage}_batches")

    # ---- optimisation ---------------------------------------------------------------------------

    def configure_callbacks(self):
        if self.hparams.get("ema_decay") and self.trainer.state.fn == "fit":
            from lit_modules.callbacks import ExponentialMovingAverage

            return [ExponentialMovingAverage(self.hparams.ema_decay)]
        return []

    def configure_optimizers(self):
        hp = self.hparams
        groups = split_decay_groups(self.model, hp.weight_decay)
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)
        elif hp.optimizer == "adam":
            optimizer = torch.optim.Adam(groups, lr=hp.lr)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        if hp.scheduler == "none":
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.scheduler == "onecycle":
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=hp.lr,
                total_steps=total_steps,
                pct_start=hp.warmup_fraction,
                anneal_strategy="cos",
                div_factor=25.0,
                final_div_factor=1e3,
                cycle_momentum=False,
            )
        else:
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
