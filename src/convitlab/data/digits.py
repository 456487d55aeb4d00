"""scikit-learn's 8x8 handwritten digits, split once into training and validation images."""
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from convitlab.data.sources import ArrayImages


def load_digits_split(val_split: float, split_seed: int):
    """(train, val, class_names): a stratified split fixed by `split_seed`, each in the original order.

    Pixels 0..16 become float32 in [0, 1]; 1797 images, 0.2 held out → 1437 / 360.
    """
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train, val = train_test_split(np.arange(len(labels)), test_size=val_split, random_state=split_seed,
                                  stratify=labels)
    train, val = np.sort(train), np.sort(val)
    names = [str(name) for name in digits.target_names]
    return ArrayImages(images[train], labels[train]), ArrayImages(images[val], labels[val]), names
