"""Classify image files with an exported model: evaluation's reading and preprocessing
(data/sources.py, data/transforms.py), batches through Paddle Inference, the top k per image as a
table (one row per file; a file that cannot be read is a row with its error, never a crash)."""
import os
from pathlib import Path

import numpy as np
import pandas as pd

from convitlab.core.errors import UserError, bad_value, broken_link
from convitlab.core.files import atomic_path
from convitlab.data.imagefolder import EXTENSIONS
from convitlab.data.sources import FileImages
from convitlab.data.transforms import EvalTransform, Normalise


def list_images(images) -> tuple:
    """(files, is_folder): `images` itself, or the image files (EXTENSIONS) under the folder, sorted."""
    path = Path(images).expanduser()
    if path.is_file():
        return [path], False
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            raise bad_value("images", str(images), f"an image file or a folder holding some ({', '.join(EXTENSIONS)}); "
                                                   "this folder holds none")
        return files, True
    problem = broken_link(path) or "not found"
    raise bad_value("images", str(images), f"an image file or a folder of them; it is {problem}")


def eval_transform(manifest) -> EvalTransform:
    """The preprocessing evaluation applies to the data the model was trained on (export.json)."""
    normalise = Normalise(np.asarray(manifest.mean, np.float32), np.asarray(manifest.std, np.float32),
                          manifest.in_chans)
    return EvalTransform(tuple(manifest.img_size), normalise, manifest.framing == "resize_and_centre_crop")


def columns(topk: int, named: bool) -> list:
    """predictions.csv's columns: path, then per rank i its class index (top<i>), name where the
    classes have names (top<i>_name) and probability (top<i>_prob), then error."""
    ranks = [[f"top{i}", *([f"top{i}_name"] if named else []), f"top{i}_prob"] for i in range(1, topk + 1)]
    return ["path", *(c for rank in ranks for c in rank), "error"]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def check_topk(topk: int, num_classes: int) -> None:
    if not 1 <= topk <= num_classes:
        raise bad_value("topk", topk, f"1..{num_classes} (the model's classes)")


def predict(predictor, files, topk: int, batch_size: int, on_row=None) -> pd.DataFrame:
    """One row per file in `files` (columns()); `on_row(row)` sees each row as it is made."""
    manifest = predictor.manifest
    check_topk(topk, manifest.num_classes)
    names = manifest.class_names
    transform = eval_transform(manifest)
    reader = FileImages(files, np.zeros(len(files)), "L" if manifest.in_chans == 1 else "RGB")
    rows = []
    for start in range(0, len(files), batch_size):
        batch, arrays = [], []
        for index in range(start, min(start + batch_size, len(files))):
            row = {"path": str(files[index]), "error": ""}
            try:
                arrays.append(transform(reader.load(index)))
                batch.append(row)
            except UserError as exc:  # cannot read image <path>: <why> (replace or remove the file)
                row["error"] = str(exc)
                rows.append(row)
                if on_row:
                    on_row(row)
        if not arrays:
            continue
        probabilities = softmax(predictor(np.stack(arrays)).astype(np.float64))
        for row, p in zip(batch, probabilities):
            for rank, label in enumerate(np.argsort(-p, kind="stable")[:topk], start=1):
                row[f"top{rank}"] = int(label)
                if names:
                    row[f"top{rank}_name"] = names[label]
                row[f"top{rank}_prob"] = float(p[label])
            rows.append(row)
            if on_row:
                on_row(row)
    order = {str(path): i for i, path in enumerate(files)}
    rows.sort(key=lambda row: order[row["path"]])
    table = pd.DataFrame(rows, columns=columns(topk, bool(names)))
    return table.astype({f"top{rank}": "Int64" for rank in range(1, topk + 1)})


def cannot_write(out, reason) -> UserError:
    return UserError(f"cannot write out={str(out)!r} ({reason}): give a path you can write to")


def check_out(out) -> Path:
    """The CSV to write: a file path in a folder that exists or can be made, writable; checked
    before any work, and nothing is created until the table is written."""
    path = Path(out).expanduser()
    if path.is_dir() or (os.path.lexists(path) and not path.is_file() and broken_link(path) is None):
        raise bad_value("out", str(out), "a file path for the CSV; it is a folder (or not a regular file)")
    ancestor = next(p for p in path.parents if p.exists())  # the root at worst
    if not ancestor.is_dir():
        raise cannot_write(out, f"{ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise cannot_write(out, "Read-only file system" if os.statvfs(ancestor).f_flag & os.ST_RDONLY
                           else "Permission denied")
    return path


def write_csv(table: pd.DataFrame, path) -> None:
    """Write the table atomically: `path` is the whole table or what it was before."""
    try:
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")
    except UserError:  # a full disk, said as such (core.files.DiskFull)
        raise
    except OSError as exc:
        raise cannot_write(path, exc.strerror or exc) from None


def describe(row: dict) -> str:
    """One line for one image: its top class (with its name) and probability, or its error."""
    if row["error"]:
        return f"{row['path']}: {row['error']}"
    name = f" ({row['top1_name']})" if "top1_name" in row else ""
    return f"{row['path']}: {row['top1']}{name} {row['top1_prob']:.4f}"
