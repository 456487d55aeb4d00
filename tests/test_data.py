"""Data: digits, CIFAR archives and image folders in their real formats, subsets, transforms, loaders, mixing."""
import hashlib
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import paddle
import pytest
from builders import CIFAR, data_config, make_image_folder, plain, write_fake_cifar
from helpers import processes
from omegaconf import OmegaConf
from PIL import Image

from convitlab.config import AugmentConfig
from convitlab.core.errors import UserError
from convitlab.data import build_datasets, build_loaders, mix_batch, mixing_enabled, write_subset_csv
from convitlab.data.loaders import EvalBatchSampler, TrainBatchSampler
from convitlab.data.randaugment import OPS, RandAugment
from convitlab.data.subset import per_class_count
from convitlab.data.transforms import pad_and_random_crop, random_erasing, random_hflip, random_resized_crop

HEAVY_AUGMENT = ["augment.random_crop=true", "augment.hflip=true", "augment.randaugment=true",
                 "augment.random_erasing=0.5"]


def one_line_error(call, *args) -> str:
    with pytest.raises(UserError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message and message
    return message


def epoch_batches(loader, epoch=None):
    """Every batch of a pass as NumPy (images, labels); `epoch` set first for a training loader."""
    if epoch is not None:
        loader.batch_sampler.set_epoch(epoch)
    return [(images.numpy(), labels.numpy()) for images, labels in loader]


# --- digits and subsets -------------------------------------------------------------------------

def test_digits_split_sizes_stratified_and_fixed():
    data = build_datasets(data_config("digits"), seed=0)
    assert (len(data.train), len(data.val), data.num_classes) == (1437, 360, 10)
    assert data.class_names == [str(c) for c in range(10)]
    train_counts = np.bincount(data.train.labels, minlength=10)
    val_counts = np.bincount(data.val.labels, minlength=10)
    assert np.all(np.abs(val_counts - 0.2 * (train_counts + val_counts)) <= 1)  # stratified
    image, label = data.val[0]
    assert image.shape == (1, 8, 8) and image.dtype == np.float32 and isinstance(label, int)
    assert image.min() >= -1 and image.max() <= 1  # [0, 1] normalised with mean 0.5, std 0.5
    again = build_datasets(data_config("digits"), seed=5)  # the run's seed does not move the split
    other = build_datasets(data_config("digits", "split_seed=1"), seed=0)
    assert np.array_equal(again.val.source.images, data.val.source.images)
    assert not np.array_equal(other.val.source.images, data.val.source.images)
    assert build_datasets(data_config("digits", "img_size=16"), seed=0).val[0][0].shape == (1, 16, 16)


def test_subset_per_class_counts_seeds_nesting_and_first():
    full = build_datasets(data_config("digits"), seed=0)
    labels = full.train.labels
    class_sizes = np.bincount(labels)

    def kept(*overrides, seed=0):
        data = build_datasets(data_config("digits", *overrides), seed=seed)
        assert len(data.val) == 360  # validation is never subsampled
        assert len(data.train) == len(data.subset_indices)
        assert np.array_equal(data.subset_labels, labels[data.subset_indices])
        assert np.array_equal(data.train.labels, data.subset_labels)
        return data.subset_indices

    for fraction in (0.01, 0.1, 0.37):
        counts = np.bincount(labels[kept(f"fraction={fraction}")], minlength=10)
        assert counts.tolist() == [max(1, int(np.floor(fraction * n + 1e-9))) for n in class_sizes]
    assert np.array_equal(kept("fraction=0.1"), kept("fraction=0.1"))
    assert not np.array_equal(kept("fraction=0.1"), kept("fraction=0.1", seed=1))
    assert np.array_equal(kept("fraction=0.1", "subset_seed=1", seed=7), kept("fraction=0.1", seed=1))
    small, medium, large = (set(kept(f"fraction={f}")) for f in (0.05, 0.2, 0.6))
    assert small < medium < large
    first = kept("fraction=0.1", "subset=first")
    for c in range(10):
        members = np.flatnonzero(labels == c)
        assert np.array_equal(first[labels[first] == c], members[:per_class_count(0.1, len(members))])
    assert per_class_count(0.29, 100) == 29 and per_class_count(0.001, 50) == 1


def test_subset_csv(tmp_path):
    path = tmp_path / "run" / "subset.csv"
    write_subset_csv(path, np.array([3, 10, 42]), np.array([1, 0, 9]))
    assert path.read_text() == "index,label\n3,1\n10,0\n42,9\n"
    assert [p.name for p in path.parent.iterdir()] == ["subset.csv"]  # no temporary left behind


# --- CIFAR archives -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_archive_read_back(tmp_path, name):
    train_data, train_labels, test_data, test_labels = write_fake_cifar(tmp_path, name)
    data = build_datasets(plain(name, tmp_path), seed=0)
    classes = CIFAR[name][-1]
    assert data.num_classes == classes and data.class_names[:2] == ["class0", "class1"]
    assert len(data.train) == len(train_labels) and len(data.val) == len(test_labels)
    for i in (0, len(train_labels) - 1):
        image, label = data.train[i]
        assert image.shape == (3, 32, 32) and image.dtype == np.float32 and label == train_labels[i]
        np.testing.assert_allclose(image, train_data[i].reshape(3, 32, 32) / 255.0, atol=1e-6)  # CHW rows
    image, label = data.val[2]
    np.testing.assert_allclose(image, test_data[2].reshape(3, 32, 32) / 255.0, atol=1e-6)
    assert label == test_labels[2]
    first = build_datasets(plain(name, tmp_path, "fraction=0.01", "subset=first"), seed=0)
    for label in np.unique(train_labels):  # one per class: the first in the batches' order
        assert first.subset_indices[first.subset_labels == label][0] == train_labels.index(label)


def test_cifar_missing_archive_names_file_and_folder(tmp_path):
    message = one_line_error(build_datasets, plain("cifar10", tmp_path / "nowhere"), 0)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path / "nowhere") in message
    assert "data.download=true" in message


def test_cifar_checksum_mismatch(tmp_path):
    write_fake_cifar(tmp_path, "cifar100")
    path = tmp_path / "cifar-100-python.tar.gz"
    message = one_line_error(build_datasets, plain("cifar100", tmp_path, "checksum=true"), 0)
    assert str(path) in message and hashlib.md5(path.read_bytes()).hexdigest() in message
    assert "eb9058c3a382ffc7106e4002c42a8d85" in message and "data.checksum=false" in message


def test_cifar_truncated_archive(tmp_path):
    write_fake_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = one_line_error(build_datasets, plain("cifar10", tmp_path), 0)
    assert str(path) in message and "damaged" in message


class Gadget:
    """What a tampered archive could hold: unpickling it would call a function."""

    def __reduce__(self):
        return print, ("unpickling ran code",)


def test_cifar_pickle_may_hold_arrays_only(tmp_path, capsys):
    write_fake_cifar(tmp_path, "cifar100", meta=Gadget())
    message = one_line_error(build_datasets, plain("cifar100", tmp_path), 0)
    assert "damaged" in message and "asks to run" in message and "print" in message
    assert "unpickling ran code" not in capsys.readouterr().out


def test_cifar_download_uses_paddles_downloader(tmp_path, monkeypatch):
    import paddle.utils.download as download
    calls = []

    def fake_download(url, root_dir, md5sum=None, decompress=True, **kwargs):
        calls.append((url, root_dir, md5sum, decompress))
        write_fake_cifar(Path(root_dir), "cifar10")
        return str(Path(root_dir) / "cifar-10-python.tar.gz")

    monkeypatch.setattr(download, "get_path_from_url", fake_download)
    data = build_datasets(plain("cifar10", tmp_path / "new", "download=true"), seed=0)
    assert len(data.train) == 30
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", str(tmp_path / "new"), None, False)]


# --- image folders ------------------------------------------------------------------------------

def test_image_folder_classes_and_shapes(tmp_path):
    root = make_image_folder(tmp_path / "images")
    data = build_datasets(data_config("imagefolder", f"root={root}", "img_size=16", "fraction=1"), seed=0)
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    assert data.train.labels.tolist() == [0, 0, 1, 1, 1] and data.val.labels.tolist() == [0, 1, 1]
    assert [Path(p).name for p in data.train.source.paths] == ["0.jpg", "1.png", "0.jpg", "1.png", "2.jpg"]
    image, label = data.val[1]
    assert image.shape == (3, 16, 16) and image.dtype == np.float32 and label == 1
    assert np.array_equal(data.val[1][0], image)  # evaluation is deterministic
    assert data.train[(1, 4)][0].shape == (3, 16, 16)  # random resized crop
    grey = build_datasets(data_config("imagefolder", f"root={root}", "img_size=16", "in_chans=1", "mean=[0.5]",
                                      "std=[0.5]"), seed=0)
    assert grey.val[0][0].shape == (1, 16, 16)


def test_image_folder_errors_name_the_path(tmp_path):
    def error(root, *overrides):
        return one_line_error(build_datasets, data_config("imagefolder", f"root={root}", *overrides), 0)

    assert str(tmp_path / "absent") in error(tmp_path / "absent")
    root = make_image_folder(tmp_path / "a")
    (root / "train" / "bird").mkdir()
    assert str(root / "train" / "bird") in error(root)
    root = make_image_folder(tmp_path / "b", val=(("cat", 1), ("dog", 1), ("emu", 1)))
    assert "only in val: emu" in error(root)
    root = make_image_folder(tmp_path / "c")
    shutil.rmtree(root / "val")
    assert str(root / "val") in error(root)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_fails_in_one_line_when_read(tmp_path, workers):
    root = make_image_folder(tmp_path / "images")
    broken = root / "train" / "cat" / "broken.png"
    broken.write_bytes(b"this is not a PNG file")
    cfg = data_config("imagefolder", f"root={root}", "img_size=16", f"num_workers={workers}", "batch_size=2",
                      "drop_last=false")
    data = build_datasets(cfg, seed=0)  # listing reads nothing
    assert str(broken) in one_line_error(data.train.__getitem__, data.train.source.paths.index(str(broken)))
    train_loader, val_loader = build_loaders(data, cfg, seed=0)
    assert len(epoch_batches(val_loader)) == 2  # the other images are fine
    message = one_line_error(epoch_batches, train_loader, 1)
    assert str(broken) in message and message.startswith("cannot read image")


# --- loaders ------------------------------------------------------------------------------------

def test_epoch_covers_every_kept_image_once_and_shards_union_to_global_batches():
    for drop_last in (False, True):
        single = TrainBatchSampler(23, 4, seed=3, drop_last=drop_last)
        ranks = [TrainBatchSampler(23, 2, seed=3, rank=r, world_size=2, drop_last=drop_last) for r in (0, 1)]
        for sampler in (single, *ranks):
            sampler.set_epoch(2)
        batches = list(single)
        assert len(batches) == len(single) == (5 if drop_last else 6)
        positions = [p for batch in batches for _, p in batch]
        assert len(set(positions)) == len(positions)
        assert len(positions) == (20 if drop_last else 23) and set(positions) <= set(range(23))
        assert all(epoch == 2 for batch in batches for epoch, _ in batch)
        rank_batches = [list(r) for r in ranks]
        assert [len(r) for r in rank_batches] == [len(batches)] * 2
        assert [a + b for a, b in zip(*rank_batches)] == batches  # contiguous slices of each global batch
        assert len(rank_batches[1][-1]) == (2 if drop_last else 1)  # the partial batch split 2 + 1
    sampler = TrainBatchSampler(23, 4, seed=3)
    sampler.set_epoch(1)
    one = list(sampler)
    sampler.set_epoch(2)
    two = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == one and [p for _, p in one[0]] != [p for _, p in two[0]]


def test_eval_batches_in_order_sharded_without_repeats():
    shards = [list(EvalBatchSampler(10, 3, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[[0, 1, 2], [3]], [[4, 5, 6]], [[7, 8, 9]]]
    cfg = data_config("digits", "eval_batch_size=50")
    data = build_datasets(cfg, seed=0)
    whole = np.concatenate([labels for _, labels in epoch_batches(build_loaders(data, cfg, 0)[1])])
    parts = [np.concatenate([labels for _, labels in epoch_batches(build_loaders(data, cfg, 0, r, 2)[1])])
             for r in (0, 1)]
    assert np.array_equal(whole, data.val.labels) and np.array_equal(np.concatenate(parts), whole)


def test_two_ranks_see_the_single_process_global_batches():
    cfg = data_config("digits", "fraction=0.1", "batch_size=16", *HEAVY_AUGMENT)
    single_cfg = data_config("digits", "fraction=0.1", "batch_size=32", *HEAVY_AUGMENT)
    data = build_datasets(cfg, seed=4)
    single = epoch_batches(build_loaders(data, single_cfg, 4)[0], 3)
    ranks = [epoch_batches(build_loaders(data, cfg, 4, rank, 2)[0], 3) for rank in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == len(data.train) // 32
    for (images, labels), (images0, labels0), (images1, labels1) in zip(single, *ranks):
        assert np.array_equal(images, np.concatenate([images0, images1]))
        assert np.array_equal(labels, np.concatenate([labels0, labels1]))


def test_batches_are_tensors_and_augmentation_is_reproducible():
    def loader(workers):
        cfg = data_config("digits", "fraction=0.1", "batch_size=16", f"num_workers={workers}", *HEAVY_AUGMENT)
        return build_loaders(build_datasets(cfg, seed=1), cfg, seed=1)[0]

    first = loader(0)
    first.batch_sampler.set_epoch(2)
    images, labels = next(iter(first))
    assert isinstance(images, paddle.Tensor) and images.dtype == paddle.float32 and list(images.shape) == [16, 1, 8, 8]
    assert labels.dtype == paddle.int64 and list(labels.shape) == [16]
    epoch2 = epoch_batches(first, 2)
    for other in (epoch_batches(loader(2), 2), epoch_batches(loader(0), 2)):  # workers; a rebuilt loader
        assert len(other) == len(epoch2) == len(first)
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(epoch2, other))
    epoch3 = epoch_batches(first, 3)
    assert not np.array_equal(np.concatenate([b[0] for b in epoch2]), np.concatenate([b[0] for b in epoch3]))
    data = build_datasets(data_config("digits", "fraction=0.1", *HEAVY_AUGMENT), seed=1)
    assert np.array_equal(data.train[(2, 5)][0], data.train[(2, 5)][0])
    assert any(not np.array_equal(data.train[(2, i)][0], data.train[(3, i)][0]) for i in range(5))


def children() -> set:
    """The live processes whose parent is this one (Paddle's loader workers among them)."""
    return {p.pid for p in processes() if p.parent == os.getpid() and p.state != "Z"}


def state(pid: int) -> str:
    """The process's state letter (R, S, Z for a zombie, ...), or X when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def wait_until(condition, timeout=30):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_pass_left_early_ends_its_workers_and_ignores_group_stop_signals():
    cfg = data_config("digits", "fraction=0.5", "batch_size=16", "num_workers=2")
    loader = build_loaders(build_datasets(cfg, seed=0), cfg, seed=0)[0]
    before = children()
    loader.batch_sampler.set_epoch(1)
    batches = iter(loader)
    next(batches)
    workers = children() - before
    assert len(workers) == 2
    for pid in workers:  # a stop signal sent to the whole process group is the main process's to act on
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    assert workers <= children() and not any(state(pid) in "ZX" for pid in workers)  # still alive and working
    assert all(images.shape == [16, 1, 8, 8] for images, _ in (next(batches) for _ in range(4)))
    # Left after two batches (a stop at a step boundary): Paddle would keep this pass's workers.
    # Paddle's private shutdown call, which convitlab.data.loaders.end_workers uses, must still exist.
    batches.close()
    assert wait_until(lambda: not children() & workers), children() & workers
    loader.batch_sampler.set_epoch(2)
    assert len(list(loader)) == len(loader)  # a whole pass: its workers end with it too
    assert wait_until(lambda: not children() - before), children() - before


def test_a_pass_cut_short_by_max_batches_is_read_to_its_end():
    cfg = data_config("digits", "fraction=0.5", "batch_size=16")
    data = build_datasets(cfg, seed=0)
    full = build_loaders(data, cfg, seed=0)[0]
    cut = build_loaders(data, cfg, seed=0, max_batches=3)[0]
    assert len(full) > 3 and len(cut) == 3
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(epoch_batches(cut, 1), epoch_batches(full, 1)))
    assert len(epoch_batches(cut, 1)) == 3


def test_batch_size_larger_than_the_kept_images():
    cfg = data_config("digits", "fraction=0.01", "batch_size=64")
    data = build_datasets(cfg, seed=0)
    message = one_line_error(build_loaders, data, cfg, 0)
    assert "data.batch_size=64" in message and "10 training images" in message
    assert "data.drop_last=false" in message
    relaxed = data_config("digits", "fraction=0.01", "batch_size=64", "drop_last=false")
    train_loader, _ = build_loaders(data, relaxed, 0)
    assert len(train_loader) == 1 and epoch_batches(train_loader, 1)[0][0].shape == (10, 1, 8, 8)


# --- transforms ---------------------------------------------------------------------------------

def test_transforms_keep_shape_and_are_deterministic_per_seed():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8))
    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flips = [random_hflip(image, np.random.default_rng([0, 1, i])) for i in range(20)]
    assert {f.tobytes() for f in flips} == {image.tobytes(), mirrored.tobytes()}
    crop = pad_and_random_crop(image, 2, np.random.default_rng([0, 1, 2]))
    assert crop.size == image.size and crop.mode == image.mode
    assert crop.tobytes() == pad_and_random_crop(image, 2, np.random.default_rng([0, 1, 2])).tobytes()
    padded = np.pad(np.asarray(image), ((2, 2), (2, 2), (0, 0)))
    windows = [padded[t:t + 12, left:left + 10].tobytes() for t in range(5) for left in range(5)]
    assert crop.tobytes() in windows
    resized = random_resized_crop(image, (7, 9), np.random.default_rng(5))
    assert resized.size == (9, 7) and resized.tobytes() == random_resized_crop(image, (7, 9),
                                                                               np.random.default_rng(5)).tobytes()
    array = rng.normal(size=(3, 16, 16)).astype(np.float32)
    erased = random_erasing(array, 1.0, np.random.default_rng(3))
    assert erased.shape == array.shape and erased.dtype == np.float32 and not np.array_equal(erased, array)
    assert np.array_equal(erased, random_erasing(array, 1.0, np.random.default_rng(3)))
    assert random_erasing(array, 0.0, np.random.default_rng(3)) is array


def test_randaugment_ops_keep_size_and_mode():
    rng = np.random.default_rng(0)
    for mode, shape in (("RGB", (9, 11, 3)), ("L", (9, 11))):
        image = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8))
        for name, op in OPS.items():
            out = op(image, 0.9, np.random.default_rng(1), (128, 128, 128) if mode == "RGB" else 128)
            assert out.size == image.size and out.mode == mode, name
    augment = RandAugment(2, 9, 0.5, fill=(128,))
    digit = Image.fromarray(rng.random((8, 8), dtype=np.float32))  # mode F, as digits are
    outputs = [augment(digit, np.random.default_rng([7, 1, i])).tobytes() for i in range(8)]
    assert augment(digit, np.random.default_rng([7, 1, 0])).mode == "L"
    assert outputs[0] == augment(digit, np.random.default_rng([7, 1, 0])).tobytes()
    assert len(set(outputs)) > 1


# --- mixup / cutmix -----------------------------------------------------------------------------

def augment_config(**values):
    return OmegaConf.merge(OmegaConf.structured(AugmentConfig), values)


class CertainRng:
    """A stand-in generator whose draws always mix, choose cutmix, and give λ = 1."""

    def random(self):
        return 0.0

    def beta(self, a, b):
        return 1.0

    def integers(self, low, high):
        return low


def test_mix_batch_targets_and_images():
    rng = np.random.default_rng(0)
    images = paddle.to_tensor(rng.normal(size=(6, 3, 8, 8)).astype(np.float32))
    labels = paddle.to_tensor(np.array([0, 1, 2, 3, 4, 5], dtype=np.int64))
    both = augment_config(mixup=0.8, cutmix=1.0)
    assert mixing_enabled(both) and not mixing_enabled(augment_config())
    for seed in range(4):
        mixed, targets = mix_batch(images, labels, both, 0.1, 10, np.random.default_rng(seed))
        assert mixed.shape == images.shape and list(targets.shape) == [6, 10] and targets.dtype == paddle.float32
        np.testing.assert_allclose(targets.numpy().sum(axis=1), 1.0, rtol=1e-5)
        assert not np.allclose(mixed.numpy(), images.numpy())
    # cutmix's λ is the share of pixels really kept: images of ones and zeros make it visible
    ones_zeros = paddle.to_tensor(np.stack([np.ones((3, 8, 8)), np.zeros((3, 8, 8))]).astype(np.float32))
    two_labels = paddle.to_tensor(np.array([2, 7], dtype=np.int64))
    for seed in range(6):
        mixed, targets = mix_batch(ones_zeros, two_labels, augment_config(cutmix=1.0), 0.0, 10,
                                   np.random.default_rng(seed))
        assert targets.numpy()[0, 2] == pytest.approx(float(mixed.numpy()[0].mean()), abs=1e-6)
    unmixed = augment_config(mixup=0.8, mix_prob=0.0)
    same, targets = mix_batch(images, labels, unmixed, 0.1, 10, np.random.default_rng(0))
    assert np.array_equal(same.numpy(), images.numpy()) and targets.numpy()[0, 0] == pytest.approx(0.91)


@pytest.mark.parametrize("values", [{"mixup": 0.8}, {"cutmix": 1.0}])
def test_mix_batch_lambda_one_is_the_identity(values):
    images = paddle.to_tensor(np.random.default_rng(1).normal(size=(4, 1, 6, 6)).astype(np.float32))
    labels = paddle.to_tensor(np.array([3, 1, 0, 2], dtype=np.int64))
    mixed, targets = mix_batch(images, labels, augment_config(**values), 0.2, 4, CertainRng())
    assert np.allclose(mixed.numpy(), images.numpy())
    expected = np.full((4, 4), 0.05, dtype=np.float32)
    expected[np.arange(4), labels.numpy()] = 0.85
    np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-6)
