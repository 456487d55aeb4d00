"""The figures compare_results writes beside comparison.csv: the metric against the data fraction
and against the locality strength, the learning curves (val top-1 over epochs), and, for every
table cell whose runs kept a locality.csv, nonlocality per layer and the GPSA gates over epochs.

Epochs on every x axis are full-data epochs, as the configuration counts them (schedule.epochs):
a pass over a subset of fraction f is f of one (engine.protocol), unless the run counted passes
(schedule.scale_epochs=false). Error bars and the learning curves' bands are the 95% t-interval of
the mean over seeds, cut to the values the metric can take (0-100 for accuracies), never mean ± std,
which can cross them; gates.png's band is the heads' range (their min and max, each averaged over
seeds). nonlocality.png and gates.png are drawn from curves.locality_trends, the rows of
locality_trends.csv.

Each plot_* function takes a Comparison and the output folder and returns one line for the report:
"wrote <path>", or "skipped <name>: <why>" when the runs have nothing to draw. What a figure shows
comes from a *_data function (a DataFrame per panel), so it can be checked without the picture.
Figures are drawn by Agg into files (no display, no pyplot state); matplotlib is imported only
where a figure is drawn, so the tables and --no-plots run without it.
"""
import math
from pathlib import Path

import numpy as np
import pandas as pd

from convitlab.core.files import atomic_path
from convitlab.core.layout import METRICS
from convitlab.results.cells import COLUMN, ROW, floats, show
from convitlab.results.curves import comparison_curves, locality_trends
from convitlab.results.stats import mean_interval

METRIC_LABELS = {"top1": "top-1 accuracy (%)", "best_top1": "best top-1 accuracy (%)", "top5": "top-5 accuracy (%)"}
PERCENT = (0.0, 100.0)  # what an accuracy in percent can be
INTERVAL = "mean and 95% t-interval over seeds, cut to 0-100"
PANEL_COLUMNS = 3  # panels per figure row: a grid grows downwards, each panel stays readable


def bounds_of(metric) -> tuple:
    """The values `metric` can take: 0-100 for the accuracies, else unbounded."""
    return PERCENT if metric in METRIC_LABELS else (-math.inf, math.inf)


# ---------- drawing ----------

def _grid(npanels, width=4.8, height=3.6, sharey=False):
    """A figure of `npanels` axes, PANEL_COLUMNS to a row, its height growing with the rows."""
    # matplotlib only where a plot is drawn: --no-plots and the tables start without its import
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(npanels, PANEL_COLUMNS)
    nrows = math.ceil(npanels / ncols)
    fig = Figure(figsize=(width * ncols + 2.2, height * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[npanels:]:
        ax.set_visible(False)
    return fig, axes[:npanels]


def _shared_legend(fig, axes, title=None):
    """One legend for every panel, outside them on the right (labels in first-seen order)."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize="small", title=title)


def _save(fig, path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return f"wrote {path}"


def _label(keys, values) -> str:
    return ", ".join(f"{k}={show(v)}" for k, v in zip(keys, values))


def _cell_title(comparison, row, column) -> str:
    c = comparison
    parts = [_label(c.by, c.keys[int(row)])] + ([f"{c.vs}={show(c.columns[int(column)])}"] if c.vs else [])
    return ", ".join(part for part in parts if part) or "all runs"


# ---------- the metric against a knob ----------

def metric_points(comparison, x, line_keys) -> pd.DataFrame:
    """Per line (a combination of `line_keys`) and value of `x`: the metric's mean, low and high
    (INTERVAL) and n over the runs."""
    c = comparison
    data = c.runs[c.runs[x].notna() & c.runs[c.metric].notna()]
    bounds = bounds_of(c.metric)
    rows = []
    for key, part in data.groupby([*line_keys, x], dropna=False, sort=True):
        mean, low, high = mean_interval(floats(part[c.metric]), bounds)
        rows.append({**dict(zip([*line_keys, x], key)), "mean": mean, "low": low, "high": high, "n": len(part)})
    return pd.DataFrame(rows)


def line_plot(comparison, x, line_keys, path, xscale):
    """Metric (INTERVAL) against knob `x`, one line per combination of `line_keys`."""
    c = comparison
    if x not in c.runs or c.runs[x].nunique() < 2:
        return f"skipped {path.name}: {x} does not vary"
    line_keys = [key for key in line_keys if key in c.runs]
    points = metric_points(c, x, line_keys)
    fig, (ax,) = _grid(1, width=6.4, height=4.4)
    for line, part in (points.groupby(line_keys, dropna=False, sort=True) if line_keys else [((), points)]):
        mean = floats(part["mean"])
        errors = np.vstack([mean - floats(part["low"]), floats(part["high"]) - mean])
        ax.errorbar(floats(part[x]), mean, yerr=errors, marker="o", capsize=3,
                    label=_label(line_keys, line) or c.metric)
    if xscale == "symlog":
        positive = c.runs[x][c.runs[x] > 0]
        ax.set_xscale("symlog", linthresh=float(positive.min()) if len(positive) else 1.0)
    else:
        ax.set_xscale(xscale)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{METRIC_LABELS.get(c.metric, c.metric)}\n{INTERVAL if c.metric in METRIC_LABELS else 'mean and 95% t-interval over seeds'}")
    ax.set_title(f"{c.metric} vs {x}")
    ax.grid(True, which="both", alpha=0.3)
    _shared_legend(fig, [ax])
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


# ---------- learning curves ----------

def learning_curve_data(comparison) -> dict:
    """{panel title: frame} for the learning curves: a panel per fraction (one when it does not
    vary), in it per line (the other row and column keys) and full-data epoch the val top-1's mean,
    low, high (INTERVAL) and n over the runs evaluated there."""
    c = comparison
    curves = comparison_curves(c, METRICS)
    if curves.empty or "val_top1" not in curves:
        return {}
    curves = curves[curves["val_top1"].notna()]
    keys = c.runs.loc[curves.index, [k for k in dict.fromkeys([*([c.vs] if c.vs else []), *c.by])]]
    frame = keys.assign(full_epoch=floats(curves["full_epoch"]), val_top1=floats(curves["val_top1"]),
                        run=curves.index.to_numpy())
    panel_key = "fraction" if "fraction" in keys and keys["fraction"].nunique() > 1 else None
    line_keys = [k for k in keys if k != panel_key]
    panels = {}
    for panel, part in (frame.groupby(panel_key, sort=True) if panel_key else [(None, frame)]):
        rows = []
        for key, points in part.groupby([*line_keys, "full_epoch"], dropna=False, sort=True):
            mean, low, high = mean_interval(floats(points["val_top1"]), PERCENT)
            rows.append({"line": _label(line_keys, key[:-1]) or "val top-1", "full_epoch": key[-1],
                         "mean": mean, "low": low, "high": high, "n": points["run"].nunique()})
        panels[f"fraction={show(panel)}" if panel_key else "all runs"] = pd.DataFrame(rows)
    return panels


def plot_learning_curves(comparison, out):
    """Val top-1 over full-data epochs (INTERVAL as a band), a line per model, a panel per fraction."""
    path = Path(out) / "learning_curves.png"
    panels = learning_curve_data(comparison)
    if not panels:
        return f"skipped {path.name}: no run has a metrics.csv with val_top1"
    from matplotlib import colormaps

    lines = list(dict.fromkeys(line for frame in panels.values() for line in frame["line"]))
    colors = {line: colormaps["tab10"](i % 10) for i, line in enumerate(lines)}
    fig, axes = _grid(len(panels), sharey=True)
    for ax, (title, frame) in zip(axes, panels.items()):
        for line, part in frame.groupby("line", sort=False):
            x = floats(part["full_epoch"])
            ax.plot(x, floats(part["mean"]), color=colors[line], label=line)
            ax.fill_between(x, floats(part["low"]), floats(part["high"]), color=colors[line], alpha=0.2, linewidth=0)
        ax.set_title(title)
        ax.set_xlabel("full-data epoch")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"val top-1 (%)\n{INTERVAL}")
    _shared_legend(fig, axes)
    return _save(fig, path)


# ---------- nonlocality and gates ----------

def locality_data(comparison) -> dict:
    """{(row, column): frame} for every table cell whose runs kept a locality.csv, in table order:
    per full-data epoch and layer the mean over the cell's runs of locality_trends' heads' mean
    nonlocality, gate and the gate's range over the heads (the gate is NaN for an MHSA layer)."""
    trends = locality_trends(comparison)
    panels = {}
    for (row, column), part in trends.groupby([ROW, COLUMN], sort=True):
        values = part[["nonlocality", "gate", "gate_min", "gate_max"]].astype("float64")
        per_epoch = values.groupby([floats(part["epoch"]), part["layer"].to_numpy()]).mean()
        per_epoch.index.names = ["full_epoch", "layer"]
        panels[(int(row), int(column))] = per_epoch.reset_index()
    return panels


def _layer_colors(panels):
    from matplotlib import colormaps

    layers = sorted({int(layer) for frame in panels.values() for layer in frame["layer"]})
    return {layer: colormaps["viridis"](i / max(len(layers) - 1, 1)) for i, layer in enumerate(layers)}


def plot_nonlocality(comparison, out):
    """Nonlocality per layer (mean over heads) over full-data epochs; a panel per table cell,
    dashed lines for MHSA layers."""
    path = Path(out) / "nonlocality.png"
    panels = locality_data(comparison)
    if not panels:
        return f"skipped {path.name}: no run has a locality.csv"
    colors = _layer_colors(panels)
    fig, axes = _grid(len(panels), sharey=True)
    for ax, ((row, column), frame) in zip(axes, panels.items()):
        for layer, part in frame.groupby("layer", sort=True):
            gpsa = part["gate"].notna().any()
            curve = part.set_index("full_epoch")["nonlocality"]
            ax.plot(curve.index.to_numpy(dtype=float), curve.to_numpy(), "-" if gpsa else "--", marker=".",
                    color=colors[int(layer)], label=f"layer {int(layer)} ({'GPSA' if gpsa else 'MHSA'})")
        ax.set_title(_cell_title(comparison, row, column), fontsize="medium")
        ax.set_xlabel("full-data epoch")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("nonlocality\n(mean attention distance, patches)")
    _shared_legend(fig, axes)
    return _save(fig, path)


def gate_data(comparison) -> dict:
    """{(row, column): frame} per cell with GPSA gates: per GPSA layer and full-data epoch the heads'
    mean σ(λ) and their spread (the heads' min and max), each averaged over the cell's runs."""
    panels = {}
    for cell, frame in locality_data(comparison).items():
        gated = frame[frame["gate"].notna()]
        if len(gated):
            panels[cell] = gated.rename(columns={"gate": "mean", "gate_min": "min", "gate_max": "max"})[
                ["layer", "full_epoch", "mean", "min", "max"]].sort_values(["layer", "full_epoch"]).reset_index(drop=True)
    return panels


def plot_gates(comparison, out):
    """σ(λ) per GPSA layer over full-data epochs: the heads' mean as a line, their spread as a
    band; a panel per table cell, the y axis fitted to the data (0 and 1 drawn when in view)."""
    path = Path(out) / "gates.png"
    panels = gate_data(comparison)
    if not panels:
        return f"skipped {path.name}: no GPSA gate in any locality.csv"
    colors = _layer_colors(panels)
    low = min(float(frame["min"].min()) for frame in panels.values())
    high = max(float(frame["max"].max()) for frame in panels.values())
    margin = max(0.1 * (high - low), 0.01)
    fig, axes = _grid(len(panels), sharey=True)
    for ax, ((row, column), frame) in zip(axes, panels.items()):
        for layer, part in frame.groupby("layer", sort=True):
            x = floats(part["full_epoch"])
            ax.plot(x, floats(part["mean"]), color=colors[int(layer)], label=f"layer {int(layer)}")
            ax.fill_between(x, floats(part["min"]), floats(part["max"]), color=colors[int(layer)], alpha=0.2,
                            linewidth=0)
        for bound in (0.0, 1.0):
            ax.axhline(bound, color="black", linewidth=0.8, linestyle=":")
        ax.set_title(_cell_title(comparison, row, column), fontsize="medium")
        ax.set_xlabel("full-data epoch")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylim(max(low - margin, -0.02), min(high + margin, 1.02))
    axes[0].set_ylabel("σ(λ): 1 positional, 0 content\nline: mean over heads, band: their min-max\n(each averaged over seeds)")
    fig.suptitle(f"σ(λ), y axis fitted to the data:\n{low:.2f}-{high:.2f} of 0-1 (dotted: 0 and 1, when in view)",
                 fontsize="medium")
    _shared_legend(fig, axes, title="GPSA layer")
    return _save(fig, path)
