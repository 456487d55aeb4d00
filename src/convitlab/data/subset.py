"""Per-class subsets of the training split, and the record of which images were kept."""
import math

import numpy as np

from convitlab.core.files import write_text
from convitlab.data.seeds import subset_rng


def per_class_count(fraction: float, class_size: int) -> int:
    """max(1, floor(fraction · class_size)) images kept of a class."""
    # The epsilon keeps products like 0.29 · 100 = 28.999999999999996 at 29
    return max(1, math.floor(fraction * class_size + 1e-9))


def keep_per_class(labels: np.ndarray, fraction: float, mode: str, seed: int) -> np.ndarray:
    """Sorted indices into `labels` of the kept images, per_class_count of every class.

    `random` keeps the first ones of a per-class permutation seeded by (seed, class), so for one
    seed a smaller fraction keeps a subset of what a larger one keeps; `first` keeps the first ones
    in the split's order.
    """
    kept = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if mode == "random":
            members = members[subset_rng(seed, int(label)).permutation(len(members))]
        kept.append(members[:per_class_count(fraction, len(members))])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def write_subset_csv(path, indices, labels) -> None:
    """Write columns index,label (one row per kept training image), atomically."""
    rows = "".join(f"{int(i)},{int(y)}\n" for i, y in zip(indices, labels))
    write_text(path, "index,label\n" + rows)
