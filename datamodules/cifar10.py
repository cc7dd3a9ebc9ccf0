"""CIFAR-10 (Krizhevsky 2009) as a LightningDataModule that keeps every image in memory.

Sources, detected from ``data_dir``:

* an image folder: ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*``
  with the ten CIFAR-10 class names as folder names (PNG, JPEG or anything PIL
  opens, 32x32; other sizes are refused, not resized, so a wrong dataset is
  never trained on silently; grayscale or RGBA images are converted to RGB);
* the official python version, ``data_dir/cifar-10-batches-py``, which
  torchvision downloads and verifies when it is absent.

Images are decoded once into a ``(N, 3, 32, 32)`` uint8 tensor. For an image
folder the decoded arrays are cached in ``cache_dir`` (never inside the data
folder), keyed by the folder's path and every file's name, size and mtime, so
the next run loads them in well under a second. The loaders yield uint8
batches; augmentation and normalisation run on whole batches after the batch
has reached its device (``on_after_batch_transfer``), on the GPU when training
there.

Validation is held out from the training images (``val_size`` of them, chosen
by a fixed ``split_seed``); the test set is never used for model selection.
Validation and test images come in a fixed shuffled order (an image folder
lists them class by class), so a test limited to a few batches samples every
class.

Reproducible and resumable, from any checkpoint: each epoch's shuffling
order is drawn from ``seed`` and the number of passes so far (part of the
module's ``state_dict``, which Lightning stores in every checkpoint); each
training batch's crops and flips are drawn from ``seed``, the process rank and
the optimiser step; and the training loader records how many batches of the
current epoch were trained (:class:`ResumableDataLoader`). A run resumed from
a checkpoint taken between epochs or part-way through one therefore trains on
exactly the batches, augmented exactly as, the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Sampler, TensorDataset

from cli import DEFAULT_DATA_DIR, os_error_behind
from datamodules.errors import DataError
from datamodules.transforms import normalize, train_augment

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SIZE = 32
OFFICIAL_FOLDER = "cifar-10-batches-py"
ACCEPTED_LAYOUTS = (
    "accepted layouts: an image folder DIR/train/<class>/*.png|jpg and DIR/test/<class>/*.png|jpg "
    f"with the 10 CIFAR-10 class folders, or the official python version DIR/{OFFICIAL_FOLDER} "
    "(downloaded when absent and online)"
)


def default_cache_dir() -> Path:
    """``$CIFAR10_CACHE_DIR``, else ``$XDG_CACHE_HOME/cifar10-lightning``, else ``~/.cache/cifar10-lightning``."""
    if os.environ.get("CIFAR10_CACHE_DIR"):
        return Path(os.environ["CIFAR10_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cifar10-lightning"


def is_image_folder(data_dir: Path) -> bool:
    """True where ``data_dir`` looks meant as an image folder (then it is validated strictly)."""
    if not data_dir.is_dir():
        return False
    names = {entry.name for entry in data_dir.iterdir()}
    return bool(names & ({"train", "test"} | set(CIFAR10_CLASSES)))


def _list_split(split_dir: Path) -> list[tuple[Path, int]]:
    """(file, label) pairs of one split, labels in CIFAR-10 order; raises DataError on a bad layout."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is missing; {ACCEPTED_LAYOUTS}")
    class_dirs = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if len(class_dirs) != len(CIFAR10_CLASSES) or set(class_dirs) != set(CIFAR10_CLASSES):
        missing = sorted(set(CIFAR10_CLASSES) - set(class_dirs))
        unexpected = sorted(set(class_dirs) - set(CIFAR10_CLASSES))
        detail = f"found {len(class_dirs)} class folders"
        if missing:
            detail += f", missing {', '.join(missing)}"
        if unexpected:
            detail += f", unexpected {', '.join(unexpected)}"
        raise DataError(f"{split_dir}: {detail}; {ACCEPTED_LAYOUTS}")
    samples = []
    for label, name in enumerate(CIFAR10_CLASSES):
        files = sorted(p for p in (split_dir / name).iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{split_dir / name} holds no images; every class needs at least one")
        samples += [(path, label) for path in files]
    return samples


def read_rgb(path: Path, resize: bool = False) -> np.ndarray:
    """One image file as a 32x32x3 uint8 array (any mode converted to RGB).

    ``resize=False`` refuses other sizes (a dataset must be CIFAR-sized);
    ``resize=True`` resizes with antialiasing (prediction on arbitrary images).
    """
    try:
        with Image.open(path) as image:
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                if not resize:
                    raise DataError(
                        f"{path} is {image.size[0]}x{image.size[1]}; CIFAR-10 images must be "
                        f"{IMAGE_SIZE}x{IMAGE_SIZE} (resize the folder's images first)"
                    )
                image = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path} is not a readable image ({type(error).__name__}); remove or replace it") from None


def decode_images(paths: list[Path], num_threads: int | None = None) -> torch.Tensor:
    """Decode image files into one ``(N, 3, 32, 32)`` uint8 tensor (PIL releases the GIL while decoding)."""
    with ThreadPoolExecutor(max_workers=num_threads or os.cpu_count() or 1) as pool:
        arrays = list(pool.map(read_rgb, paths, chunksize=256))
    stacked = np.stack(arrays) if arrays else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def cache_file_name(samples: list[tuple[Path, int]], root: Path) -> str:
    """``cifar10-<folder>-<contents>.pt``: one key for the folder's path, one for every file's name, label, size and mtime."""
    folder = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    digest = hashlib.sha256(folder.encode())
    for path, label in samples:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return f"cifar10-{folder}-{digest.hexdigest()[:16]}.pt"


def remove_stale_cache_files(cache_file: Path) -> None:
    """Delete the cache files of earlier contents of the same folder: a folder keeps one cache file, not one per change."""
    folder_prefix = cache_file.name.rsplit("-", 1)[0]
    for stale in cache_file.parent.glob(f"{folder_prefix}-*.pt"):
        if stale != cache_file:
            stale.unlink(missing_ok=True)


def load_image_folder(data_dir: Path, cache_dir: Path | None) -> dict[str, torch.Tensor]:
    """Decode (or read from the cache) both splits of an image folder."""
    splits = {split: _list_split(data_dir / split) for split in ("train", "test")}
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / cache_file_name(splits["train"] + splits["test"], data_dir)
        if cache_file.is_file():
            try:
                return torch.load(cache_file, weights_only=True)
            except Exception:  # a damaged cache is rebuilt, never trusted
                pass
    arrays = {}
    for split, samples in splits.items():
        arrays[f"{split}_images"] = decode_images([path for path, _ in samples])
        arrays[f"{split}_labels"] = torch.tensor([label for _, label in samples], dtype=torch.long)
    if cache_file is not None:
        save_cache(arrays, cache_file)
    return arrays


def save_cache(arrays: dict[str, torch.Tensor], cache_file: Path) -> None:
    """Write ``cache_file`` whole or not at all, then delete the folder's stale entries.

    A cache that cannot be written (a read-only or full disk) only costs the
    decoding next time: one warning says so, the run goes on, and no partial
    file is left to fill the disk.
    """
    partial = cache_file.with_suffix(f".tmp{os.getpid()}")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(arrays, partial)
        os.replace(partial, cache_file)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write (a full disk) as RuntimeError
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        behind = os_error_behind(error)
        reason = behind.strerror if behind is not None and behind.strerror else "the write failed; is the disk full?"
        warnings.warn(f"decoded images not cached in {cache_file.parent} ({reason}); they will be decoded again "
                      "next time (--cache-dir chooses another folder)")
        return
    with contextlib.suppress(OSError):
        remove_stale_cache_files(cache_file)


def load_official(data_dir: Path, download: bool) -> dict[str, torch.Tensor]:
    """The official python version through torchvision (which checks the archive's MD5)."""
    from torchvision.datasets import CIFAR10

    arrays = {}
    for split in ("train", "test"):
        try:
            dataset = CIFAR10(str(data_dir), train=split == "train", download=download)
        except Exception as error:  # no network, refused, corrupted archive
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            action = "could not download CIFAR-10 into" if download else "no CIFAR-10 found in"
            raise DataError(f"{action} {data_dir} ({reason}); {ACCEPTED_LAYOUTS}") from None
        arrays[f"{split}_images"] = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        arrays[f"{split}_labels"] = torch.tensor(dataset.targets, dtype=torch.long)
    return arrays


def load_cifar10(data_dir: str | Path, cache_dir: str | Path | None = None, download: bool = True) -> dict[str, torch.Tensor]:
    """``{"train_images", "train_labels", "test_images", "test_labels"}`` from either source."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir} is a file, not a folder; {ACCEPTED_LAYOUTS}")
    if is_image_folder(data_dir):
        return load_image_folder(data_dir, Path(cache_dir) if cache_dir is not None else None)
    return load_official(data_dir, download)


def split_train_val(num_images: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (train, val) index tensors; the same ``seed`` always gives the same split."""
    if not 0 <= val_size < num_images:
        raise DataError(f"val_size must be between 0 and {num_images - 1} (the training images), got {val_size}")
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[val_size:], order[:val_size]


class EpochShuffleSampler(Sampler[int]):
    """A new random permutation on every pass, from ``seed`` and the number of passes so far.

    The pass count is all its state, so it can be checkpointed and restored
    (unlike a RandomSampler drawing from the global generator). Under DDP,
    Lightning shards its output across processes.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.passes = 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.passes)
        self.passes += 1
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader whose next pass can start part-way through, so a mid-epoch checkpoint resumes exactly.

    Lightning stores ``state_dict()`` in every checkpoint and, because the
    loader has ``state_dict``/``load_state_dict``, treats it as resumable
    instead of replaying a whole epoch. After ``load_state_dict`` the next pass
    skips the batches that the interrupted epoch had already trained on (the
    sampler replays the same order, see ``CIFAR10DataModule.state_dict``).
    ``batches_done`` is a callable, set by the data module, returning how many
    batches of the current epoch the training loop has finished (0 between
    epochs). Skipping collates the skipped batches, which costs well under a
    second for in-memory tensors.

    The data module also keeps that count in its own state and hands it to the
    loader it creates: when the learning-rate schedule asks for
    ``trainer.estimated_stepping_batches``, Lightning builds and iterates the
    training loader before it restores the loops, and never passes this
    loader's saved state back.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done: Callable[[], int] = lambda: 0
        self._skip_on_next_pass = 0

    def state_dict(self) -> dict:
        return {"batches_done": int(self.batches_done())}

    def load_state_dict(self, state_dict: dict) -> None:
        self._skip_on_next_pass = int(state_dict.get("batches_done", 0))

    def __iter__(self):
        iterator = super().__iter__()
        skip, self._skip_on_next_pass = self._skip_on_next_pass, 0
        for _ in range(skip):
            next(iterator)
        return iterator


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 from an image folder or the official archive, held in memory as uint8.

    Args:
        data_dir: image folder or official-archive folder (see the module docstring).
        batch_size: images per batch for every stage (per process under DDP).
        num_workers: DataLoader workers; 0 suits in-memory tensors.
        val_size: training images held out for validation.
        split_seed: seed of the train/validation split (independent of the training seed).
        seed: seed of the shuffling order and the augmentation.
        cache_dir: where decoded image-folder arrays are cached; ``None`` disables the cache.
        download: fetch the official archive when ``data_dir`` holds no data.
        channels_last: hand batches over in channels-last memory format.
        cutout_size: side of the square that training augmentation fills with the
            mean colour (:func:`~datamodules.transforms.cutout`); 0 leaves it out.
            A resumed run keeps the size saved in its checkpoint (``state_dict`` also
            records ``batch_size``, ``val_size`` and ``seed``, which train.py keeps
            on resume, and the absolute ``data_dir`` and ``cache_dir``, which it
            uses when a resume names no other).
    """

    def __init__(
        self,
        data_dir: str | Path = DEFAULT_DATA_DIR,
        batch_size: int = 256,
        num_workers: int = 0,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int = 0,
        cache_dir: str | Path | None = default_cache_dir(),
        download: bool = True,
        channels_last: bool = False,
        cutout_size: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= cutout_size <= IMAGE_SIZE:
            raise DataError(f"cutout_size must be between 0 and the image size {IMAGE_SIZE}, got {cutout_size}")
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.split_seed = split_seed
        self.seed = seed
        self.cache_dir = cache_dir
        self.download = download
        self.channels_last = channels_last
        self.cutout_size = cutout_size
        self.classes = CIFAR10_CLASSES
        self._arrays: dict[str, torch.Tensor] | None = None
        self.train_set = self.val_set = self.test_set = None
        self.train_sampler: EpochShuffleSampler | None = None
        self._resume_skip = 0  # batches of a resumed, unfinished epoch that were already trained

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor], **options) -> "CIFAR10DataModule":
        """A data module over tensors already in memory, keyed like :func:`load_cifar10`'s result."""
        datamodule = cls(data_dir="<in memory>", cache_dir=None, download=False, **options)
        datamodule._arrays = arrays
        return datamodule

    def prepare_data(self) -> None:
        # Download or decode once per machine (local rank 0); setup() then reads the cache.
        self._load()

    def _load(self) -> dict[str, torch.Tensor]:
        if self._arrays is None:
            self._arrays = load_cifar10(self.data_dir, self.cache_dir, self.download)
        return self._arrays

    @property
    def labelled_images(self) -> int:
        """The training images before validation is held out from them (the data is loaded if it is not yet)."""
        return len(self._load()["train_labels"])

    def setup(self, stage: str | None = None) -> None:
        arrays = self._load()
        if self.train_set is None:
            train_index, val_index = split_train_val(len(arrays["train_labels"]), self.val_size, self.split_seed)
            self.train_set = TensorDataset(arrays["train_images"][train_index], arrays["train_labels"][train_index])
            self.val_set = TensorDataset(arrays["train_images"][val_index], arrays["train_labels"][val_index])
            # An image folder lists its test images class by class. In a fixed shuffled order any leading part
            # (--limit-test-batches) samples all ten classes instead of the first one; a whole test is unchanged.
            test_order = torch.randperm(len(arrays["test_labels"]), generator=torch.Generator().manual_seed(self.split_seed))
            self.test_set = TensorDataset(arrays["test_images"][test_order], arrays["test_labels"][test_order])
            self.train_sampler = EpochShuffleSampler(len(self.train_set), self.seed)

    def train_batches_done(self) -> int:
        """Batches of the current training epoch already trained on; 0 between epochs or without a fit."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return done if done < trainer.num_training_batches else 0

    def state_dict(self) -> dict:
        if self.train_sampler is None:
            return {}
        # Part-way through an epoch its pass is unfinished: a resumed run replays that pass (and skips what was done).
        batches_done = self.train_batches_done()
        # The settings that shape the training batches go along, so that train.py resumes with the same ones,
        # and where the data came from, so that a resume needs no --data-dir.
        return {"sampler_passes": self.train_sampler.passes - (1 if batches_done else 0), "batches_done": batches_done,
                "cutout_size": self.cutout_size, "batch_size": self.batch_size, "val_size": self.val_size,
                "seed": self.seed, "data_dir": str(self.data_dir.resolve()),
                "cache_dir": None if self.cache_dir is None else str(Path(self.cache_dir).resolve())}

    @classmethod
    def saved_state(cls, checkpoint: dict) -> dict:
        """What ``state_dict`` put into a Lightning checkpoint (filed under the class name); {} if nothing."""
        return checkpoint.get(cls.__qualname__) or {}

    @classmethod
    def run_location(cls, checkpoint: dict, checkpoint_path, data_dir=None, cache_dir=None) -> tuple:
        """(data_dir, cache_dir) for work on a checkpoint's run: those given, else those the run recorded, else None.

        A recorded data folder that is gone, with none given instead, raises DataError:
        a datamodule on a missing folder would download the official archive there,
        another source than the run's.
        """
        state = cls.saved_state(checkpoint)
        if data_dir is None:
            data_dir = state.get("data_dir")
            if data_dir and not Path(data_dir).is_dir():
                raise DataError(f"{checkpoint_path} was trained on {data_dir}, which is not there; "
                                "pass --data-dir with the CIFAR-10 images")
        return data_dir, cache_dir if cache_dir is not None else state.get("cache_dir")

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        self.setup("fit")
        self.train_sampler.passes = int(state_dict["sampler_passes"])
        self._resume_skip = int(state_dict.get("batches_done", 0))
        self.cutout_size = int(state_dict.get("cutout_size", 0))

    def augment_generator(self) -> torch.Generator:
        """The generator for the next training batch's crops, flips and cutout squares.

        Seeded from (``seed``, process rank, optimiser step) rather than carried
        as one stream, so a resumed run augments each batch as the uninterrupted
        run did, and each DDP process augments differently. This project takes
        one optimiser step per batch.
        """
        trainer = self.trainer
        key = [self.seed, trainer.global_rank, trainer.global_step] if trainer is not None else [self.seed, 0, 0]
        seed = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0])
        return torch.Generator().manual_seed(seed)

    def _drops_last_batch(self, dataset: TensorDataset, shuffle: bool) -> bool:
        # A last batch of a few images makes BatchNorm statistics noisy; drop it when training.
        return shuffle and len(dataset) > self.batch_size

    def images_per_process(self, stage: str, processes: int = 1) -> int:
        """The fewest images any of ``processes`` draws from the ``stage`` loader ("train", "val" or "test") in a pass.

        Under DDP Lightning's distributed sampler hands each process ceil(n / processes)
        of the n training images (repeating a few to even the shares). Validation and
        test shares are not evened out (:meth:`_evaluation_sampler`): the smallest
        holds floor(n / processes) images.
        """
        self.setup()
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[stage]
        return math.ceil(len(dataset) / processes) if stage == "train" else len(dataset) // processes

    def batches_per_epoch(self, stage: str, processes: int = 1) -> int:
        """The fewest batches any of ``processes`` draws from the ``stage`` loader in a pass.

        The training loader drops its last, partial batch, so a DDP process with
        fewer training images than a batch trains on none.
        """
        images = self.images_per_process(stage, processes)
        if stage == "train" and self._drops_last_batch(self.train_set, shuffle=True):
            return images // self.batch_size
        return math.ceil(images / self.batch_size)

    def _evaluation_sampler(self, dataset: TensorDataset) -> Sampler | None:
        """Under DDP, each process's share of the validation or test images, every image in exactly one share.

        Lightning's own distributed sampler evens the shares by repeating up to one
        image per process, which the epoch's synchronised accuracy would then count
        twice wherever the process count does not divide the images (5,000 and
        10,000 on 3, 6 or 7 GPUs). Uneven shares are safe here: nothing is
        synchronised per evaluation step, only the metrics at the epoch's end.
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return None
        from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

        return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                            shuffle=False)

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        loader = (ResumableDataLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=self.train_sampler if shuffle else self._evaluation_sampler(dataset),
            drop_last=self._drops_last_batch(dataset, shuffle),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        if shuffle:
            loader.batches_done = self.train_batches_done
            loader.load_state_dict({"batches_done": self._resume_skip})
            self._resume_skip = 0
        return loader

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, torch.Tensor):
            # Images without labels come only from the LightningModule's example_input_array (the layer
            # summary's forward pass), already normalised; this module's loaders always yield (images, labels).
            return batch
        images, labels = batch
        if self.trainer is not None and self.trainer.training:
            images = train_augment(images, self.augment_generator(), self.cutout_size)
        images = normalize(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels
