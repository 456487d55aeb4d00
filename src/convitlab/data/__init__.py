"""Data: digits, CIFAR and image folders; per-class subsets; transforms; mixup/cutmix; loaders."""
from convitlab.data.datasets import Datasets, ImageDataset, build_datasets, build_eval_dataset
from convitlab.data.loaders import build_eval_loader, build_loaders
from convitlab.data.mixing import mix_batch, mixing_enabled
from convitlab.data.subset import write_subset_csv

__all__ = ["Datasets", "ImageDataset", "build_datasets", "build_eval_dataset", "build_eval_loader", "build_loaders",
           "mix_batch", "mixing_enabled", "write_subset_csv"]
