"""Print a study's locality trends as a table: per setting (model, fraction and any other key of
locality_trends.csv) and layer, the heads' mean nonlocality and gate σ(λ) at the first evaluation,
the lowest/highest point, and the last, each the mean over seeds (the gate's range over the heads
at the last evaluation beside it).

    python experiments/locality_dynamics/trend_table.py <folder with locality_trends.csv>
"""
import argparse
from pathlib import Path

import pandas as pd

VALUES = ["nonlocality", "gate", "gate_min", "gate_max"]


def seed_means(trends: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per setting, layer and epoch; the setting is every column before `layer`
    but the seed (compare.py writes the run's keys there), so no two settings are pooled."""
    keys = [c for c in trends.columns[:list(trends.columns).index("layer")] if c != "seed"]
    return trends.groupby([*keys, "layer", "epoch"], sort=True, dropna=False)[VALUES].mean()


def trend_table(trends: pd.DataFrame) -> pd.DataFrame:
    means = seed_means(trends)
    keys = list(means.index.names[:-1])
    rows = []
    for key, part in means.groupby(level=keys, sort=True, dropna=False):
        part = part.droplevel(keys)
        first, last = part.iloc[0], part.iloc[-1]
        row = dict(zip(keys, key), epochs=f"{part.index[0]:g}-{part.index[-1]:g}",
                   nonlocality_first=first["nonlocality"], nonlocality_min=part["nonlocality"].min(),
                   nonlocality_max=part["nonlocality"].max(), nonlocality_last=last["nonlocality"])
        if part["gate"].notna().any():
            row.update(gate_first=first["gate"], gate_last=last["gate"],
                       gate_last_heads=f"{last['gate_min']:.2f}-{last['gate_max']:.2f}")
        rows.append(row)
    return pd.DataFrame(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    table = trend_table(pd.read_csv(args.folder / "locality_trends.csv"))
    print(table.to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    main()
