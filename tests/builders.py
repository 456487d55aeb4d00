"""The data the tests build, in the real formats: configs of conf/data, CIFAR archives, image folders."""
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from convitlab.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]


def data_config(name="digits", *overrides):
    """The conf/data/<name>.yaml config, on the schema, with dotted overrides."""
    return OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml"),
                           OmegaConf.from_dotlist(list(overrides)))


CIFAR = {  # archive, folder inside, train batches, test batch, label key, meta member, names key, classes
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                "test_batch", b"labels", "batches.meta", b"label_names", 10),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], "test", b"fine_labels", "meta",
                 b"fine_label_names", 100),
}


def write_fake_cifar(root: Path, name: str, per_batch: int = 6, test: int = 5, meta=None):
    """A small archive in the official layout (`meta` replaces the label names' member);
    returns (train data, train labels, test data, test labels)."""
    archive, folder, train_members, test_member, label_key, meta_member, names_key, classes = CIFAR[name]
    rng = np.random.default_rng(0)
    arrays = {}

    def batch(member, count, first_label):
        labels = [(first_label + 7 * i) % classes for i in range(count)]
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        arrays[member] = (data, labels)
        content = {b"batch_label": b"fake", label_key: labels, b"data": data, b"filenames": [b"x.png"] * count}
        if name == "cifar100":
            content[b"coarse_labels"] = [y // 5 for y in labels]
        return content

    members = {m: batch(m, per_batch, k) for k, m in enumerate(train_members)}
    members[test_member] = batch(test_member, test, 3)
    members[meta_member] = meta or {names_key: [f"class{c}".encode() for c in range(classes)]}
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / archive, "w:gz") as tar:
        for member, content in members.items():
            payload = pickle.dumps(content, protocol=2)  # as the official files: Python 2 pickles
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    train_data = np.concatenate([arrays[m][0] for m in train_members])
    train_labels = sum((arrays[m][1] for m in train_members), [])
    return train_data, train_labels, arrays[test_member][0], arrays[test_member][1]


def plain(name, root, *overrides):
    """A config that leaves pixels as they are (no augmentation, mean 0, std 1)."""
    return data_config(name, f"root={root}", "checksum=false", "mean=[0,0,0]", "std=[1,1,1]",
                       "augment.random_crop=false", "augment.hflip=false", *overrides)


def make_image_folder(root: Path, train=(("dog", 3), ("cat", 2)), val=(("cat", 1), ("dog", 2))):
    """root/{train,val}/<class>/ of random RGB images of a few sizes, PNG and JPEG; (class, count) pairs."""
    rng = np.random.default_rng(0)
    for split, classes in (("train", train), ("val", val)):
        for name, count in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(20 + 3 * i, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def make_val_only_folder(root: Path, classes=("cat", "dog"), per_class=2) -> Path:
    """root/val/<class>/*.png of random 20x24 RGB images, and no train/ at all."""
    rng = np.random.default_rng(0)
    for name in classes:
        folder = root / "val" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def write_png_16(path: Path, pixels: np.ndarray) -> Path:
    """A real 16-bit PNG (grey for [H, W], RGB for [H, W, 3] uint16), written chunk by chunk:
    Pillow writes 16-bit grey but not 16-bit RGB."""
    import struct
    import zlib

    height, width = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    rows = pixels.astype(">u2").reshape(height, -1).tobytes()
    stride = len(rows) // height
    raw = b"".join(b"\x00" + rows[y * stride:(y + 1) * stride] for y in range(height))  # filter 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def make_16_bit_folder(root: Path, classes=("dark", "light"), per_class=3) -> Path:
    """root/{train,val}/<class>/ of 16-bit PNGs, grey and RGB, 12x12, of values far above 255."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                shape = (12, 12, 3) if i % 2 else (12, 12)
                low = 20000 * label
                write_png_16(folder / f"{i}.png", rng.integers(low, low + 40000, size=shape, dtype=np.uint16))
    return root
