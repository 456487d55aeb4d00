"""CIFAR-10 and CIFAR-100, read straight from the official python-pickle archives (no extraction)."""
import functools
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convitlab.core.errors import UserError, bad_value, whole_message
from convitlab.core.files import file_digest
from convitlab.core.safe_pickle import ArrayUnpickler
from convitlab.data.sources import ArrayImages

URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class CifarArchive:
    """One official archive: its file name, MD5 and the pickled batches inside it."""
    file: str
    md5: str
    train_batches: tuple
    test_batches: tuple
    label_key: bytes
    meta: str
    names_key: bytes


ARCHIVES = {
    "cifar10": CifarArchive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                            tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels",
                            "batches.meta", b"label_names"),
    "cifar100": CifarArchive("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", ("train",), ("test",),
                             b"fine_labels", "meta", b"fine_label_names"),
}


def load_cifar(name: str, root, download: bool, checksum: bool, with_train: bool = True):
    """(train, val, class_names) of `name` (cifar10 or cifar100) from its archive in `root`;
    train is None without with_train.

    Decoded arrays stay in memory for the process, keyed by the file's path, size and mtime.
    """
    archive = ARCHIVES[name]
    path = _locate(archive, root, download, checksum)
    stat = path.stat()
    return _decode(str(path.resolve()), stat.st_size, stat.st_mtime_ns, name, checksum, with_train)


def _locate(archive: CifarArchive, root, download: bool, checksum: bool) -> Path:
    if not root:
        raise bad_value("data.root", root, f"the folder holding {archive.file}")
    folder = Path(root).expanduser()
    path = folder / archive.file
    if path.is_file():
        return path
    if not download:
        raise UserError(f"{archive.file} not found in {folder}: put the official {archive.file} "
                        f"({URL}{archive.file}) in {folder}, or set data.download=true")
    from paddle.utils.download import get_path_from_url  # here: only a download needs it (and requests)
    try:
        return Path(get_path_from_url(URL + archive.file, str(folder), archive.md5 if checksum else None,
                                      decompress=False))
    except Exception as exc:  # noqa: BLE001  (offline, refused, bad MD5 after retries: all end the same way)
        raise UserError(f"could not download {URL}{archive.file} into {folder} ({whole_message(exc)}): "
                        f"put {archive.file} in {folder} by hand") from None


@functools.lru_cache(maxsize=2)
def _decode(path: str, size: int, mtime_ns: int, name: str, checksum: bool, with_train: bool = True):
    """(train or None without with_train, test, class names) of the archive at `path`."""
    archive = ARCHIVES[name]
    if checksum:
        digest = file_digest(path, "md5")
        if digest != archive.md5:
            raise UserError(f"{path} has MD5 {digest}, not the official {archive.md5}: download it again "
                            "(delete it and set data.download=true), or set data.checksum=false to use a "
                            "modified copy")
    try:
        train_batches = archive.train_batches if with_train else ()
        batches = _read_pickles(path, (*train_batches, *archive.test_batches, archive.meta))
        train = _images_and_labels([batches[b] for b in train_batches], archive.label_key) if with_train else None
        test = _images_and_labels([batches[b] for b in archive.test_batches], archive.label_key)
        names = [n.decode() for n in batches[archive.meta][archive.names_key]]
    except (tarfile.TarError, EOFError, OSError, zlib.error, pickle.UnpicklingError, KeyError, ValueError,
            TypeError, AttributeError, IndexError) as exc:
        raise UserError(f"{path} is damaged or not the official {archive.file} ({whole_message(exc)}): "
                        "download it again") from None
    return (ArrayImages(*train) if with_train else None), ArrayImages(*test), names


def _read_pickles(path: str, wanted: tuple) -> dict:
    """The unpickled members named in `wanted` (by base name), in one pass over the gzip stream;
    arrays and plain containers only (safe_pickle), so a tampered archive cannot run code."""
    found = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if member.isfile() and name in wanted:
                found[name] = ArrayUnpickler(tar.extractfile(member), encoding="bytes").load()
    missing = [name for name in wanted if name not in found]
    if missing:
        raise KeyError(f"no {', '.join(missing)} inside")
    return found


def _images_and_labels(batches: list, label_key: bytes):
    """Images [N, 32, 32, 3] uint8 and labels [N] from pickled batches of rows R(1024) G(1024) B(1024)."""
    data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"data of shape {data.shape} with {len(labels)} labels")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels
