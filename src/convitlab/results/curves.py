"""A comparison's per-epoch curves in full-data epochs, and the locality trends table drawn from them.

Epochs here are full-data epochs, as the configuration counts them (schedule.epochs): a pass over a
subset of fraction f is f of one (engine.protocol), unless the run counted passes
(schedule.scale_epochs=false).

locality_trends is what compare_results writes as locality_trends.csv and what nonlocality.png and
gates.png are drawn from: per run, GPSA/MHSA layer and evaluation, the heads' mean nonlocality and
the heads' mean gate σ(λ) with its spread over the heads (empty for an MHSA layer, which has none).
"""
import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from convitlab.core import tables
from convitlab.core.layout import CONFIG, LOCALITY
from convitlab.engine.protocol import epoch_scale
from convitlab.results import load
from convitlab.results.cells import COLUMN, ROW, floats

# locality_trends.csv: the run's identity, then per layer and full-data epoch the heads' mean
# nonlocality (mean attention distance in patches) and gate, and the gate's range over the heads.
TREND_RUN_KEYS = ["model", "fraction", "seed"]
TREND_VALUES = ["layer", "epoch", "nonlocality", "gate", "gate_min", "gate_max"]


def full_epochs_per_pass(runs: pd.DataFrame) -> pd.Series:
    """For each run (indexed as `runs`), the full-data epochs one pass over its training subset is:
    engine.protocol's scale read back from the run's config.yaml (schedule.scale_epochs, data.fraction),
    or from its fraction with the default scale_epochs when the run kept no config."""
    scales = {}
    for label, row in zip(runs.index, runs.astype(object).where(runs.notna(), None).to_dict("records")):
        fraction, scaled = row.get("fraction") or 1.0, True  # the default schedule scales
        folder = load.run_directory(row, CONFIG)
        if folder is not None:
            cfg = OmegaConf.load(folder / CONFIG)
            fraction = OmegaConf.select(cfg, "data.fraction", default=fraction)
            scaled = OmegaConf.select(cfg, "schedule.scale_epochs", default=scaled)
        cfg = OmegaConf.create({"data": {"fraction": fraction}, "schedule": {"scale_epochs": scaled}})
        scales[label] = 1.0 / epoch_scale(cfg)
    return pd.Series(scales, dtype="float64")


def comparison_curves(comparison, filename) -> pd.DataFrame:
    """The `filename` rows (metrics.csv, locality.csv) of the comparison's runs, indexed by run, with
    their table ROW and COLUMN and `full_epoch`: the pass counted in full-data epochs."""
    c = comparison
    runs = c.runs[c.runs[ROW].notna()]
    curves = load.run_curves(runs, filename, columns=[ROW, COLUMN])
    if curves.empty or "epoch" not in curves:
        return curves.iloc[0:0]
    curves = curves[curves["epoch"].notna()]
    per_pass = full_epochs_per_pass(runs.loc[curves.index.unique()])
    return curves.assign(full_epoch=floats(curves["epoch"]) * per_pass.reindex(curves.index).to_numpy())


def trend_columns(comparison) -> list:
    """locality_trends.csv's columns: the run keys, the comparison's other row and column keys
    (a sweep over locality_strength keeps it), then TREND_VALUES."""
    c = comparison
    keys = [k for k in dict.fromkeys([*TREND_RUN_KEYS, *([c.vs] if c.vs else []), *c.by]) if k in c.runs]
    return [*keys, *TREND_VALUES]


def locality_trends(comparison) -> pd.DataFrame:
    """One row per run, layer and evaluation: trend_columns(comparison), with `epoch` in full-data
    epochs, plus the run's ROW and COLUMN (working columns, not written). Heads whose values are not
    finite are left out of the means; empty when no run kept a locality.csv."""
    columns = trend_columns(comparison)
    curves = comparison_curves(comparison, LOCALITY)
    if curves.empty or any(key not in curves for key in ("layer", "head", "nonlocality", "gate")):
        return pd.DataFrame(columns=[*columns, ROW, COLUMN])
    curves = curves.dropna(subset=["layer", "head"])
    values = curves[["nonlocality", "gate"]].astype("float64")
    heads = curves[[ROW, COLUMN, "full_epoch", "layer"]].assign(
        nonlocality=values["nonlocality"].where(np.isfinite(values["nonlocality"])),
        gate=values["gate"].where(np.isfinite(values["gate"])))
    heads["layer"] = heads["layer"].astype("int64")
    grouped = heads.reset_index().groupby(["run", ROW, COLUMN, "full_epoch", "layer"], sort=True)
    trends = grouped.agg(nonlocality=("nonlocality", "mean"), gate=("gate", "mean"),
                         gate_min=("gate", "min"), gate_max=("gate", "max")).reset_index()
    identity = comparison.runs.loc[trends["run"], [k for k in columns if k not in TREND_VALUES]]
    trends = pd.concat([identity.reset_index(drop=True), trends.rename(columns={"full_epoch": "epoch"})], axis=1)
    trends = trends.sort_values([ROW, COLUMN, "run", "layer", "epoch"], kind="stable")  # the table's order
    return trends[[*columns, ROW, COLUMN]].reset_index(drop=True)


def write_locality_trends(comparison, path) -> str:
    """Write locality_trends(comparison) to `path` (blank where a value is missing: an MHSA layer's
    gate); one line for the report."""
    trends = locality_trends(comparison).drop(columns=[ROW, COLUMN])
    if trends.empty:
        return f"skipped {path.name}: no run has a locality.csv"
    tables.write_table(path, trends.astype(object).where(trends.notna(), None))
    return f"wrote {path}"
