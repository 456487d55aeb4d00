"""Comparison tables across runs and sweeps, built on the DataFrames of convitlab.results.load.

Training runs are compared (evaluation rows, kind "eval", only when asked, and never with them).
Each run counts once: a run named twice by the inputs is one row (load.load_results), and a
config found in several directories (the same config and seed trained twice: two sweeps started
on one folder, a copied sweep) is counted once, the first, with a line naming the others. Its
copies are not other seeds, and averaging them would shrink the spread and unpair the test.

Completed runs are grouped by the knobs that vary (tables.KNOBS, never the seed); each cell gets
the mean, the sample std and n of the metric over its runs. With a `vs` key the cells become a
pivot, one column per value, and every column but the baseline gets its gain over the baseline,
mean / mean_baseline − 1 in percent (the paper's Table 2: ConViT-S 47.8 vs DeiT-S 34.8 at 5% of
the data → +37%), with a 95% confidence interval (Fieller's) and the one-sided p-value of a
t-test that the column beats the baseline (stats.gain_test).

Both are paired when the two cells hold the same seeds (and subset_seed, where a table records
it), once each: such runs share their data subset and initial draws, and pairing takes that
shared variation out. Otherwise they are Welch's. Not a bootstrap: 3 seeds give 10 distinct
resamples, and its intervals are too narrow at such n.

compare_results is the command (src/compare.py): comparison.csv (Comparison.table, every number
at full precision), comparison.md (markdown_table, rendered from the same table),
locality_trends.csv (curves.locality_trends) and the figures of plots.py.
"""
import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from convitlab.core import tables
from convitlab.core.errors import UserError
from convitlab.core.files import write_text
from convitlab.core.layout import RunFolder
from convitlab.core.tables import KNOBS, SOURCE
from convitlab.results import load
from convitlab.results.cells import COLUMN, ROW, show
from convitlab.results.curves import write_locality_trends
from convitlab.results.plots import (
    plot_gates,
    plot_learning_curves,
    plot_metric_vs_fraction,
    plot_metric_vs_locality,
    plot_nonlocality,
)
from convitlab.results.stats import GainTest, gain_test
from convitlab.results.sweeps import gather_sweep, job_dirs

PAIR_KEYS = ("seed", "subset_seed")  # runs in two cells with equal values of these are paired
# The gain statistics (GainTest's fields) and their names in comparison.csv (after "<column label> ").
GAIN_FIELDS = {"gain": "gain %", "low": "gain CI low %", "high": "gain CI high %", "t": "gain t", "dof": "gain dof",
               "p": "gain p", "n": "gain n", "test": "gain test"}


# ---------- pairing runs for the test ----------

def cell_gain(cell: pd.DataFrame, base: pd.DataFrame, metric) -> GainTest:
    """The gain of one cell's runs over the baseline cell's runs, paired by seed when they can be:
    both cells hold the same seeds (and subset seeds, if recorded), each once."""
    keys = [key for key in PAIR_KEYS if key in cell and key in base]
    if "seed" in keys and cell["seed"].notna().all() and base["seed"].notna().all():
        # each run's (seed, subset_seed, ...) as a tuple, None for a blank
        ids, base_ids = ([tuple(row.values()) for row in _records(runs[keys])] for runs in (cell, base))
        if len(set(ids)) == len(ids) == len(base_ids) == len(set(base_ids)) and set(ids) == set(base_ids):
            by_id = dict(zip(base_ids, base[metric]))
            return gain_test(cell[metric], [by_id[i] for i in ids], paired=True)
    return gain_test(cell[metric], base[metric], paired=False)


# ---------- the comparison ----------

@dataclass(frozen=True)
class Stats:
    mean: float
    std: float  # sample std (ddof 1); NaN for n = 1
    n: int


@dataclass
class Comparison:
    metric: str
    by: list  # the row keys
    vs: str  # the column key, or None
    baseline: object  # the vs value gains are relative to (None without vs)
    columns: list  # the vs values, baseline first ([metric] without vs)
    rows: pd.DataFrame  # the table's rows: their by values, indexed by row position
    cells: pd.DataFrame  # (row, column) positions → mean, std, n
    gains: pd.DataFrame  # (row, column) positions of the gain columns → the GainTest fields
    runs: pd.DataFrame  # the completed runs, with their table positions (ROW, COLUMN; <NA> without the metric)
    left_out: pd.DataFrame  # the runs that did not complete
    notes: list = field(default_factory=list)  # lines on the rows counted once or left out (other kinds, copies)

    @property
    def keys(self) -> list:
        """The table's rows as tuples of by values, in order."""
        return [tuple(values) for values in self.rows.astype(object).to_numpy()]  # () per row without by keys

    @property
    def gain_columns(self) -> list:
        """The columns that get a gain: every vs value but the baseline."""
        return self.columns[1:] if self.vs else []

    def label(self, column) -> str:
        return show(column) if self.vs else self.metric

    def _position(self, key, column):
        keys = self.keys
        if tuple(key) not in keys or column not in self.columns:
            return None
        return keys.index(tuple(key)), self.columns.index(column)

    def cell(self, key, column) -> Stats:
        """The mean, std and n of a cell; None when it holds no run."""
        position = self._position(key, column)
        if position is None or position not in self.cells.index:
            return None
        mean, std, n = self.cells.loc[position, ["mean", "std", "n"]]
        return Stats(float(mean), float(std), int(n))

    def gain_test(self, key, column) -> GainTest:
        """The gain of a cell over the baseline with its interval and test; None for the baseline."""
        position = self._position(key, column)
        if position is None or position not in self.gains.index:
            return None
        values = self.gains.loc[position]
        test = None if pd.isna(values["test"]) else str(values["test"])
        return GainTest(*(float(values[name]) for name in ("gain", "low", "high", "t", "dof", "p")),
                        int(values["n"]), test)

    def gain(self, key, column):
        """mean(column) / mean(baseline) − 1 in percent, for the table row `key` (None if undefined)."""
        test = self.gain_test(key, column)
        return None if test is None or math.isnan(test.gain) else float(test.gain)

    def table(self) -> pd.DataFrame:
        """comparison.csv: the by values, then per column mean, std, n, then per gain column the
        gain % with its interval (CI low/high %), t, dof, one-sided p, n and test."""
        table = self.rows
        for position, column in enumerate(self.columns):
            stats = self.cells.xs(position, level=COLUMN).astype({"n": "Int64"})
            table = table.join(stats.add_prefix(f"{self.label(column)} "))
        for position, column in enumerate(self.gain_columns, start=1):
            gains = self.gains.xs(position, level=COLUMN).astype({"n": "Int64", "test": "string"})
            table = table.join(gains.rename(columns={name: f"{self.label(column)} {title}"
                                                     for name, title in GAIN_FIELDS.items()}))
        return table.reset_index(drop=True)


def status(frame: pd.DataFrame) -> pd.Series:
    """Each run's status; runs without one (hand-made tables) count as completed."""
    if "status" not in frame:
        return pd.Series("completed", index=frame.index, dtype="string")
    return frame["status"].astype("string").fillna("completed")


def compare(frame: pd.DataFrame, metric="top1", by=None, vs=None, baseline=None, kind=tables.TRAIN) -> Comparison:
    """Group the completed runs of `kind` of a load_results table (see the module docstring);
    by/vs default to the varying knobs."""
    chosen, others = load.select_kind(frame, kind)
    if "kind" in chosen:  # with --kind all, evaluations and training runs are told apart, never pooled
        chosen = chosen.assign(kind=load.kinds(chosen))
    notes = load.left_out_kinds(others, "--kind {} compares them")
    completed = status(chosen).eq("completed")
    runs, left_out = chosen[completed], chosen[~completed]
    if runs.empty:
        found = [f"only {left_out_summary(left_out)}"] if len(left_out) else []
        found += notes or ([] if found else ["the inputs hold no result rows"])
        raise UserError(f"no completed run to compare: {'; '.join(found)}")
    runs, copies = count_copies_once(runs)
    notes += copies
    _require_values(runs, metric, "--metric")
    for key in [*(by or []), *([vs] if vs else [])]:
        if key not in runs:  # blank cells are fine: a knob some runs lack
            missing_from = ", ".join(map(str, _sources(runs).unique()))
            raise UserError(f"column {key!r} (--by/--vs) is missing from {missing_from}")
    _require_numbers(runs, metric)
    varying = [key for key in KNOBS if key in runs and runs[key].nunique(dropna=False) > 1]
    if vs is None:
        vs = next((key for key in ("model", "ablation") if key in varying and key not in (by or [])), None)
    by = [key for key in by if key != vs] if by is not None else default_by(runs, varying, vs)
    if vs is None and baseline is not None:
        raise UserError("--baseline needs a --vs key: no knob varies to compare against")
    _refuse_mixed_setups(runs, [*by, *([vs] if vs else [])])

    measured = runs[runs[metric].notna()]
    rows = measured.groupby(by, dropna=False, sort=True).ngroup() if by else pd.Series(0, index=measured.index)
    if vs:
        codes, values = pd.factorize(measured[vs], sort=True, use_na_sentinel=False)
        values = values.tolist()
        baseline = pick_baseline(runs, vs, values, baseline)
        first = next(i for i, value in enumerate(values) if value is baseline)
        order = [first] + [i for i in range(len(values)) if i != first]
        columns = [values[i] for i in order]
        codes = np.argsort(order)[codes]  # sorted position → table position (baseline first)
    else:
        codes, columns = np.zeros(len(measured), dtype=int), [metric]
    positions = pd.DataFrame({ROW: rows, COLUMN: codes}, index=measured.index)
    work = measured.join(positions)

    cells = work.groupby([ROW, COLUMN])[metric].agg(mean="mean", std="std", n="count")
    table_rows = work.drop_duplicates(ROW).set_index(ROW).sort_index()[by]
    gains = _gains(work, metric, table_rows.index, len(columns) if vs else 1)
    runs = runs.join(positions.astype("Int64"))
    return Comparison(metric, by, vs, baseline if vs else None, columns, table_rows, cells, gains, runs, left_out,
                      notes)


def count_copies_once(runs) -> tuple:
    """(the runs with each config_hash once, the first; a line per config found more than once).

    The config hash covers the seeds, so equal hashes (of one kind) are one config and seed run twice."""
    if "config_hash" not in runs:  # older tables lack it: nothing to tell copies by
        return runs, []
    keys = [key for key in ("kind", "config_hash") if key in runs]
    hashed = runs["config_hash"].notna()
    repeats = hashed & runs.duplicated(keys)
    notes = []
    for (*_, value), copies in runs[hashed & (runs.duplicated(keys, keep=False))].groupby(keys, sort=False):
        where = [str(_first_of(row, "run_dir", SOURCE)) for row in _records(copies)]
        seed = f", seed {show(copies['seed'].iloc[0])}" if "seed" in copies else ""
        notes.append(f"counted once: {len(copies)} runs of one config (config_hash {value}{seed}): "
                     f"{where[0]} is counted, not {', '.join(where[1:])}")
    return runs[~repeats], notes


def _gains(work, metric, rows, ncolumns) -> pd.DataFrame:
    """The GainTest of every (row, column) position but the baseline's (column 0), by cell_gain."""
    cells = dict(iter(work.groupby([ROW, COLUMN])))
    none = work.iloc[:0]
    positions = [(row, column) for row in rows for column in range(1, ncolumns)]
    tests = [asdict(cell_gain(cells.get((row, column), none), cells.get((row, 0), none), metric))
             for row, column in positions]
    return pd.DataFrame(tests, index=pd.MultiIndex.from_tuples(positions, names=[ROW, COLUMN]),
                        columns=list(GAIN_FIELDS))


def _refuse_mixed_setups(runs, keys) -> None:
    """A cell must average repeats of one setup (runs with one setup_hash) and nothing else: runs
    that differ in a setting result.csv has no column for would otherwise be pooled silently."""
    if "setup_hash" not in runs:  # older tables lack it: nothing to check
        return
    hashed = runs[runs["setup_hash"].notna()]
    cell = hashed.groupby(keys, dropna=False).ngroup() if keys else pd.Series(0, index=hashed.index)
    setups = hashed["setup_hash"].groupby(cell).nunique()
    mixed = setups[setups > 1]
    if mixed.empty:
        return
    examples = hashed[cell == mixed.index[0]].drop_duplicates("setup_hash")
    shown = "; ".join(str(_first_of(row, "overrides", "run_dir")) for row in _records(examples.head(3)))
    values = ", ".join(show(value) for value in examples[keys].iloc[0]) if keys else ""
    raise UserError(f"the cell {values or '(all runs)'} would average {mixed.iloc[0]} "
                    f"different setups (differing in settings beyond the table's keys; e.g. {shown}): "
                    "compare them separately, or pass --by with the key that tells them apart")


def default_by(runs, varying, vs) -> list:
    """The varying knobs, less those that the vs key or an earlier kept knob already determine.

    E.g. local_up_to_layer follows the model (it tells the columns apart, not the rows) and
    scaled epochs follow the fraction: grouping by them would only split or repeat rows.
    """
    kept = []
    for key in varying:
        if key != vs and not _determined(runs, key, kept + ([vs] if vs else [])):
            kept.append(key)
    return kept


def _determined(runs, key, by) -> bool:
    """Whether every combination of the `by` values goes with one value of `key`."""
    if not by:
        return runs[key].nunique(dropna=False) <= 1
    return runs.groupby(by, dropna=False)[key].nunique(dropna=False).max() <= 1


def pick_baseline(runs, vs, columns, asked):
    """The asked value, else the column whose runs have no GPSA (local_up_to_layer 0), else the first."""
    if asked is not None:
        for column in columns:
            if str(column) == asked or _same_number(column, asked):
                return column
        raise UserError(f"--baseline {asked}: not a value of {vs} (values: {', '.join(map(show, columns))})")
    if "local_up_to_layer" in runs:
        no_gpsa = runs["local_up_to_layer"].eq(0).fillna(False).astype(bool)
        for column in columns:
            matches = runs[vs].isna() if pd.isna(column) else runs[vs].eq(column).fillna(False).astype(bool)
            if no_gpsa[matches].all():
                return column
    return columns[0]


def _same_number(value, text) -> bool:
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and float(text) == float(value)
    except ValueError:
        return False


def _sources(runs) -> pd.Series:
    return runs[SOURCE] if SOURCE in runs else pd.Series("the table", index=runs.index)


def _require_values(runs, column, option) -> None:
    """Stop unless every file has values of `column` in its completed runs."""
    sources = _sources(runs)
    if column in runs:
        blank = runs[column].isna().groupby(sources, sort=False).all()
        lacking = list(blank[blank].index)
    else:
        lacking = list(sources.unique())
    if lacking:
        raise UserError(f"column {column!r} ({option}) is missing from {', '.join(map(str, lacking))}")


def _require_numbers(runs, column) -> None:
    """Stop unless `column` holds numbers (a text or boolean column is named with a value that is not one)."""
    values = runs[column]
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return
    present = values.dropna()
    label = next((label for label, value in present.items() if not _is_number(value)), present.index[0])
    value = present[label].item() if isinstance(present[label], np.generic) else present[label]
    raise UserError(f"column {column!r} holds {value!r}, not a number, in {_sources(runs)[label]}")


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, (bool, np.bool_))


def _records(frame) -> list:
    """The rows of a frame as dicts, None for a blank."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _first_of(row, *keys):
    return next((row[key] for key in keys if row.get(key)), None)


def left_out_summary(frame) -> str:
    """E.g. "2 failed, 1 unfinished"."""
    counts = status(frame).value_counts().sort_index()
    return ", ".join(f"{n} {name}" for name, n in counts.items())


# ---------- the Markdown table ----------

def _cell_text(row, label) -> str:
    """E.g. "47.80 ± 1.00 (3)", from the `<label> mean/std/n` columns of a table row."""
    mean, std, n = (row[f"{label} {name}"] for name in ("mean", "std", "n"))
    if mean is None:
        return "–"
    return f"{mean:.2f} ± {'–' if std is None or math.isnan(std) else f'{std:.2f}'} ({n})"


def gain_text(test) -> str:
    """E.g. "+37.4% [+26.4, +51.9] p<0.001", "+23.1% [+12.6, +35.5] p=0.003†" (Welch),
    "+17.6%, n=1: no CI"; "–" without a gain."""
    if test is None or test.gain is None or math.isnan(test.gain):
        return "–"
    text = f"{test.gain:+.1f}%"
    if test.test is None:
        return f"{text}, n={test.n}: no CI"
    bounded = math.isfinite(test.low) and math.isfinite(test.high)
    interval = f"[{test.low:+.1f}, {test.high:+.1f}]" if bounded else "[unbounded]"
    p = "p<0.001" if test.p < 0.001 else f"p={test.p:.3f}"
    return f"{text} {interval} {p}" + ("†" if test.test == "Welch" else "")


def markdown_table(comparison) -> str:
    """The table in Markdown, rendered from comparison.table() (what comparison.csv holds), with a
    caption and the left-out runs."""
    c = comparison
    caption = f"{c.metric}: mean ± std over seeds (n)"
    if c.vs:
        base = show(c.baseline)
        caption += (f", columns by {c.vs}; gain = mean / mean({base}) − 1 [95% CI] and the one-sided p that "
                    f"it beats {base}, paired by seed († Welch: the cells do not share their seeds)")
    labels, gain_labels = [c.label(column) for column in c.columns], [c.label(g) for g in c.gain_columns]
    header = [*c.by, *labels, *(f"gain {label}" for label in gain_labels)]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in _records(c.table()):
        cells = [_cell_text(row, label) for label in labels]
        gains = [gain_text(GainTest(**{name: row[f"{label} {title}"] for name, title in GAIN_FIELDS.items()}))
                 for label in gain_labels]
        lines.append("| " + " | ".join([*(show(row[key]) for key in c.by), *cells, *gains]) + " |")
    left_out = c.left_out  # the runs the statistics leave out, and why
    if len(left_out):
        lines += ["", f"left out {len(left_out)} of {len(left_out) + len(c.runs)} runs: {left_out_summary(left_out)}"]
    for row, state in zip(_records(left_out), status(left_out)):
        where = _first_of(row, "run_dir", "run_id", SOURCE)
        detail = _first_of(row, "error", "overrides")
        lines.append(f"- {state}: {where}" + (f" ({detail})" if detail else ""))
    if c.notes:
        lines += ["", *c.notes]
    return "\n".join(lines) + "\n"


# ---------- the whole command ----------

def compare_results(inputs, metric="top1", by=None, vs=None, baseline=None, out=None, plots=True,
                    kind=tables.TRAIN, write_summary=False) -> str:
    """Compare the inputs, write comparison.csv/.md, locality_trends.csv (when runs kept a
    locality.csv) and the plots into `out`; return the report to print.

    `out` defaults to the first input's folder (the input itself when it is a directory); nothing
    else is written, unless `write_summary`: then each sweep directory's summary.csv too.
    """
    if out and os.path.lexists(out) and not Path(out).is_dir():  # before any work
        raise UserError(f"--out {out} is a file, not a folder: give a folder for comparison.csv, comparison.md "
                        "and the plots (it is created if missing)")
    comparison = compare(load.gather_results(*inputs), metric, by, vs, baseline, kind)
    first = Path(inputs[0])
    out = Path(out) if out else (first if first.is_dir() else first.parent)
    markdown = markdown_table(comparison)
    with _writable(f"into {out}", "choose a folder you can write to with --out"):
        tables.write_table(out / "comparison.csv", comparison.table())
        write_text(out / "comparison.md", markdown)
        notes = [f"wrote {out / 'comparison.csv'} and {out / 'comparison.md'}",
                 write_locality_trends(comparison, out / "locality_trends.csv")]
        if plots:
            notes += [plot(comparison, out) for plot in (plot_metric_vs_fraction, plot_metric_vs_locality,
                                                         plot_learning_curves, plot_nonlocality, plot_gates)]
    if write_summary:
        for sweep in [Path(p) for p in inputs if Path(p).is_dir() and not RunFolder(p).result.is_file()
                      and job_dirs(p)]:
            with _writable(f"the summary of {sweep}", "compare without --write-summary"):
                notes.append(f"wrote {gather_sweep(sweep)}")
    return markdown + "\n" + "\n".join(notes)


@contextlib.contextmanager
def _writable(what, way_out):
    """A write refused inside the block (a read-only folder, no permission) as one line with the
    way out; a full disk is already one (core.files.DiskFull)."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write {what} ({exc.strerror or exc}): {way_out}") from None
