"""What a run records epoch by epoch: metrics.csv, locality.csv, VisualDL and the log line.

Rows are written in the columns of core.tables (METRIC_COLUMNS, LOCALITY_COLUMNS, through
tables.ordered_row): a key the schema does not have is an error, not a new column.

Only rank 0 writes; on the other ranks a Recorder logs and writes nothing. metrics.csv's rows
are written with the checkpoint that covers them (flush), so the table never runs ahead of
what a resume restores; locality rows and VisualDL scalars are written as they come, and rows
past the resumed epoch are dropped at the start (their work is being redone).
"""
import logging
import math

import numpy as np
from visualdl import LogWriter

from convitlab.core import distributed
from convitlab.core import tables

log = logging.getLogger(__name__)
# The metrics.csv columns shown in VisualDL (train/... and val/...): all but the epoch (the x axis)
# and the bookkeeping of how long an epoch took and what it skipped.
SCALARS = [name for name in tables.METRIC_COLUMNS
           if name not in ("epoch", "epoch_s", "data_wait_frac", "skipped_steps")]


class Recorder:
    """Use as a context manager: leaving it writes the hyper-parameters and closes VisualDL."""

    def __init__(self, folder, cfg, epochs: int, resumed_epoch: int):
        self.folder, self.cfg, self.epochs = folder, cfg, epochs
        self.pending = []  # metrics rows of the epochs since the last checkpoint
        self.writer = None
        if distributed.is_main():
            tables.truncate_after_epoch(folder.metrics, resumed_epoch)
            tables.truncate_after_epoch(folder.locality, resumed_epoch)
            self.writer = LogWriter(logdir=str(folder.vdl))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            m, d = self.cfg.model, self.cfg.data
            hparams = {"model": m.name, "dataset": d.name, "fraction": float(d.fraction),
                       "locality_strength": float(m.locality_strength), "local_up_to_layer": int(m.local_up_to_layer),
                       "lr": float(self.cfg.optimizer.lr), "seed": int(self.cfg.seed)}
            self.writer.add_hparams(hparams, ["val/val_top1", "val/val_loss"])
            self.writer.close()

    def record(self, metrics: dict, locality: list) -> None:
        """An epoch's metrics row (with val_* on an evaluation epoch) and its locality rows."""
        if "val_top1" in metrics:
            log.info("epoch %d/%d  train loss %.4f  val top-1 %.2f%%  top-5 %.2f%%  %.0f img/s", metrics["epoch"],
                     self.epochs, metrics["train_loss"], metrics["val_top1"], metrics["val_top5"],
                     metrics["img_per_s"])
        if self.writer is None:
            return
        self.pending.append(metrics)
        _scalars(self.writer, metrics, locality)
        if locality:
            rows = [tables.ordered_row(row, tables.LOCALITY_COLUMNS) for row in locality]
            tables.append_rows(self.folder.locality, rows, tables.LOCALITY_COLUMNS)

    def flush(self) -> None:
        """Write the pending metrics rows: before a checkpoint, and when the run stops diverged."""
        if self.writer is not None and self.pending:
            rows = [tables.ordered_row(row, tables.METRIC_COLUMNS) for row in self.pending]
            tables.append_rows(self.folder.metrics, rows, tables.METRIC_COLUMNS)
        self.pending = []


def _scalars(writer, metrics, locality):
    epoch = metrics["epoch"]
    for key in SCALARS:
        if key not in metrics:  # not an evaluation epoch
            continue
        group = "train" if key.startswith("train") or key in ("lr", "img_per_s") else "val"
        writer.add_scalar(f"{group}/{key}", metrics[key], epoch)
    layers = sorted({r["layer"] for r in locality})
    for layer in layers:
        heads = [r for r in locality if r["layer"] == layer]
        writer.add_scalar(f"nonlocality/layer_{layer:02d}", float(np.mean([r["nonlocality"] for r in heads])), epoch)
        for r in heads:
            if math.isfinite(r["gate"]):
                writer.add_scalar(f"gate/layer_{layer:02d}_head_{r['head']:02d}", r["gate"], epoch)
