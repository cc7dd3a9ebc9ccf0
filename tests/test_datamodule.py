import re
import urllib.request

import pytest
import torch

from datamodules import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule, DataError, load_cifar10, normalize
from datamodules.cifar10 import split_train_val
from datamodules.transforms import CIFAR10_MEAN_UINT8, cutout, random_crop, random_horizontal_flip, train_augment
from tests.conftest import write_image_folder


def random_batch(n=16, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    images = random_batch()
    crops = random_crop(images, padding=4, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    offsets = []
    for image, crop in zip(padded, crops):
        matches = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(image[:, dy : dy + 32, dx : dx + 32], crop)]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) > 1  # not one shift for the whole batch


def test_flip_is_a_mirror():
    images = random_batch()
    assert torch.equal(random_horizontal_flip(images, p=1.0), images.flip(-1))
    assert torch.equal(random_horizontal_flip(images, p=0.0), images)
    mixed = random_horizontal_flip(images, p=0.5, generator=torch.Generator().manual_seed(3))
    flipped = [torch.equal(m, i.flip(-1)) for m, i in zip(mixed, images)]
    kept = [torch.equal(m, i) for m, i in zip(mixed, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_train_augment_keeps_shape_and_dtype():
    out = train_augment(random_batch())
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.uint8


def test_cutout_fills_one_clipped_square_per_image_with_the_mean_colour():
    images = random_batch(n=64)
    out = cutout(images, 8, generator=torch.Generator().manual_seed(2))
    fill = torch.tensor(CIFAR10_MEAN_UINT8, dtype=torch.uint8).view(3, 1, 1)
    boxes = set()
    for image, result in zip(images, out):
        filled = (result == fill).all(0)
        rows, cols = filled.any(1).nonzero().flatten(), filled.any(0).nonzero().flatten()
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert filled[top:bottom, left:right].all() and int(filled.sum()) == (bottom - top) * (right - left)
        assert 4 <= bottom - top <= 8 and 4 <= right - left <= 8  # clipped by a border at most to half
        assert torch.equal(result[:, ~filled], image[:, ~filled])  # nothing else changes
        boxes.add((int(top), int(left), int(bottom - top), int(right - left)))
    assert len(boxes) > 10 and any(h == 8 and w == 8 for _, _, h, w in boxes) and any(h < 8 for _, _, h, _ in boxes)
    assert torch.equal(cutout(images, 0), images)
    assert (normalize(out).abs() < 0.01).sum() >= 64 * 3 * 16  # the fill normalises to about zero


def test_cutout_is_off_by_default_and_kept_in_the_datamodule_state(image_folder, cache_dir):
    generator_seed = 5
    images = random_batch()
    plain = train_augment(images, torch.Generator().manual_seed(generator_seed))
    with_cutout = train_augment(images, torch.Generator().manual_seed(generator_seed), cutout_size=8)
    differs = (plain != with_cutout).any(1)
    assert differs.flatten(1).any(1).all()  # every image lost a square ...
    assert (differs.flatten(1).sum(1) <= 64).all()  # ... and no more than a square
    datamodule = CIFAR10DataModule(image_folder, batch_size=16, val_size=20, cache_dir=cache_dir, cutout_size=8)
    datamodule.setup("fit")
    resumed = CIFAR10DataModule(image_folder, batch_size=16, val_size=20, cache_dir=cache_dir)
    assert resumed.cutout_size == 0
    resumed.load_state_dict(datamodule.state_dict())
    assert resumed.cutout_size == 8
    with pytest.raises(DataError, match="cutout_size must be between 0 and the image size 32, got 33"):
        CIFAR10DataModule(image_folder, cutout_size=33)


def test_normalize_values():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[1] = 255
    out = normalize(images)
    assert out.dtype == torch.float32
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    torch.testing.assert_close(out[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(out[1, :, 0, 0], (1 - mean) / std)


def test_split_is_disjoint_fixed_and_complete():
    train, val = split_train_val(100, 20, seed=0)
    assert len(val) == 20 and len(train) == 80
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    again_train, again_val = split_train_val(100, 20, seed=0)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    with pytest.raises(DataError, match="val_size"):
        split_train_val(100, 100, seed=0)


def test_datamodule_batches(image_folder, cache_dir):
    datamodule = CIFAR10DataModule(image_folder, batch_size=16, val_size=20, cache_dir=cache_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)) == (60, 20, 30)
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() <= 9
    normalized, same_labels = datamodule.on_after_batch_transfer((images, labels), 0)
    assert normalized.dtype == torch.float32 and torch.equal(same_labels, labels)
    torch.testing.assert_close(normalized, normalize(images))  # no trainer: no augmentation
    example_input = torch.zeros(1, 3, 32, 32)  # a LightningModule's example_input_array, images only
    assert datamodule.on_after_batch_transfer(example_input, 0) is example_input
    test_labels = torch.cat([batch[1] for batch in datamodule.test_dataloader()])
    assert test_labels.bincount().tolist() == [3] * 10


@pytest.mark.parametrize("batch_size, processes, expected", [
    (16, 1, {"train": 3, "val": 2, "test": 2}),  # 60 training images: the partial last batch is dropped
    (16, 2, {"train": 1, "val": 1, "test": 1}),  # 30, 10 and 15 images per process
    (32, 2, {"train": 0, "val": 1, "test": 1}),  # 30 training images per process: no whole batch of 32
    (64, 1, {"train": 1, "val": 1, "test": 1}),  # fewer images than a batch: one partial batch, kept
    (6, 3, {"train": 3, "val": 1, "test": 2}),  # validation shares of 7, 7 and 6 images: 2, 2 and 1 batches
])
def test_batches_per_epoch_counts_what_each_process_loads(image_folder, cache_dir, batch_size, processes, expected):
    datamodule = CIFAR10DataModule(image_folder, batch_size=batch_size, val_size=20, cache_dir=cache_dir)
    assert {stage: datamodule.batches_per_epoch(stage, processes) for stage in expected} == expected
    if processes == 1:
        loaders = {"train": datamodule.train_dataloader(), "val": datamodule.val_dataloader(),
                   "test": datamodule.test_dataloader()}
        assert {stage: len(list(loader)) for stage, loader in loaders.items()} == expected


def test_validation_and_test_shares_under_ddp_hold_every_image_once(image_folder, cache_dir):
    from types import SimpleNamespace

    shares = {"val": [], "test": []}
    for rank in range(4):
        datamodule = CIFAR10DataModule(image_folder, batch_size=4, val_size=22, cache_dir=cache_dir)
        datamodule.trainer = SimpleNamespace(world_size=4, global_rank=rank)  # what the loaders ask of a DDP Trainer
        datamodule.setup()
        for stage, images in shares.items():
            images.append(torch.cat([batch[0] for batch in getattr(datamodule, f"{stage}_dataloader")()]))
    for stage, dataset in (("val", datamodule.val_set), ("test", datamodule.test_set)):
        assert [len(share) for share in shares[stage]] == ([6, 6, 5, 5] if stage == "val" else [8, 8, 7, 7])
        scored = sorted(bytes(image.numpy()) for share in shares[stage] for image in share)
        assert scored == sorted(bytes(image.numpy()) for image in dataset.tensors[0])


def test_validation_and_training_images_do_not_overlap(image_folder, cache_dir):
    datamodule = CIFAR10DataModule(image_folder, batch_size=16, val_size=20, cache_dir=cache_dir)
    datamodule.setup("fit")
    train = {bytes(image.numpy()) for image in datamodule.train_set.tensors[0]}
    val = {bytes(image.numpy()) for image in datamodule.val_set.tensors[0]}
    assert len(train) == 60 and len(val) == 20 and train.isdisjoint(val)


def test_a_limited_test_samples_every_class_with_images_and_labels_still_paired(image_folder, cache_dir):
    """The folder lists test images class by class; the first batches of the test loader must not."""
    first_batches = []
    for _ in range(2):
        datamodule = CIFAR10DataModule(image_folder, batch_size=6, val_size=20, cache_dir=cache_dir)
        datamodule.setup("test")
        first_batches.append(next(iter(datamodule.test_dataloader())))
    (images, labels), (again_images, again_labels) = first_batches
    assert len(set(labels.tolist())) >= 4  # in folder order the first 6 of 30 images are 2 classes
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)  # a fixed order
    for image, label in zip(images, labels):  # conftest tints channel (label % 3) with the value 20 * label
        assert abs(int(image[int(label) % 3].float().mean()) - 20 * int(label)) <= 3


def test_labels_follow_cifar10_order(image_folder):
    arrays = load_cifar10(image_folder, cache_dir=None)
    # conftest tints channel (label % 3) with the value 20 * label.
    for image, label in zip(arrays["test_images"][::3], arrays["test_labels"][::3]):
        channel = int(label) % 3
        assert abs(int(image[channel].float().mean()) - 20 * int(label)) <= 3  # JPEG may shift a little


def test_decoded_images_are_cached_outside_the_data_folder(tmp_path):
    data = write_image_folder(tmp_path / "data", 2, 1)
    cache = tmp_path / "cache"
    before = sorted(p for p in data.rglob("*"))
    first = load_cifar10(data, cache_dir=cache)
    assert len(list(cache.glob("cifar10-*.pt"))) == 1
    assert sorted(p for p in data.rglob("*")) == before
    second = load_cifar10(data, cache_dir=cache)
    assert all(torch.equal(first[key], second[key]) for key in first)
    # A changed file gives a new cache entry instead of stale images, and the stale entry goes.
    first_entry = next(cache.glob("cifar10-*.pt"))
    write_image_folder(data, 2, 1, seed=5)
    third = load_cifar10(data, cache_dir=cache)
    assert not torch.equal(first["train_images"], third["train_images"])
    assert len(list(cache.glob("cifar10-*.pt"))) == 1 and not first_entry.exists()
    # Another folder has an entry of its own, and leaves the first folder's in place.
    other = write_image_folder(tmp_path / "other", 2, 1, seed=7)
    load_cifar10(other, cache_dir=cache)
    assert len(list(cache.glob("cifar10-*.pt"))) == 2
    assert all(torch.equal(third[key], load_cifar10(data, cache_dir=cache)[key]) for key in third)


@pytest.mark.parametrize("failure", ["unwritable folder", "full disk"])
def test_a_cache_that_cannot_be_written_warns_and_leaves_no_partial_file(tmp_path, monkeypatch, failure):
    data = write_image_folder(tmp_path / "data", 2, 1)
    cache = tmp_path / "cache"
    expected = load_cifar10(data, cache_dir=None)
    if failure == "unwritable folder":
        cache.write_text("a file where the cache folder should be")
        reason = "File exists|Not a directory"
    else:
        def save_until_the_disk_is_full(arrays, path):  # as torch.save fails when the disk fills mid-write
            with open(path, "wb") as partial:
                partial.write(b"the first bytes")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 982")

        monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
        reason = "the write failed; is the disk full"
    with pytest.warns(UserWarning, match=f"decoded images not cached in {re.escape(str(cache))} \\(({reason}).*decoded again next time"):
        arrays = load_cifar10(data, cache_dir=cache)
    assert all(torch.equal(arrays[key], expected[key]) for key in expected)
    if failure == "full disk":
        assert cache.is_dir() and not any(cache.iterdir())  # the partial file is gone


def test_no_data_and_no_network_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"could not download CIFAR-10 into {empty}.*accepted layouts"):
        load_cifar10(empty)


@pytest.mark.parametrize(
    "break_folder, message",
    [
        (lambda root: __import__("shutil").rmtree(root / "test"), "test is missing"),
        (lambda root: __import__("shutil").rmtree(root / "train" / "cat"), "found 9 class folders, missing cat"),
        (lambda root: (root / "train" / "bird").rename(root / "train" / "birds"), "missing bird, unexpected birds"),
        (lambda root: (root / "train" / "dog" / "notes.txt").write_text("hello"), "dog/notes.txt is not a readable image"),
        (lambda root: __import__("PIL.Image").Image.new("RGB", (64, 48)).save(root / "test" / "cat" / "big.png"),
         "cat/big.png is 64x48; CIFAR-10 images must be 32x32"),
        (lambda root: [p.unlink() for p in (root / "test" / "frog").iterdir()], "frog holds no images"),
    ],
)
def test_bad_folders_name_the_problem(tmp_path, break_folder, message):
    root = write_image_folder(tmp_path / "data", 2, 1)
    break_folder(root)
    with pytest.raises(DataError, match=message):
        load_cifar10(root, cache_dir=None)


def test_class_folders_without_splits_are_refused(tmp_path):
    root = write_image_folder(tmp_path / "data", 2, 1)
    with pytest.raises(DataError, match="train/airplane is missing|accepted layouts"):
        load_cifar10(root / "train", cache_dir=None)


def test_data_path_benchmark_runs_and_prints_its_table():
    from tests.helpers import run_in_process

    result = run_in_process("bench/data.py", "--batch-size", "8", "--images", "64", "--repeats", "1", "--models", "resnet50_seed")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| data path (loader + augment + normalise) |" in result.stdout
    assert "| training resnet50_seed (" in result.stdout
