"""The training and validation sets of a run: images from their source, the kept subset, transforms."""
from dataclasses import dataclass

import numpy as np
import paddle

from convitlab.data.cifar import load_cifar
from convitlab.data.digits import load_digits_split
from convitlab.data.imagefolder import scan_image_folder, scan_val_folder
from convitlab.data.seeds import sample_rng
from convitlab.data.subset import keep_per_class
from convitlab.data.transforms import build_transforms


class ImageDataset(paddle.io.Dataset):
    """Items (image float32 [C, H, W], label) of the source's images at `indices`.

    A key is a position in `indices`, or (epoch, position): the image's random choices come from
    sample_rng(seed, epoch, index into the source), so they depend on nothing else. A plain
    position means epoch 0.
    """

    def __init__(self, source, indices, transform, seed: int):
        self.source, self.indices, self.transform, self.seed = source, np.asarray(indices), transform, seed

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.indices]

    def __getitem__(self, key):
        epoch, position = key if isinstance(key, tuple) else (0, key)
        index = int(self.indices[position])
        image = self.transform(self.source.load(index), sample_rng(self.seed, epoch, index))
        return image, int(self.source.labels[index])


@dataclass
class Datasets:
    """What a run trains and evaluates on."""
    train: ImageDataset          # the kept training subset, with training augmentation
    val: ImageDataset            # the whole validation split, evaluation transform
    num_classes: int             # found in the data
    class_names: list
    subset_indices: np.ndarray   # indices into the full training split that were kept
    subset_labels: np.ndarray


def load_splits(data_cfg, with_train: bool = True):
    """(train source, val source, class names) of data_cfg.name. Without with_train the training
    split is not read where it is separate (train is then None): an image folder's classes come
    from val/ alone (train/ may be absent)."""
    name = data_cfg.name
    if name == "digits":  # one array split in two: both come at once
        return load_digits_split(data_cfg.val_split, data_cfg.split_seed)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_cfg.root, data_cfg.download, data_cfg.checksum, with_train)
    if with_train:  # imagefolder: config.DatasetName has no other
        return scan_image_folder(data_cfg.root, data_cfg.in_chans)
    return (None, *scan_val_folder(data_cfg.root, data_cfg.in_chans))


def build_datasets(data_cfg, seed: int) -> Datasets:
    """The datasets of a run; the subset is drawn with data.subset_seed, or `seed` when that is null."""
    train_source, val_source, class_names = load_splits(data_cfg)
    subset_seed = seed if data_cfg.subset_seed is None else data_cfg.subset_seed
    kept = keep_per_class(train_source.labels, data_cfg.fraction, data_cfg.subset, subset_seed)
    train_transform, eval_transform = build_transforms(data_cfg, centre_crop=data_cfg.name == "imagefolder")
    return Datasets(train=ImageDataset(train_source, kept, train_transform, seed),
                    val=ImageDataset(val_source, np.arange(len(val_source)), eval_transform, seed),
                    num_classes=len(class_names), class_names=list(class_names),
                    subset_indices=kept, subset_labels=train_source.labels[kept])


def build_eval_dataset(data_cfg, seed: int = 0):
    """(val dataset, num_classes, class_names) for evaluating a checkpoint: the whole validation
    split with the evaluation transform; the training split is never listed or read."""
    _, val_source, class_names = load_splits(data_cfg, with_train=False)
    _, eval_transform = build_transforms(data_cfg, centre_crop=data_cfg.name == "imagefolder")
    val = ImageDataset(val_source, np.arange(len(val_source)), eval_transform, seed)
    return val, len(class_names), list(class_names)
