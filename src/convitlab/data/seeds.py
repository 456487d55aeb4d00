"""The random streams of the data pipeline: one per purpose, so no two purposes share numbers.

NumPy seeds [a, b] and [a, b, 0] give the same stream, so the shuffle and subset streams are
told apart from the per-sample ones by a spawn key rather than by an extra seed word.
"""
import numpy as np

_SHUFFLE, _SUBSET, _MIX = 1, 2, 3


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator behind every random choice made for one image in one epoch."""
    return np.random.default_rng([seed, epoch, index])


def shuffle_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of an epoch's order of the training images."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch], spawn_key=(_SHUFFLE,)))


def subset_rng(seed: int, label: int) -> np.random.Generator:
    """The generator of the order in which one class's training images are kept."""
    return np.random.default_rng(np.random.SeedSequence([seed, label], spawn_key=(_SUBSET,)))


def mix_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The generator of one training batch's mixup/cutmix draw."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, batch], spawn_key=(_MIX,)))
