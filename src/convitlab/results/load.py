"""Loading runs and sweeps as pandas DataFrames, for compare.py and notebooks.

load_results(...) gives one row per run, from run directories, sweeps, summary.csv or result.csv
files; load_metrics(...) and load_locality(...) the per-epoch curves of those runs, with each run's
identity columns joined on. Reading never writes: a sweep is gathered in memory.
"""
import logging
from pathlib import Path

import pandas as pd

from convitlab.core.errors import UserError
from convitlab.core.layout import LOCALITY, METRICS, RESULT, RunFolder
from convitlab.core.tables import (
    CURVE_COLUMNS,
    DAMAGED,
    KIND_CHOICES,
    READ_ERRORS,
    RUN_KEYS,
    SOURCE,
    TRAIN,
    read_checked,
    read_text,
    result_row,
    typed_columns,
)
from convitlab.results.sweeps import SUMMARY, job_dirs, sweep_table

log = logging.getLogger(__name__)


def _input_tables(paths):
    """(text table, source, whether its rows were read from the runs' own result.csv) for each input: a run directory's result.csv; a sweep directory
    gathered in memory (or its summary.csv as it is when the folder holds no job); a CSV file
    itself. An input named twice (the same file or folder, resolved) is read once."""
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
