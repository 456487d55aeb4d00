"""Data: digits, CIFAR and image folders; per-class subsets; transforms; mixup/cutmix; loaders.

Names load their module on first use, so the transforms (PIL and NumPy; the config schema reads
image sizes with them) load without Paddle.
"""
import importlib

_WHERE = {"Datasets": "datasets", "ImageDataset": "datasets", "build_datasets": "datasets",
          "build_eval_dataset": "datasets", "build_eval_loader": "loaders", "build_loaders": "loaders",
          "mix_batch": "mixing", "mixing_enabled": "mixing", "write_subset_csv": "subset"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
