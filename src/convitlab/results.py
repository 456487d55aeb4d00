"""The result tables: their columns, writing them, and reading them back as pandas DataFrames.

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

For notebooks: load_results(...) (one row per run, from run directories, sweeps, summary.csv or
result.csv files), load_metrics(...) and load_locality(...) (the per-epoch curves of those runs,
with each run's identity columns joined on). Reading never writes: a sweep is gathered in memory.
"""
import csv
import io
import logging
import numbers
from pathlib import Path

import numpy as np
import pandas as pd

from convitlab.atomic import write_text
from convitlab.errors import UserError
from convitlab.run_folder import LOCALITY, METRICS, RESULT, RunFolder

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "epoch_s",
                  "img_per_s", "data_wait_frac", "skipped_steps"]
LOCALITY_COLUMNS = ["epoch", "layer", "head", "nonlocality", "gate", "window_distance"]
IDENTITY_COLUMNS = ["run_id", "kind", "study", "ablation", "model", "dataset", "fraction", "subset",
                    "locality_strength", "local_up_to_layer", "use_local_init", "train_gating", "train_gpsa",
                    "embed_dim", "num_heads", "depth", "img_size", "patch_size", "seed", "batch_size", "lr",
                    "optimizer", "weight_decay", "drop_path_rate", "label_smoothing", "random_crop", "mixup",
                    "cutmix", "ema", "epochs", "world_size", "threads"]
OUTCOME_COLUMNS = ["status", "top1", "top5", "best_top1", "best_epoch", "final_val_loss", "final_train_loss",
                   "images_seen", "params", "flops", "train_time_s", "img_per_s", "skipped_steps", "error"]
PROVENANCE_COLUMNS = ["config_hash", "setup_hash", "convitlab_version", "paddle_version", "overrides", "run_dir", "tags",
                      "pretrained", "pretrained_sha256"]
RESULT_COLUMNS = IDENTITY_COLUMNS + OUTCOME_COLUMNS + PROVENANCE_COLUMNS
SOURCE = "source"  # added by the loaders: the CSV file a row came from (a sweep's: its summary.csv)
# What wrote a row: a training run (train.py) or an evaluation of a checkpoint (eval.py).
# Rows without a kind (tables of older versions) are training runs.
TRAIN, EVAL = "train", "eval"
KIND_CHOICES = (TRAIN, EVAL, "all")
DAMAGED = "damaged"  # the status of a row that is not a complete line of its table
# Text even when it looks like a number: a config hash of digits must not become an int.
STRING_COLUMNS = frozenset({"run_id", "kind", "study", "ablation", "model", "dataset", "subset", "optimizer",
                            "status", "error", "config_hash", "setup_hash", "convitlab_version", "paddle_version", "overrides",
                            "run_dir", "tags", "pretrained", "pretrained_sha256", SOURCE})
# The columns of a run joined onto each row of its curves (load_metrics, load_locality).
RUN_KEYS = IDENTITY_COLUMNS + ["status", "setup_hash", "run_dir"]
# The columns of each per-epoch table (others may follow: readers keep whatever a file has).
CURVE_COLUMNS = {METRICS: METRIC_COLUMNS, LOCALITY: LOCALITY_COLUMNS}
# What reading a CSV may raise when the file is missing, damaged or not a CSV.
READ_ERRORS = (OSError, UnicodeDecodeError, pd.errors.ParserError, csv.Error)


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


# ---------- loading runs and sweeps ----------

def _input_tables(paths):
    """(text table, source, whether its rows were read from the runs' own result.csv) for each input: a run directory's result.csv; a sweep directory
    gathered in memory (or its summary.csv as it is when the folder holds no job); a CSV file
    itself. An input named twice (the same file or folder, resolved) is read once."""
    from convitlab.sweeps import SUMMARY, job_dirs, sweep_table  # sweeps builds on this module

    seen = set()
    for path in _flatten(paths):
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: no such file or directory")
        if path.is_dir() and RunFolder(path).result.is_file():
            path = RunFolder(path).result
        elif path.is_dir() and not job_dirs(path) and (path / SUMMARY).is_file():
            path = path / SUMMARY
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        if path.is_dir():
            yield sweep_table(path), path / SUMMARY, True
        elif path.name == RESULT:
            yield result_row(path), path, True
        else:
            try:
                yield read_checked(path), path, False
            except READ_ERRORS as exc:
                raise UserError(f"{path}: not a readable CSV ({' '.join(str(exc).split())})") from None


def _flatten(paths):
    for path in paths:
        if isinstance(path, (str, Path)):
            yield path
        else:
            yield from path


def run_location(source, run_dir):
    """Where a row's run is, resolved: the folder of the result.csv it was read from; else (a row of
    a summary) its run_dir, or the folder of that name beside the summary when the sweep has moved
    since; None for a row without a run_dir (a hand-made table)."""
    source = Path(source)
    if source.name == RESULT:
        return str(source.parent.resolve())
    if not run_dir:
        return None
    recorded, beside = Path(run_dir), source.parent / Path(run_dir).name
    return str((beside if not recorded.is_dir() and beside.is_dir() else recorded).resolve())


def gather_results(*paths) -> pd.DataFrame:
    """Every row the inputs hold, each run once (see load_results), of every kind, typed."""
    texts, own = [], []
    for text, source, read_from_runs in _input_tables(paths):
        texts.append(text.assign(**{SOURCE: str(source)}))
        own += [read_from_runs] * len(text)
    combined = pd.concat(texts, ignore_index=True).fillna("") if texts else pd.DataFrame(columns=[SOURCE])
    run_dirs = combined["run_dir"] if "run_dir" in combined else pd.Series("", index=combined.index)
    locations = pd.Series([run_location(source, run_dir) for source, run_dir in zip(combined[SOURCE], run_dirs)],
                          index=combined.index, dtype=object)
    # A run named twice keeps the row of its own result.csv: a summary.csv is a copy, maybe older.
    preferred = pd.Series(own, index=combined.index, dtype=bool).sort_values(ascending=False, kind="stable").index
    repeated = locations.notna() & locations[preferred].duplicated().reindex(combined.index)
    return typed_columns(combined[~repeated].reset_index(drop=True))


def kinds(frame: pd.DataFrame) -> pd.Series:
    """Each row's kind; rows without one (tables of older versions) are training runs."""
    if "kind" not in frame:
        return pd.Series(TRAIN, index=frame.index, dtype="string")
    return frame["kind"].astype("string").fillna(TRAIN)


def select_kind(frame: pd.DataFrame, kind) -> tuple:
    """(the rows of `kind`, the others); kind "all" keeps every row."""
    if kind not in KIND_CHOICES:
        raise UserError(f"kind={kind!r} is not allowed: one of {', '.join(KIND_CHOICES)}")
    chosen = kinds(frame).eq(kind) if kind != "all" else pd.Series(True, index=frame.index)
    return frame[chosen], frame[~chosen]


def left_out_kinds(others: pd.DataFrame, hint: str) -> list:
    """One line per kind of the rows select_kind left out, e.g. "left out 2 eval rows (kind=eval):
    --kind eval compares them" for the hint "--kind {} compares them"."""
    counts = kinds(others).value_counts().sort_index()
    return [f"left out {n} {name} row{'' if n == 1 else 's'} (kind={name}): {hint.format(name)}"
            for name, n in counts.items()]


def load_results(*paths, kind=TRAIN) -> pd.DataFrame:
    """Every run the inputs hold, one row each, typed, with a `source` column naming its CSV.

    An input is a run directory or its result.csv, a sweep directory (gathered in memory, as its
    summary.csv would be: failed and unfinished jobs are rows too, with their status), a
    summary.csv, or a list of these. Nothing is written.

    A run is its directory, resolved: where its result.csv is (for a row of a summary, its
    run_dir). A run directory holds one config and one result, so a run named twice (a sweep and
    its summary.csv, a run directory and its result.csv, two paths to one folder) is one row: the
    one read from its result.csv when an input reads it (a summary.csv is a copy, maybe older),
    else the first input's. Two directories are two trainings, even of one config and seed (their results
    may differ on a GPU): both are rows here, and compare counts them once.

    kind: "train" (default: eval.py's rows are left out, with a warning saying how many), "eval"
    or "all". A damaged row (not a complete line of its file) is kept with status "damaged" and a
    warning naming the file.
    """
    runs = gather_results(*paths)
    chosen, others = select_kind(runs, kind)
    for line in left_out_kinds(others, "load_results(..., kind='{}') loads them"):
        log.warning("%s", line)
    if "status" in chosen and "error" in chosen:  # a damaged row has both
        for error in chosen.loc[chosen["status"].eq(DAMAGED).fillna(False).astype(bool), "error"]:
            log.warning("%s: not loaded as a result (status damaged)", error)
    return chosen.reset_index(drop=True)


def run_directory(row, filename):
    """The directory holding a run's `filename`: where its run_dir says, else beside the table it
    came from (a sweep moved since it ran), else the folder of its result.csv; None when absent."""
    source = Path(row[SOURCE]) if isinstance(row.get(SOURCE), str) else None
    run_dir = row.get("run_dir") if isinstance(row.get("run_dir"), str) else None
    candidates = []
    if run_dir:
        candidates.append(Path(run_dir))
        if source is not None:
            candidates.append(source.parent / Path(run_dir).name)
    if source is not None and source.name == RESULT:
        candidates.append(source.parent)
    return next((folder for folder in candidates if (folder / filename).is_file()), None)


def run_curves(runs: pd.DataFrame, filename, columns=None) -> pd.DataFrame:
    """The rows of each run's `filename` (metrics.csv, locality.csv), typed, with the run's
    `columns` (default RUN_KEYS) joined on and `source` naming the curve's file.

    The index is the run's index in `runs`. A run column a curve also has (lr, img_per_s,
    epochs, ...) is joined as <name>_run. Runs without a readable file are left out.
    """
    columns = [name for name in (RUN_KEYS if columns is None else columns) if name in runs.columns]
    texts, owners = [], []
    for label, row in zip(runs.index, runs.astype(object).where(runs.notna(), None).to_dict("records")):
        folder = run_directory(row, filename)
        try:
            text = read_text(folder / filename) if folder is not None else None
        except READ_ERRORS:
            text = None
        if text is not None and len(text):
            texts.append(text.assign(**{SOURCE: str(folder / filename)}))
            owners += [label] * len(text)
    if not texts:  # no run has one: the columns such a file has, and none of its rows
        texts = [pd.DataFrame(columns=[*CURVE_COLUMNS.get(filename, []), SOURCE])]
    curves = typed_columns(pd.concat(texts, ignore_index=True).fillna(""))
    ids = runs.loc[owners, columns].rename(columns={name: f"{name}_run" for name in columns if name in curves})
    joined = pd.concat([ids.reset_index(drop=True), curves], axis=1)
    joined.index = pd.Index(owners, name="run")
    return joined


def load_metrics(*paths) -> pd.DataFrame:
    """The metrics.csv rows (one per epoch) of every run load_results(*paths) finds, each with its
    run's identity columns (RUN_KEYS; `lr_run` is the configured learning rate, `lr` the epoch's)."""
    return run_curves(load_results(*paths), METRICS)


def load_locality(*paths) -> pd.DataFrame:
    """The locality.csv rows (epoch, layer, head: nonlocality, gate, ...) of every run
    load_results(*paths) finds, each with its run's identity columns (RUN_KEYS)."""
    return run_curves(load_results(*paths), LOCALITY)
