"""The tables a run writes: their columns, writing them, and reading one back as a pandas DataFrame.

On disk a table is a CSV. Writing goes through one function, write_table: the whole file is
replaced through a temporary file beside it (a reader sees the old table or the new one), floats
are written with repr (full precision: a resumed run's tables compare bitwise with an
uninterrupted run's), None/NA as a blank cell, NaN as "nan".

Reading types each column as a whole (typed_columns): text columns (STRING_COLUMNS: hashes, run
ids, ...) stay text whatever they hold; a column of True/False is "boolean"; a column of integers
is "Int64"; other numbers are float64; anything else is text ("string"). Blank cells are missing
values (<NA>, or NaN in a float column). Tables from older versions with fewer columns load as
they are; loading several at once aligns their columns and leaves the missing ones blank.

A row is complete when it has every field of its header and the file ends with the newline the
writer puts after every line: a result.csv cut short (a copy interrupted, a disk that failed) is
caught by one or the other, whatever the cut. A row that is not complete is read as status
"damaged" with the reason, naming the file, in `error`, and its outcome columns blank: never as a
finished run. (No checksum column: it would also flag the hand edits a CSV invites, and tables of
older versions have none; those load as they are when complete.)

The schema is here and only here: the columns of result.csv (identity, outcome, provenance),
metrics.csv and locality.csv, which of them are text, which a comparison groups by (KNOBS) and
which a run's config fills (CONFIG_COLUMNS). The row builders (run.record.identity_row, the
result row of run.launch and eval.py, engine.recorder's metrics and locality rows) put their
values in these columns with ordered_row, which refuses a name the schema does not have; the
loaders and convitlab.results read many runs at once by the same names.
"""
import csv
import io
import logging
import numbers
from pathlib import Path

import numpy as np
import pandas as pd

from convitlab.core.files import write_text
from convitlab.core.layout import LOCALITY, METRICS, RunFolder

log = logging.getLogger(__name__)

# ---------- the schema: every column of every table, named here and nowhere else ----------
# Each list is in the order the columns are written. Other modules use these lists, or select
# from them with _of, which refuses a name that is not one of the schema's.

# metrics.csv, a row per epoch (the val_* columns blank on an epoch without an evaluation)
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "epoch_s",
                  "img_per_s", "data_wait_frac", "skipped_steps"]
# locality.csv, a row per epoch, layer and head (gate NaN for an MHSA layer)
LOCALITY_COLUMNS = ["epoch", "layer", "head", "nonlocality", "gate", "window_distance"]
# result.csv, one row per run: which run (identity), how it ended (outcome; epochs_done: the epochs
# an interrupted run's checkpoint holds), what made it (provenance)
IDENTITY_COLUMNS = ["run_id", "kind", "study", "ablation", "model", "dataset", "fraction", "subset",
                    "locality_strength", "local_up_to_layer", "use_local_init", "train_gating", "train_gpsa",
                    "embed_dim", "num_heads", "depth", "img_size", "patch_size", "seed", "batch_size", "lr",
                    "optimizer", "weight_decay", "drop_path_rate", "label_smoothing", "random_crop", "mixup",
                    "cutmix", "ema", "epochs", "world_size", "threads"]
OUTCOME_COLUMNS = ["status", "top1", "top5", "best_top1", "best_epoch", "final_val_loss", "final_train_loss",
                   "images_seen", "params", "flops", "train_time_s", "img_per_s", "skipped_steps", "epochs_done",
                   "error"]
PROVENANCE_COLUMNS = ["config_hash", "setup_hash", "convitlab_version", "paddle_version", "overrides", "run_dir",
                      "tags", "pretrained", "pretrained_sha256"]
RESULT_COLUMNS = IDENTITY_COLUMNS + OUTCOME_COLUMNS + PROVENANCE_COLUMNS
SOURCE = "source"  # added by the loaders: the CSV file a row came from (a sweep's: its summary.csv)


def _of(columns, *names) -> list:
    """`names`, each checked to be one of `columns` (at import: a misspelt or dropped column fails here)."""
    unknown = [name for name in names if name not in columns]
    if unknown:
        raise ValueError(f"not columns of the schema: {', '.join(unknown)}")
    return list(names)


# What wrote a row: a training run (train.py) or an evaluation of a checkpoint (eval.py).
# Rows without a kind (tables of older versions) are training runs.
TRAIN, EVAL = "train", "eval"
KIND_CHOICES = (TRAIN, EVAL, "all")
DAMAGED = "damaged"  # the status of a row that is not a complete line of its table
# Text even when it looks like a number: a config hash of digits must not become an int.
STRING_COLUMNS = frozenset(_of(RESULT_COLUMNS + [SOURCE], "run_id", "kind", "study", "ablation", "model", "dataset",
                               "subset", "optimizer", "status", "error", "config_hash", "setup_hash",
                               "convitlab_version", "paddle_version", "overrides", "run_dir", "tags", "pretrained",
                               "pretrained_sha256", SOURCE))
# The columns run.record.identity_row fills from a run's config and machine, in this order: the
# identity and provenance columns but the kind (the entry point's), the epochs (the schedule's
# plan) and the pretrained weights (set when they are loaded).
CONFIG_COLUMNS = [name for name in IDENTITY_COLUMNS + PROVENANCE_COLUMNS
                  if name not in _of(RESULT_COLUMNS, "kind", "epochs", "pretrained", "pretrained_sha256")]
# The columns of a run joined onto each row of its curves (load_metrics, load_locality).
RUN_KEYS = IDENTITY_COLUMNS + _of(RESULT_COLUMNS, "status", "setup_hash", "run_dir")
# The knobs a comparison may group runs by, in the order its table shows them: the identity
# columns but the run's name, its seed (runs of several seeds are repeats of one setup), where
# it ran (world_size, threads) and random_crop (a study that varies random_crop is refused as
# mixing setups unless --by names it). The batch size, the epochs and the study come last: they
# usually follow other knobs (epochs scaled by the fraction), and compare.default_by keeps a
# knob only when the knobs before it do not already determine it.
_NOT_KNOBS = _of(IDENTITY_COLUMNS, "run_id", "seed", "world_size", "threads", "random_crop")
_LAST_KNOBS = _of(IDENTITY_COLUMNS, "batch_size", "epochs", "study")
KNOBS = [name for name in IDENTITY_COLUMNS if name not in _NOT_KNOBS + _LAST_KNOBS] + _LAST_KNOBS
# The columns of each per-epoch table (others may follow: readers keep whatever a file has).
CURVE_COLUMNS = {METRICS: METRIC_COLUMNS, LOCALITY: LOCALITY_COLUMNS}
# What reading a CSV may raise when the file is missing, damaged or not a CSV.
READ_ERRORS = (OSError, UnicodeDecodeError, pd.errors.ParserError, csv.Error)


def ordered_row(values: dict, columns, complete=False) -> dict:
    """`values` as a row of `columns`: each column in their order, None where `values` has none;
    complete: every column must have a value. A key that is not one of `columns` raises
    ValueError: the rows this project builds hold the schema's columns and no other."""
    unknown = [key for key in values if key not in columns]
    missing = [name for name in columns if name not in values] if complete else []
    if unknown or missing:
        raise ValueError(", ".join(filter(None, [unknown and f"not columns of the table: {', '.join(unknown)}",
                                                 missing and f"missing columns: {', '.join(missing)}"])))
    return {name: values.get(name) for name in columns}


# ---------- writing ----------

def format_value(value) -> str:
    """The CSV text of one value: blank for None/NA, repr for floats (so NaN is "nan")."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    return str(value)


def _frame_of_rows(rows) -> pd.DataFrame:
    """Row dicts as a DataFrame of their Python values as they are (a key a row lacks is None)."""
    rows = list(rows)
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return pd.DataFrame([[row.get(key) for key in keys] for row in rows], columns=keys, dtype=object)


def write_table(path, table, columns=()) -> None:
    """Write a whole table atomically: `columns` first, then the table's other columns.

    `table` is a DataFrame (typed, or the text of a table read with read_text) or a list of row
    dicts. Every CSV this project writes goes through here.
    """
    frame = table if isinstance(table, pd.DataFrame) else _frame_of_rows(table)
    order = list(dict.fromkeys([*columns, *frame.columns]))
    text = frame.astype(object).reindex(columns=order, fill_value="").map(format_value)
    buffer = io.StringIO()
    text.to_csv(buffer, index=False, lineterminator="\n")
    write_text(path, buffer.getvalue())


def write_result(run_dir, row: dict) -> None:
    """Write run_dir/result.csv: one row, in RESULT_COLUMNS order (extra keys after)."""
    write_table(RunFolder(run_dir).result, [row], RESULT_COLUMNS)


# ---------- reading ----------

def read_text(path) -> pd.DataFrame:
    """A CSV exactly as written: every cell its text ("" when blank); an empty file has no columns."""
    try:
        return pd.read_csv(path, dtype=object, keep_default_na=False, na_filter=False, index_col=False,
                           encoding="utf-8")
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _typed_column(name, text: pd.Series) -> pd.Series:
    present = text.ne("")
    values = text[present]
    if name in STRING_COLUMNS:
        return text.where(present).astype("string")
    if values.empty:
        return pd.Series(np.nan, index=text.index, dtype="float64")
    if values.isin(["True", "False"]).all():
        return text.map({"True": True, "False": False}).astype("boolean")
    try:
        integers = pd.to_numeric(values)  # int64 when every cell is an integer; raises on nan, inf, text
        if pd.api.types.is_integer_dtype(integers):
            return integers.astype("Int64").reindex(text.index)
    except (ValueError, TypeError, OverflowError):
        pass
    try:
        return values.astype("float64").reindex(text.index)  # float() per cell: exact, reads nan and inf
    except (ValueError, TypeError):
        return text.where(present).astype("string")


def typed_columns(text: pd.DataFrame) -> pd.DataFrame:
    """The typed table of a text table (see the module docstring for the rules)."""
    return pd.DataFrame({name: _typed_column(name, text[name]) for name in text.columns}, index=text.index)


def read_rows(path) -> list:
    """Every row of a CSV as a dict of Python values: None for a blank cell, else int, float, bool or str."""
    text = read_text(path)
    values = typed_columns(text).astype(object).where(text.ne(""), None)
    return values.to_dict("records")


def incomplete_rows(path) -> dict:
    """{row position: why} for the rows of a CSV that are not complete lines of it: a field count
    other than the header's, or the last row when the file does not end with a newline."""
    content = Path(path).read_bytes()
    records = [record for record in csv.reader(io.StringIO(content.decode("utf-8"), newline="")) if record]
    reasons = {}
    for position, record in enumerate(records[1:]):
        if len(record) != len(records[0]):
            reasons[position] = f"row {position + 1} has {len(record)} of {len(records[0])} fields"
    if len(records) > 1 and not content.endswith(b"\n"):
        last = len(records) - 2
        reasons[last] = ", ".join(filter(None, [reasons.get(last), f"row {last + 1} has no line end"]))
    return reasons


def read_checked(path) -> pd.DataFrame:
    """read_text, with each row that is not complete (incomplete_rows) marked damaged: status
    DAMAGED, the reason naming the file in `error`, the other outcome columns blank."""
    text = read_text(path)
    reasons = incomplete_rows(path)
    if not reasons:
        return text
    text = text.reindex(columns=list(dict.fromkeys([*text.columns, "status", "error"])), fill_value="")
    damaged = text.index.isin(list(reasons))
    if max(reasons) >= len(text):  # the CSV reader and pandas do not agree on the rows: trust none
        damaged[:] = True
    outcomes = [name for name in OUTCOME_COLUMNS if name in text and name not in ("status", "error")]
    text.loc[damaged, outcomes] = ""
    text.loc[damaged, "status"] = DAMAGED
    text.loc[damaged, "error"] = [f"{path} is damaged: {reasons.get(position, 'cut short')}"
                                  for position in np.flatnonzero(damaged)]
    return text


def result_row(path) -> pd.DataFrame:
    """The text of a run's result.csv; one that is not a complete row (cut, fields missing, not a
    CSV, empty) is one row of status DAMAGED whose error names the file, as read_checked marks it."""
    path = Path(path)
    try:
        table = read_checked(path)
        reason = None if len(table) else "it holds no row"
    except READ_ERRORS as exc:  # e.g. cut inside a quoted field: the field count says it plainer than pandas
        try:
            reason = ", ".join(incomplete_rows(path).values())
        except READ_ERRORS:
            reason = ""
        table, reason = pd.DataFrame(), reason or " ".join(str(exc).split())
    if reason is not None:
        table = pd.DataFrame([{"run_id": path.parent.name, "status": DAMAGED,
                               "error": f"{path} is damaged: {reason}"}], dtype=object)
    damaged = table["status"].eq(DAMAGED) if "status" in table else pd.Series(False, index=table.index)
    if damaged.any():  # cut before its run_dir, a damaged row is where its file is
        table = table.reindex(columns=list(dict.fromkeys([*table.columns, "run_dir"])), fill_value="")
        table.loc[damaged & table["run_dir"].eq(""), "run_dir"] = str(path.parent)
    return table


def read_result(run_dir):
    """The row of run_dir/result.csv, or None when it is missing, unreadable or damaged."""
    try:
        text = read_checked(RunFolder(run_dir).result)
    except READ_ERRORS:
        return None
    if text.empty or ("status" in text and text["status"].eq(DAMAGED).any()):
        return None
    return typed_columns(text).astype(object).where(text.ne(""), None).to_dict("records")[0]


# ---------- growing and trimming the per-epoch tables (text in, text out: nothing is re-formatted) ----------

def append_rows(path, rows, columns) -> None:
    """Append rows to a CSV (header written if new), rewriting it atomically."""
    path = Path(path)
    old = read_text(path) if path.exists() else pd.DataFrame()
    new = _frame_of_rows(rows).map(format_value)
    write_table(path, pd.concat([old, new], ignore_index=True).fillna(""), [*old.columns, *columns])


def truncate_after_epoch(path, epoch: int) -> None:
    """Drop the rows whose epoch is after `epoch` (no-op when the file is missing)."""
    path = Path(path)
    if not path.exists():
        return
    text = read_text(path)
    if "epoch" not in text:
        return
    after = pd.to_numeric(text["epoch"], errors="coerce") > epoch
    if after.any():
        write_table(path, text[~after])
