"""Comparison tables and plots across runs and sweeps, built on the DataFrames of convitlab.results.tables.

Training runs are compared (evaluation rows, kind "eval", only when asked, and never with them).
Each run counts once: a run named twice by the inputs is one row (load.load_results), and a
config found in several directories (the same config and seed trained twice: two sweeps started
on one folder, a copied sweep) is counted once, the first, with a line naming the others. Its
copies are not other seeds, and averaging them would shrink the spread and unpair the test.

Completed runs are grouped by the knobs that vary (never the seed); each cell gets the mean, the
sample std and n of the metric over its runs. With a `vs` key the cells become a pivot, one column
per value, and every column but the baseline gets its gain over the baseline, mean / mean_baseline
− 1 in percent (the paper's Table 2: ConViT-S 47.8 vs DeiT-S 34.8 at 5% of the data → +37%), with

- a 95% confidence interval by Fieller's theorem: the ratios ρ for which the t statistic of
  mean(column) − ρ·mean(baseline) stays within the t quantile. It is exact for a ratio of normal
  means (the delta method is a first-order approximation, coarse at 3 seeds), and it is the set
  of ratios the t-test does not reject, so a paired interval excludes 0% exactly when the
  one-sided test below is significant at 2.5%;
- the one-sided p-value of a t-test that the column's mean beats the baseline's.

Both are paired (a paired t-test, n − 1 degrees of freedom) when the two cells hold the same seeds
(and data.subset_seed, where a table records it), once each: such runs share their data subset and
initial draws, and pairing takes that shared variation out. Otherwise they are Welch's (unequal
variances, Satterthwaite's degrees of freedom; for the interval at the estimated ratio). Not a
bootstrap: 3 seeds give 10 distinct resamples, and its intervals are too narrow at such n.
Fewer than 2 runs (or pairs) in a cell: no interval and no test.

Accuracies are not negative, so neither is the ratio: the interval is Fieller's set of ratios
cut at 0, and a gain's lower bound is never below −100%.
"""
import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from convitlab.results import load

from convitlab.core import tables
from convitlab.core.files import atomic_path, write_text
from convitlab.core.errors import UserError
from convitlab.core.tables import SOURCE
from convitlab.core.layout import LOCALITY, RunFolder
from convitlab.results.sweeps import gather_sweep, job_dirs

# The knobs a table may group by, in the order it shows them; never the seed.
KNOBS = ["kind", "ablation", "model", "dataset", "fraction", "subset", "locality_strength", "local_up_to_layer",
         "use_local_init", "train_gating", "train_gpsa", "embed_dim", "num_heads", "depth", "img_size",
         "patch_size", "lr", "optimizer", "weight_decay", "drop_path_rate", "label_smoothing", "mixup", "cutmix",
         "ema", "batch_size", "epochs", "study"]
PAIR_KEYS = ("seed", "subset_seed")  # runs in two cells with equal values of these are paired
CONFIDENCE = 0.95
METRIC_LABELS = {"top1": "top-1 accuracy (%)", "best_top1": "best top-1 accuracy (%)", "top5": "top-5 accuracy (%)"}
# Working columns of Comparison.runs: the table row and column (positions) each run falls in.
ROW, COLUMN = "_row", "_column"
# The gain statistics and their names in comparison.csv (after "<column label> ").
GAIN_FIELDS = {"gain": "gain %", "low": "gain CI low %", "high": "gain CI high %", "t": "gain t", "dof": "gain dof",
               "p": "gain p", "n": "gain n", "test": "gain test"}


# ---------- how sure a gain is ----------

def fieller_interval(mean_a, mean_b, var_a, var_b, cov_ab, t) -> tuple:
    """The ratios ρ ≥ 0 with (mean_a − ρ·mean_b)² ≤ t²·(var_a − 2ρ·cov_ab + ρ²·var_b), where
    var_a, var_b, cov_ab are the (co)variances of the two means: Fieller's interval for
    mean_a / mean_b, a ratio of accuracies (never negative). (0, inf) when mean_b is not clear of
    0 at this t (the set is then unbounded)."""
    q = t * t
    a = mean_b * mean_b - q * var_b
    b = mean_a * mean_b - q * cov_ab
    c = mean_a * mean_a - q * var_a
    if a <= 0.0:
        return 0.0, math.inf
    root = math.sqrt(max(b * b - a * c, 0.0))
    return max((b - root) / a, 0.0), max((b + root) / a, 0.0)


def welch_dof(var_a, var_b, n_a, n_b) -> float:
    """Satterthwaite's degrees of freedom of var_a + var_b (variances of two means of n_a, n_b runs)."""
    denominator = var_a * var_a / (n_a - 1) + var_b * var_b / (n_b - 1)
    return (var_a + var_b) ** 2 / denominator if denominator > 0 else math.inf


def _t_statistic(difference, standard_error) -> float:
    if standard_error > 0:
        return difference / standard_error
    return math.copysign(math.inf, difference) if difference else 0.0


@dataclass(frozen=True)
class GainTest:
    """A column's gain over the baseline in percent, its 95% interval, and the one-sided t-test."""
    gain: float  # 100 · (mean / mean_baseline − 1)
    low: float   # the interval's bounds, in percent like the gain (NaN without a test)
    high: float
    t: float     # the test's statistic and degrees of freedom
    dof: float
    p: float     # one-sided: P(T ≥ t) if the column were no better than the baseline
    n: int       # the pairs (paired) or the smaller cell's runs (Welch)
    test: str    # "paired" or "Welch"; None when n < 2 (no interval, no test)


def gain_test(values, baseline, paired: bool) -> GainTest:
    """The gain of `values` (a cell's metric) over `baseline`; paired: the two are aligned by seed."""
    a, b = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return GainTest(math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, 0, None)
    mean_a, mean_b = float(a.mean()), float(b.mean())
    gain = 100.0 * (mean_a / mean_b - 1.0) if mean_b else math.nan
    n = len(a) if paired else min(len(a), len(b))
    if n < 2 or math.isnan(gain):
        return GainTest(gain, math.nan, math.nan, math.nan, math.nan, math.nan, n, None)
    if paired:
        differences = a - b
        t = _t_statistic(float(differences.mean()), float(differences.std(ddof=1)) / math.sqrt(n))
        dof = ci_dof = n - 1.0
        covariance = np.cov(a, b, ddof=1) / n
        var_a, var_b, cov_ab = covariance[0, 0], covariance[1, 1], covariance[0, 1]
    else:
        var_a, var_b, cov_ab = float(a.var(ddof=1)) / len(a), float(b.var(ddof=1)) / len(b), 0.0
        t = _t_statistic(mean_a - mean_b, math.sqrt(var_a + var_b))
        dof = welch_dof(var_a, var_b, len(a), len(b))
        ci_dof = welch_dof(var_a, (mean_a / mean_b) ** 2 * var_b, len(a), len(b))
    quantile = float(stats.t.ppf((1.0 + CONFIDENCE) / 2.0, ci_dof)) if math.isfinite(ci_dof) else 0.0  # inf: no spread
    low, high = fieller_interval(mean_a, mean_b, var_a, var_b, cov_ab, quantile)
    return GainTest(gain, 100.0 * (low - 1.0), 100.0 * (high - 1.0), t, dof, float(stats.t.sf(t, dof)), n,
                    "paired" if paired else "Welch")


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
        return _show(column) if self.vs else self.metric

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
        seed = f", seed {_show(copies['seed'].iloc[0])}" if "seed" in copies else ""
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
    values = ", ".join(_show(value) for value in examples[keys].iloc[0]) if keys else ""
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
        raise UserError(f"--baseline {asked}: not a value of {vs} (values: {', '.join(map(_show, columns))})")
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


def _show(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:g}" if isinstance(value, float) else str(value)


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
        base = _show(c.baseline)
        caption += (f", columns by {c.vs}; gain = mean / mean({base}) − 1 [95% CI] and the one-sided p that "
                    f"it beats {base}, paired by seed († Welch: the cells do not share their seeds)")
    labels, gain_labels = [c.label(column) for column in c.columns], [c.label(g) for g in c.gain_columns]
    header = [*c.by, *labels, *(f"gain {label}" for label in gain_labels)]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in _records(c.table()):
        cells = [_cell_text(row, label) for label in labels]
        gains = [gain_text(GainTest(**{name: row[f"{label} {title}"] for name, title in GAIN_FIELDS.items()}))
                 for label in gain_labels]
        lines.append("| " + " | ".join([*(_show(row[key]) for key in c.by), *cells, *gains]) + " |")
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


# ---------- the plots ----------

def _figure(ncols=1, width=6.4, height=4.4, sharey=False):
    """A figure with one row of `ncols` axes, drawn by Agg (no display, no pyplot state)."""
    # matplotlib only where a plot is drawn: --no-plots and the tables start without its import
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False, sharey=sharey)[0]


def _save(fig, path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return f"wrote {path}"


def _floats(series) -> np.ndarray:
    return series.astype("float64").to_numpy()


def line_plot(comparison, x, line_keys, path, xscale):
    """Metric (mean ± std over seeds) against knob `x`, one line per combination of `line_keys`."""
    c = comparison
    if x not in c.runs or c.runs[x].nunique() < 2:
        return f"skipped {path.name}: {x} does not vary"
    line_keys = [key for key in line_keys if key in c.runs]
    data = c.runs[c.runs[x].notna() & c.runs[c.metric].notna()]
    points = data.groupby([*line_keys, x], dropna=False, sort=True)[c.metric].agg(["mean", "std"]).reset_index()
    fig, (ax,) = _figure()
    for line, part in (points.groupby(line_keys, dropna=False, sort=True) if line_keys else [((), points)]):
        label = ", ".join(f"{k}={_show(v)}" for k, v in zip(line_keys, line)) or c.metric
        ax.errorbar(_floats(part[x]), _floats(part["mean"]), yerr=_floats(part["std"]), marker="o", capsize=3,
                    label=label)
    if xscale == "symlog":
        positive = data[x][data[x] > 0]
        ax.set_xscale("symlog", linthresh=float(positive.min()) if len(positive) else 1.0)
    else:
        ax.set_xscale(xscale)
    ax.set_xlabel(x)
    ax.set_ylabel(METRIC_LABELS.get(c.metric, c.metric))
    ax.set_title(f"{c.metric} vs {x} (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_metric_vs_fraction(comparison, out):
    c = comparison
    line_keys = [k for k in dict.fromkeys([*([c.vs] if c.vs else []), *c.by]) if k != "fraction"]
    return line_plot(c, "fraction", line_keys, Path(out) / f"{c.metric}_vs_fraction.png", "log")


def plot_metric_vs_locality(comparison, out):
    c = comparison
    others = [k for k in [*([c.vs] if c.vs else []), *c.by] if k not in ("locality_strength", "local_up_to_layer")]
    line_keys = list(dict.fromkeys(["local_up_to_layer", *others]))
    return line_plot(c, "locality_strength", line_keys, Path(out) / f"{c.metric}_vs_locality.png", "symlog")


def locality_panels(comparison):
    """(title, {column: locality rows of its runs}) for one table row whose runs have locality.csv
    files: the first whose runs have GPSA layers (the plots are about them), else the first of all.
    The rows are indexed by run (see load.run_curves)."""
    c = comparison
    curves = load.run_curves(c.runs[c.runs[ROW].notna()], LOCALITY, columns=[ROW, COLUMN])
    if curves.empty or any(key not in curves for key in ("epoch", "layer", "head", "nonlocality", "gate")):
        return None, {}
    curves = curves.dropna(subset=["epoch", "layer", "head"])
    with_gates = np.isfinite(_floats(curves["gate"]))
    rows = sorted(curves[ROW].unique())
    gated = sorted(curves.loc[with_gates, ROW].unique())
    row = int((gated or rows)[0])
    title = ", ".join(f"{k}={_show(v)}" for k, v in zip(c.by, c.keys[row]))
    mine = curves[curves[ROW] == row]
    return title, {c.columns[int(column)]: part for column, part in mine.groupby(COLUMN, sort=True)}


def _run_means(part, value, keys) -> pd.Series:
    """`value` averaged over each run's rows per `keys`, then over runs (non-finite values skipped)."""
    frame = part.reset_index().assign(**{value: part[value].where(np.isfinite(_floats(part[value]))).to_numpy()})
    return frame.groupby(["run", *keys])[value].mean().groupby(level=keys).mean().dropna()


def _panel_title(comparison, column, group) -> str:
    parts = [f"{comparison.vs}={_show(column)}"] if comparison.vs else []
    return ", ".join(parts + ([group] if group else [])) or "all runs"


def plot_nonlocality(comparison, out):
    """Mean nonlocality per layer over epochs; one panel per vs value, dashed lines for MHSA layers."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    path = Path(out) / "nonlocality.png"
    group, panels = locality_panels(comparison)
    if not panels:
        return f"skipped {path.name}: no run has a locality.csv"
    fig, axes = _figure(len(panels), sharey=True)
    for ax, (column, part) in zip(axes, panels.items()):
        means = _run_means(part, "nonlocality", ["layer", "epoch"])
        gpsa = set(part.loc[np.isfinite(_floats(part["gate"])), "layer"])  # MHSA layers: NaN
        layers = sorted(means.index.get_level_values("layer").unique())
        for layer in layers:
            curve = means.xs(layer, level="layer")
            kind = "GPSA" if layer in gpsa else "MHSA"
            ax.plot(_floats(curve.index.to_series()), curve.to_numpy(), "-" if layer in gpsa else "--", marker=".",
                    color=colormaps["viridis"](layer / max(len(layers) - 1, 1)), label=f"layer {layer} ({kind})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("nonlocality (mean attention distance, patches)")
        ax.set_title(_panel_title(comparison, column, group))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_gates(comparison, out):
    """σ(λ) per GPSA layer and head at each run's last epoch (averaged over runs), as heatmaps."""
    path = Path(out) / "gates.png"
    group, panels = locality_panels(comparison)
    maps = {}
    for column, part in panels.items():
        last = part[part["epoch"] == part.groupby(level="run")["epoch"].transform("max")]
        gates = _run_means(last, "gate", ["layer", "head"])
        if len(gates):
            maps[column] = gates.unstack("head")  # layers × heads, NaN where a head has no gate
    if not maps:
        return f"skipped {path.name}: no GPSA gate in any locality.csv"
    fig, axes = _figure(len(maps), width=5.0)
    for ax, (column, grid) in zip(axes, maps.items()):
        layers, heads = list(grid.index), list(grid.columns)
        values = grid.to_numpy(dtype=float)
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.5 else "black")
        ax.set_xticks(range(len(heads)), [str(h) for h in heads])
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xticks([j - 0.5 for j in range(1, len(heads))], minor=True)
        ax.set_yticks([i - 0.5 for i in range(1, len(layers))], minor=True)
        ax.grid(True, which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"σ(λ) at the last epoch\n{_panel_title(comparison, column, group)}")
        fig.colorbar(image, ax=ax, label="σ(λ): 1 positional, 0 content")
    return _save(fig, path)


# ---------- the whole command ----------

def compare_results(inputs, metric="top1", by=None, vs=None, baseline=None, out=None, plots=True,
                    kind=tables.TRAIN, write_summary=False) -> str:
    """Compare the inputs, write comparison.csv/.md (and plots) into `out`; return the report to print.

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
        notes = [f"wrote {out / 'comparison.csv'} and {out / 'comparison.md'}"]
        if plots:
            notes += [plot(comparison, out) for plot in (plot_metric_vs_fraction, plot_metric_vs_locality,
                                                         plot_nonlocality, plot_gates)]
    if write_summary:
        for sweep in [Path(p) for p in inputs if Path(p).is_dir() and not RunFolder(p).result.is_file()
                      and job_dirs(p)]:
            with _writable(f"the summary of {sweep}", "compare without --write-summary"):
                notes.append(f"wrote {gather_sweep(sweep)}")
    return markdown + "\n" + "\n".join(notes)


@contextlib.contextmanager
def _writable(what, way_out):
    """A write refused inside the block (a read-only folder, no permission) as one line with the
    way out; a full disk is already one (atomic.DiskFull)."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write {what} ({exc.strerror or exc}): {way_out}") from None
