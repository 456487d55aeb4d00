"""The result tables: their columns in one place, atomic writing, typed reading back.

Every write replaces the whole file through a temporary file beside it, so the file on disk
is always complete. Floats are written with repr (full precision), so a resumed run's
tables compare bitwise with an uninterrupted run's.
"""
import csv
import io
import numbers
import re
from pathlib import Path

from convitlab.atomic import write_text

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "epoch_s",
                  "img_per_s", "data_wait_frac"]
LOCALITY_COLUMNS = ["epoch", "layer", "head", "nonlocality", "gate", "window_distance"]
IDENTITY_COLUMNS = ["run_id", "study", "ablation", "model", "dataset", "fraction", "subset", "locality_strength",
                    "local_up_to_layer", "use_local_init", "train_gating", "train_gpsa", "embed_dim", "num_heads",
                    "depth", "img_size", "patch_size", "seed", "batch_size", "lr", "optimizer", "weight_decay",
                    "drop_path_rate", "label_smoothing", "mixup", "cutmix", "ema", "epochs", "world_size", "threads"]
OUTCOME_COLUMNS = ["status", "top1", "top5", "best_top1", "best_epoch", "final_val_loss", "final_train_loss",
                   "params", "flops", "train_time_s", "img_per_s", "error"]
PROVENANCE_COLUMNS = ["config_hash", "setup_hash", "convitlab_version", "paddle_version", "overrides", "run_dir", "tags"]
RESULT_COLUMNS = IDENTITY_COLUMNS + OUTCOME_COLUMNS + PROVENANCE_COLUMNS
# Text even when it looks like a number: a config hash of digits must not become an int.
STRING_COLUMNS = frozenset({"run_id", "study", "ablation", "model", "dataset", "subset", "optimizer", "status",
                            "error", "config_hash", "setup_hash", "convitlab_version", "paddle_version", "overrides", "run_dir",
                            "tags"})
_INTEGER = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?((\d+\.?\d*|\.\d+)(e[+-]?\d+)?|nan|inf(inity)?)", re.IGNORECASE)


def format_value(value) -> str:
    """The CSV text of one value: blank for None, repr for floats."""
    if value is None:
        return ""
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    return str(value)


def parse_value(column: str, text):
    """The typed value of one CSV cell: None, bool, int, float, or the text itself."""
    if text is None or text == "":
        return None
    if column in STRING_COLUMNS:
        return text
    if text in ("True", "False"):
        return text == "True"
    if _INTEGER.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def write_rows(path, rows, columns) -> None:
    """Write a whole table atomically: `columns`, then any other keys the rows have."""
    columns = list(dict.fromkeys([*columns, *(key for row in rows for key in row)]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: format_value(row.get(key)) for key in columns} for row in rows)
    write_text(path, buffer.getvalue())


def _read_text_table(path):
    """The header and the rows of a CSV, every cell as its text ("" when blank)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [{key: text or "" for key, text in row.items() if key is not None} for row in reader]
        return list(reader.fieldnames or []), rows


def append_rows(path, rows, columns) -> None:
    """Append rows to a CSV (header written if new), rewriting it atomically."""
    path = Path(path)
    header, old = _read_text_table(path) if path.exists() else ([], [])
    write_rows(path, old + list(rows), [*header, *columns])


def truncate_after_epoch(path, epoch: int) -> None:
    """Drop the rows whose epoch is after `epoch` (no-op when the file is missing)."""
    path = Path(path)
    if not path.exists():
        return
    header, rows = _read_text_table(path)
    kept = [row for row in rows if not _after(row, epoch)]
    if len(kept) != len(rows):
        write_rows(path, kept, header)


def _after(row, epoch) -> bool:
    value = parse_value("epoch", row.get("epoch"))
    return isinstance(value, (int, float)) and value > epoch


def read_rows(path) -> list:
    """Every row of a CSV as a dict of typed values (see parse_value)."""
    header, rows = _read_text_table(path)
    return [{key: parse_value(key, row.get(key)) for key in header} for row in rows]


def read_last_row(path) -> dict:
    """The last row of a CSV; {} when it is missing or empty."""
    path = Path(path)
    rows = read_rows(path) if path.exists() else []
    return rows[-1] if rows else {}


def write_result(run_dir, row: dict) -> None:
    """Write run_dir/result.csv: one row, in RESULT_COLUMNS order (extra keys after)."""
    write_rows(Path(run_dir) / "result.csv", [row], RESULT_COLUMNS)


def read_result(run_dir):
    """The row of run_dir/result.csv, or None when it is missing or unreadable."""
    try:
        rows = read_rows(Path(run_dir) / "result.csv")
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return rows[0] if rows else None
