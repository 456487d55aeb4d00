"""The pilots' table in experiments/locality_dynamics/README.md, from the files in pilot/: per pilot,
model and fraction the final top-1 (mean over the seeds run) and how far each layer kind moved between
the first evaluation and the last, as the range over layers of (last − first), each layer the mean over
heads and seeds; the gates as the range of the GPSA layers' mean σ(λ) at the last evaluation.

    python experiments/locality_dynamics/pilot_table.py
"""
from pathlib import Path

import pandas as pd
from trend_table import seed_means  # this folder's script: run as a file, its folder is on sys.path

PILOTS = Path(__file__).resolve().parent / "pilot"


def moved(trends: pd.DataFrame) -> pd.DataFrame:
    """Per model, fraction and layer: nonlocality first, last; gate last (NaN for MHSA)."""
    return seed_means(trends).groupby(level=["model", "fraction", "layer"]).agg(
        first=("nonlocality", "first"), last=("nonlocality", "last"), gate=("gate", "last"))


def span(values) -> str:
    return f"{min(values):+.2f} to {max(values):+.2f}" if len(values) else ""


def main():
    rows = []
    for folder in sorted(p for p in PILOTS.iterdir() if p.is_dir()):
        layers = moved(pd.read_csv(folder / "locality_trends.csv"))
        summary = pd.read_csv(folder / "summary.csv") if (folder / "summary.csv").exists() else None
        for (model, fraction), part in layers.groupby(level=["model", "fraction"]):
            gpsa = part[part["gate"].notna()]
            mhsa = part[part["gate"].isna()]
            top1 = ""
            if summary is not None:
                runs = summary[(summary["model"] == model) & (summary["fraction"] == fraction)]
                top1 = f"{runs['top1'].mean():.1f} ({len(runs)})"
            rows.append({"pilot": folder.name, "model": model, "fraction": fraction, "top-1 (runs)": top1,
                         "MHSA Δ nonlocality": span((mhsa["last"] - mhsa["first"]).tolist()),
                         "GPSA Δ nonlocality": span((gpsa["last"] - gpsa["first"]).tolist()),
                         "GPSA σ(λ) at the end": f"{gpsa['gate'].min():.3f}-{gpsa['gate'].max():.3f}"
                         if len(gpsa) else ""})
    table = pd.DataFrame(rows)
    print("| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns))
    for row in table.itertuples(index=False):
        print("| " + " | ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in row) + " |")


if __name__ == "__main__":
    main()
