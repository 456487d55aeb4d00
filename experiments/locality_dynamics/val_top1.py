"""The validation top-1 of a sweep's runs at every evaluation, in full-data epochs: writes
<out>/val_top1.csv (model, fraction, seed, epoch, val_top1) and prints the mean over seeds at a few
epochs (the figures the README quotes for the GPSA boost early in training).

    python experiments/locality_dynamics/val_top1.py outputs/locality_dynamics experiments/locality_dynamics
"""
import argparse
from pathlib import Path

from convitlab.results.load import load_metrics

EPOCHS = (2, 5, 10, 15, 20, 30, 48)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    metrics = load_metrics(args.sweep)
    metrics = metrics[metrics["val_top1"].notna()]
    # the project's protocol: a pass over a subset of fraction f is f of a full-data epoch
    table = metrics.assign(epoch=metrics["epoch"] * metrics["fraction"])[
        ["model", "fraction", "seed", "epoch", "val_top1"]].sort_values(["model", "fraction", "seed", "epoch"])
    table.to_csv(args.out / "val_top1.csv", index=False)
    means = table.pivot_table(index=["fraction", "epoch"], columns="model", values="val_top1", aggfunc="mean")
    print(means[means.index.get_level_values("epoch").isin(EPOCHS)].round(1).to_string())


if __name__ == "__main__":
    main()
