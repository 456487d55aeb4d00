"""ImageNet-style folders: root/train/<class>/* and root/val/<class>/*, classes in sorted order."""
from pathlib import Path

from convitlab.core.errors import UserError
from convitlab.data.sources import FileImages

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
BOTH = "train/<class>/ and val/<class>/"


def scan_image_folder(root, in_chans: int):
    """(train, val, class_names) listing the image files under `root`; nothing is decoded yet.

    Files are in sorted order within each class (the reference's order, which `subset=first` keeps).
    """
    root = _root(root, BOTH)
    mode = _mode(in_chans)
    train_classes, train = _scan_split(root / "train", BOTH)
    val_classes, val = _scan_split(root / "val", BOTH)
    if val_classes != train_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise UserError(f"{root / 'val'} and {root / 'train'} hold different classes (only in train: "
                        f"{_few(only_train)}; only in val: {_few(only_val)}): give both the same class folders")
    return FileImages(*train, mode), FileImages(*val, mode), train_classes


def scan_val_folder(root, in_chans: int):
    """(val, class_names) of root/val alone, for evaluation: train/ is neither listed nor needed."""
    root = _root(root, "val/<class>/")
    classes, val = _scan_split(root / "val", "val/<class>/")
    return FileImages(*val, _mode(in_chans)), classes


def _root(root, expected: str) -> Path:
    if not root or not Path(root).expanduser().is_dir():
        raise UserError(f"data.root={root} is not a folder: point it at the folder holding {expected}")
    return Path(root).expanduser()


def _mode(in_chans: int) -> str:
    return "L" if in_chans == 1 else "RGB"


def _scan_split(folder: Path, expected: str):
    """Class names and (paths, labels) of one split; every class folder must hold an image."""
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: data.root must hold {expected}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{folder} has no class folders: put each class's images in {folder}/<class>/")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            raise UserError(f"{folder / name} holds no images ({', '.join(EXTENSIONS)}): add some or remove "
                            "the folder")
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return classes, (paths, labels)


def _few(names: list) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "none"
