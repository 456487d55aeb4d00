"""The figures compare_results writes beside comparison.csv: the metric against the data fraction
and against the locality strength (mean ± std over seeds), nonlocality per layer over epochs and
the GPSA gates at the last epoch (from the runs' locality.csv files).

Each plot function takes a Comparison and the output folder and returns one line for the report:
"wrote <path>", or "skipped <name>: <why>" when the runs have nothing to draw. Figures are drawn
by Agg into files (no display, no pyplot state); matplotlib is imported only where a figure is
drawn, so the tables and --no-plots run without it.
"""
from pathlib import Path

import numpy as np
import pandas as pd

from convitlab.core.files import atomic_path
from convitlab.core.layout import LOCALITY
from convitlab.results import load
from convitlab.results.cells import COLUMN, ROW, show

METRIC_LABELS = {"top1": "top-1 accuracy (%)", "best_top1": "best top-1 accuracy (%)", "top5": "top-5 accuracy (%)"}


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
        label = ", ".join(f"{k}={show(v)}" for k, v in zip(line_keys, line)) or c.metric
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
    title = ", ".join(f"{k}={show(v)}" for k, v in zip(c.by, c.keys[row]))
    mine = curves[curves[ROW] == row]
    return title, {c.columns[int(column)]: part for column, part in mine.groupby(COLUMN, sort=True)}


def _run_means(part, value, keys) -> pd.Series:
    """`value` averaged over each run's rows per `keys`, then over runs (non-finite values skipped)."""
    frame = part.reset_index().assign(**{value: part[value].where(np.isfinite(_floats(part[value]))).to_numpy()})
    return frame.groupby(["run", *keys])[value].mean().groupby(level=keys).mean().dropna()


def _panel_title(comparison, column, group) -> str:
    parts = [f"{comparison.vs}={show(column)}"] if comparison.vs else []
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
