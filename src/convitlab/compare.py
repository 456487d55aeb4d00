"""Comparison tables and plots across runs and sweeps.

Rows are grouped by the knobs that vary (never the seed); each group gets the mean ± sample
std over its seeds and n. With a `vs` key the groups become a pivot, one column per value,
plus the relative gain of each column over a baseline: mean / mean_baseline − 1, in percent
(the paper's Table 2: ConViT-S 47.8 vs DeiT-S 34.8 at 5% of the data → +37%).
"""
import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from convitlab import results
from convitlab.atomic import atomic_path, write_text
from convitlab.errors import UserError
from convitlab.sweeps import gather_sweep

# The knobs a table may group by, in the order it shows them; never the seed.
KNOBS = ["ablation", "model", "dataset", "fraction", "subset", "locality_strength", "local_up_to_layer",
         "use_local_init", "train_gating", "train_gpsa", "embed_dim", "num_heads", "depth", "img_size",
         "patch_size", "lr", "optimizer", "weight_decay", "drop_path_rate", "label_smoothing", "mixup", "cutmix",
         "ema", "batch_size", "epochs", "study"]
SOURCE = "_source"  # key added to every loaded row: the file it came from
METRIC_LABELS = {"top1": "top-1 accuracy (%)", "best_top1": "best top-1 accuracy (%)", "top5": "top-5 accuracy (%)"}


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
    columns: list  # the vs values, baseline first ([None] without vs)
    cells: dict  # tuple of by values → {vs value: Stats}
    completed: list  # the rows the statistics use
    left_out: list  # the rows that did not complete

    @property
    def gain_columns(self) -> list:
        """The columns that get a gain: every vs value but the baseline."""
        return [column for column in self.columns if self.vs and column != self.baseline]

    def gain(self, key, column):
        """mean(column) / mean(baseline) − 1 in percent, for the table row `key` (None if undefined)."""
        cells = self.cells[key]
        if self.vs is None or column == self.baseline or column not in cells or self.baseline not in cells:
            return None
        base = cells[self.baseline].mean
        return 100.0 * (cells[column].mean / base - 1.0) if base else None


def result_table(path) -> Path:
    """The CSV an input stands for: a run directory's result.csv, a sweep's (freshly gathered) summary.csv."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        return path / "result.csv" if (path / "result.csv").is_file() else gather_sweep(path)
    return path


def load_results(inputs) -> list:
    """The rows of every input, each with SOURCE naming its file."""
    rows = []
    for table in map(result_table, inputs):
        try:
            loaded = results.read_rows(table)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"{table}: not a readable CSV ({exc})") from None
        rows += [{**row, SOURCE: str(table)} for row in loaded]
    return rows


def status(row) -> str:
    """A row's status; rows without one (hand-made tables) count as completed."""
    return row.get("status") or "completed"


def compare(rows, metric="top1", by=None, vs=None, baseline=None) -> Comparison:
    """Group the completed rows (see the module docstring); by/vs default to the varying knobs."""
    completed = [row for row in rows if status(row) == "completed"]
    left_out = [row for row in rows if status(row) != "completed"]
    if not completed:
        found = f"only {left_out_summary(left_out)}" if left_out else "the inputs hold no result rows"
        raise UserError(f"no completed run to compare: {found}")
    _require_values(completed, metric, "--metric")
    for key in [*(by or []), *([vs] if vs else [])]:
        _require_column(completed, key)
    varying = [key for key in KNOBS if len({row.get(key) for row in completed}) > 1]
    if vs is None:
        vs = next((key for key in ("model", "ablation") if key in varying and key not in (by or [])), None)
    by = [key for key in by if key != vs] if by is not None else default_by(completed, varying, vs)

    groups = {}
    for row in completed:
        value = _number(row, metric)
        if value is not None:
            key = tuple(row.get(k) for k in by)
            groups.setdefault(key, {}).setdefault(row.get(vs) if vs else None, []).append(value)
    _refuse_mixed_setups(completed, by, vs)
    cells = {key: {column: _stats(values) for column, values in per_column.items()}
             for key, per_column in sorted(groups.items(), key=lambda item: tuple(map(_order, item[0])))}
    columns = sorted({column for per_column in cells.values() for column in per_column}, key=_order)
    if vs is None:
        if baseline is not None:
            raise UserError("--baseline needs a --vs key: no knob varies to compare against")
    else:
        baseline = pick_baseline(completed, vs, columns, baseline)
        columns = [baseline] + [c for c in columns if c != baseline]
    return Comparison(metric, by, vs, baseline, columns, cells, completed, left_out)


def _refuse_mixed_setups(rows, by, vs) -> None:
    """A cell must average repeats of one setup (rows with one setup_hash) and nothing else: runs
    that differ in a setting result.csv has no column for would otherwise be pooled silently."""
    setups = {}
    for row in rows:
        if row.get("setup_hash"):  # older tables lack it: nothing to check
            cell = tuple(row.get(k) for k in by) + ((row.get(vs),) if vs else ())
            setups.setdefault(cell, {}).setdefault(row["setup_hash"], row)
    for cell, examples in setups.items():
        if len(examples) > 1:
            shown = "; ".join(f"{row.get('overrides') or row.get('run_dir')}" for row in list(examples.values())[:3])
            raise UserError(f"the cell {', '.join(map(_show, cell)) or '(all runs)'} would average {len(examples)} "
                            f"different setups (differing in settings beyond the table's keys; e.g. {shown}): "
                            "compare them separately, or pass --by with the key that tells them apart")


def default_by(rows, varying, vs) -> list:
    """The varying knobs, less those that the vs key or an earlier kept knob already determine.

    E.g. local_up_to_layer follows the model (it tells the columns apart, not the rows) and
    scaled epochs follow the fraction: grouping by them would only split or repeat rows.
    """
    kept = []
    for key in varying:
        if key != vs and not _determined(rows, key, kept + ([vs] if vs else [])):
            kept.append(key)
    return kept


def _determined(rows, key, by) -> bool:
    """Whether every combination of the `by` values goes with one value of `key`."""
    seen = {}
    return all(seen.setdefault(tuple(row.get(k) for k in by), row.get(key)) == row.get(key) for row in rows)


def pick_baseline(rows, vs, columns, asked):
    """The asked value, else the column whose runs have no GPSA (local_up_to_layer 0), else the first."""
    if asked is not None:
        for column in columns:
            if str(column) == asked or _same_number(column, asked):
                return column
        raise UserError(f"--baseline {asked}: not a value of {vs} (values: {', '.join(map(_show, columns))})")
    no_gpsa = [column for column in columns
               if all(row.get("local_up_to_layer") == 0 for row in rows if row.get(vs) == column)]
    return (no_gpsa or columns)[0]


def _same_number(value, text) -> bool:
    try:
        return isinstance(value, (int, float)) and float(text) == float(value)
    except ValueError:
        return False


def _stats(values) -> Stats:
    return Stats(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values))


def _number(row, column):
    value = row.get(column)
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise UserError(f"column {column!r} holds {value!r}, not a number, in {row[SOURCE]}")


def _require_values(rows, column, option) -> None:
    """Stop unless every file has values of `column` in its completed rows."""
    _stop_if_lacking(rows, column, option, lambda file_rows: all(row.get(column) is None for row in file_rows))


def _require_column(rows, column) -> None:
    """Stop unless every file has `column` (blank cells are fine: a knob some runs lack)."""
    _stop_if_lacking(rows, column, "--by/--vs", lambda file_rows: column not in file_rows[0])


def _stop_if_lacking(rows, column, option, lacks) -> None:
    per_file = {}
    for row in rows:
        per_file.setdefault(row[SOURCE], []).append(row)
    lacking = [file for file, file_rows in per_file.items() if lacks(file_rows)]
    if lacking:
        raise UserError(f"column {column!r} ({option}) is missing from {', '.join(lacking)}")


def _order(value):
    """Sort key for mixed cells: numbers by value, then text, then blanks."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, 0.0, "")
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _show(value) -> str:
    if value is None:
        return "–"
    return f"{value:g}" if isinstance(value, float) else str(value)


def left_out_summary(rows) -> str:
    """E.g. "2 failed, 1 unfinished"."""
    counts = {}
    for row in rows:
        counts[status(row)] = counts.get(status(row), 0) + 1
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))


def left_out_report(comparison) -> list:
    """Lines saying which runs the statistics leave out and why."""
    rows = comparison.left_out
    if not rows:
        return []
    total = len(rows) + len(comparison.completed)
    lines = [f"left out {len(rows)} of {total} runs: {left_out_summary(rows)}"]
    for row in rows:
        where = row.get("run_dir") or row.get("run_id") or row[SOURCE]
        detail = row.get("error") or row.get("overrides")
        lines.append(f"- {status(row)}: {where}" + (f" ({detail})" if detail else ""))
    return lines


# ---------- the table ----------

def _label(comparison, column) -> str:
    return _show(column) if comparison.vs else comparison.metric


def csv_table(comparison):
    """(columns, rows) of comparison.csv: by values, then per column mean, std, n and gain %."""
    header = list(comparison.by)
    for column in comparison.columns:
        label = _label(comparison, column)
        header += [f"{label} mean", f"{label} std", f"{label} n"]
    header += [f"{_label(comparison, c)} gain %" for c in comparison.gain_columns]
    rows = []
    for key, cells in comparison.cells.items():
        row = dict(zip(comparison.by, key))
        for column in comparison.columns:
            label, stats = _label(comparison, column), cells.get(column)
            if stats is not None:
                std = None if math.isnan(stats.std) else stats.std
                row.update({f"{label} mean": stats.mean, f"{label} std": std, f"{label} n": stats.n})
        row.update({f"{_label(comparison, c)} gain %": comparison.gain(key, c) for c in comparison.gain_columns})
        rows.append(row)
    return header, rows


def markdown_table(comparison) -> str:
    """The table in Markdown, with a caption and the left-out runs."""
    c = comparison
    caption = f"{c.metric}: mean ± std over seeds (n)"
    if c.vs:
        caption += f", columns by {c.vs}; gain = mean / mean({_show(c.baseline)}) − 1"
    header = [*c.by, *(_label(c, column) for column in c.columns), *(f"gain {_show(g)}" for g in c.gain_columns)]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, cells in c.cells.items():
        cells_text = [_cell(cells.get(column)) for column in c.columns]
        gains = [c.gain(key, column) for column in c.gain_columns]
        gains_text = ["–" if g is None else f"{g:+.1f}%" for g in gains]
        lines.append("| " + " | ".join([*map(_show, key), *cells_text, *gains_text]) + " |")
    report = left_out_report(c)
    return "\n".join(lines + ([""] + report if report else [])) + "\n"


def _cell(stats) -> str:
    if stats is None:
        return "–"
    std = "–" if math.isnan(stats.std) else f"{stats.std:.2f}"
    return f"{stats.mean:.2f} ± {std} ({stats.n})"


# ---------- the plots ----------

def _figure(ncols=1, width=6.4, height=4.4, sharey=False):
    """A figure with one row of `ncols` axes, drawn by Agg (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False, sharey=sharey)[0]


def _save(fig, path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return f"wrote {path}"


def _varies(rows, key) -> bool:
    return len({row.get(key) for row in rows if row.get(key) is not None}) > 1


def line_plot(comparison, x, line_keys, path, xscale):
    """Metric (mean ± std over seeds) against knob `x`, one line per combination of `line_keys`."""
    c = comparison
    if not _varies(c.completed, x):
        return f"skipped {path.name}: {x} does not vary"
    lines = {}
    for row in c.completed:
        value = _number(row, c.metric)
        if value is not None and row.get(x) is not None:
            line = tuple(row.get(k) for k in line_keys)
            lines.setdefault(line, {}).setdefault(row[x], []).append(value)
    fig, (ax,) = _figure()
    for line in sorted(lines, key=lambda key: tuple(map(_order, key))):
        points = sorted(((xv, _stats(values)) for xv, values in lines[line].items()), key=lambda p: _order(p[0]))
        label = ", ".join(f"{k}={_show(v)}" for k, v in zip(line_keys, line)) or c.metric
        ax.errorbar([p[0] for p in points], [p[1].mean for p in points], yerr=[p[1].std for p in points],
                    marker="o", capsize=3, label=label)
    if xscale == "symlog":
        positive = [row[x] for row in c.completed if isinstance(row.get(x), (int, float)) and row[x] > 0]
        ax.set_xscale("symlog", linthresh=min(positive, default=1.0))
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


def run_path(row):
    """The run directory of a row: where it says, else beside the table it came from."""
    source = Path(row[SOURCE])
    candidates = [source.parent] if source.name == "result.csv" else []
    if row.get("run_dir"):
        candidates = [Path(row["run_dir"]), source.parent / Path(row["run_dir"]).name, *candidates]
    return next((path for path in candidates if (path / "locality.csv").is_file()), None)


def locality_panels(comparison):
    """(title, {vs value: [locality rows of each run]}) for one table row with locality.csv files:
    the first whose runs have GPSA layers (the plots are about them), else the first of all."""
    c = comparison
    found = []
    for key in c.cells:
        panels = {}
        for row in c.completed:
            path = run_path(row) if tuple(row.get(k) for k in c.by) == key else None
            rows = _read_locality(path) if path is not None else None
            if rows:
                panels.setdefault(row.get(c.vs) if c.vs else None, []).append(rows)
        if panels:
            title = ", ".join(f"{k}={_show(v)}" for k, v in zip(c.by, key))
            found.append((title, {column: panels[column] for column in c.columns if column in panels}))
            if any(_finite(r["gate"]) for runs in panels.values() for rows in runs for r in rows):
                return found[-1]
    return found[0] if found else (None, {})


def _read_locality(run_dir):
    """The rows of run_dir/locality.csv, or None when unreadable or lacking the columns plotted."""
    try:
        rows = results.read_rows(run_dir / "locality.csv")
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    needed = ("epoch", "layer", "head", "nonlocality", "gate")
    return rows if rows and all(key in rows[0] for key in needed) else None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _mean_by(runs, key_of, value_of) -> dict:
    """Average value_of(row) per key_of(row) within each run, then over runs (non-finite values skipped)."""
    per_run = []
    for rows in runs:
        sums = {}
        for row in rows:
            value = value_of(row)
            if _finite(value):
                sums.setdefault(key_of(row), []).append(value)
        per_run.append({key: statistics.fmean(values) for key, values in sums.items()})
    keys = {key for means in per_run for key in means}
    return {key: statistics.fmean([m[key] for m in per_run if key in m]) for key in keys}


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
    for ax, (column, runs) in zip(axes, panels.items()):
        means = _mean_by(runs, lambda r: (r["layer"], r["epoch"]), lambda r: r["nonlocality"])
        gpsa = {row["layer"] for rows in runs for row in rows if _finite(row["gate"])}  # MHSA layers: NaN
        layers = sorted({layer for layer, _ in means})
        for layer in layers:
            epochs = sorted(e for lay, e in means if lay == layer)
            kind = "GPSA" if layer in gpsa else "MHSA"
            ax.plot(epochs, [means[(layer, e)] for e in epochs], "-" if layer in gpsa else "--", marker=".",
                    color=colormaps["viridis"](layer / max(len(layers) - 1, 1)), label=f"layer {layer} ({kind})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("nonlocality (mean attention distance, patches)")
        ax.set_title(_panel_title(comparison, column, group))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def _at_last_epoch(rows) -> list:
    last = max(row["epoch"] for row in rows)
    return [row for row in rows if row["epoch"] == last]


def plot_gates(comparison, out):
    """σ(λ) per GPSA layer and head at each run's last epoch (averaged over runs), as heatmaps."""
    path = Path(out) / "gates.png"
    group, panels = locality_panels(comparison)
    maps = {}
    for column, runs in panels.items():
        last = [_at_last_epoch(rows) for rows in runs]
        gates = _mean_by(last, lambda r: (r["layer"], r["head"]), lambda r: r["gate"])
        if gates:
            maps[column] = gates
    if not maps:
        return f"skipped {path.name}: no GPSA gate in any locality.csv"
    fig, axes = _figure(len(maps), width=5.0)
    for ax, (column, gates) in zip(axes, maps.items()):
        layers, heads = sorted({k[0] for k in gates}), sorted({k[1] for k in gates})
        grid = [[gates.get((layer, head), math.nan) for head in heads] for layer in layers]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, values in enumerate(grid):
            for j, value in enumerate(values):
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


PLOTS = (plot_metric_vs_fraction, plot_metric_vs_locality, plot_nonlocality, plot_gates)


# ---------- the whole command ----------

def compare_results(inputs, metric="top1", by=None, vs=None, baseline=None, out=None, plots=True) -> str:
    """Compare the inputs, write comparison.csv/.md (and plots) into `out`; return the report to print.

    `out` defaults to the first input's folder (the input itself when it is a directory).
    """
    comparison = compare(load_results(inputs), metric, by, vs, baseline)
    first = Path(inputs[0])
    out = Path(out) if out else (first if first.is_dir() else first.parent)
    markdown = markdown_table(comparison)
    header, rows = csv_table(comparison)
    results.write_rows(out / "comparison.csv", rows, header)
    write_text(out / "comparison.md", markdown)
    notes = [f"wrote {out / 'comparison.csv'} and {out / 'comparison.md'}"]
    if plots:
        notes += [plot(comparison, out) for plot in PLOTS]
    return markdown + "\n" + "\n".join(notes)
