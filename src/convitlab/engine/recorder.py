"""What a run records epoch by epoch: metrics.csv, locality.csv, VisualDL and the log line.

Rows are written in the columns of core.tables (METRIC_COLUMNS, LOCALITY_COLUMNS, through
tables.ordered_row): a key the schema does not have is an error, not a new column.

Only rank 0 writes; on the other ranks a Recorder logs and writes nothing. metrics.csv's rows
are written with the checkpoint that covers them (flush), so the table never runs ahead of
what a resume restores; locality rows and VisualDL scalars are written as they come, and rows
past the resumed epoch are dropped at the start (their work is being redone).

VisualDL (2.5.3) draws one chart per tag with a line per run, and a run is a folder of logs shown
by the display name its log gives. So the run writes several folders under vdl/, each a "run" of
one name: `train` and `val` (the same tags, so one chart holds train and val loss, and train and
val top-1), and `head_NN` per attention head (the same tag per layer, so one chart holds a
layer's heads). The name is the run's folder name and the folder above it (run_name: a sweep
job's `<overrides> (<sweep>)`, a single run's `<stamp> (runs)`), then the part (`· val`). VisualDL lists the
groups of charts (the tag's first part) alphabetically: `classification` (loss, top-1, top-5)
comes before `gate` and `nonlocality`, then `schedule` and `speed`. The hyper-parameter view gets
the run's knobs (core.tables.KNOBS, the columns compare.py may group by), its seed, fraction,
epochs (full-data, as configured) and passes, with its best and final val top-1.
"""
import logging
import math

from visualdl import LogWriter

from convitlab.core import distributed, tables

log = logging.getLogger(__name__)
# metrics.csv column -> (VisualDL folder, tag) for the columns shown; the others (epoch: the x
# axis; epoch_s, data_wait_frac, skipped_steps: bookkeeping) are left to metrics.csv.
TAGS = {"train_loss": ("train", "classification/loss"), "val_loss": ("val", "classification/loss"),
        "train_top1": ("train", "classification/top1"), "val_top1": ("val", "classification/top1"),
        "val_top5": ("val", "classification/top5"), "lr": ("train", "schedule/lr"),
        "img_per_s": ("train", "speed/img_per_s")}
# The hyper-parameter view's metrics: scalars the val folder writes once, when the run stops.
BEST, FINAL = "result/best_top1", "result/final_top1"


def run_name(folder) -> str:
    """What VisualDL calls a run: its folder's name (a sweep job's overrides, a single run's stamp;
    a job named by a hash by its overrides), then the folder above it in brackets (the sweep, or
    `runs`), which keeps jobs of two sweeps apart. The part that differs comes first: VisualDL's
    run list cuts long names at the end (the full name shows on hover)."""
    name = folder.path.name
    if folder.job_overrides.is_file():
        name = folder.job_overrides.read_text().strip() or name
    return f"{name} ({folder.path.parent.name})"


def hparams(cfg, identity, name, passes) -> dict:
    """The hyper-parameter view's columns: the run's name, the knobs a sweep varies most (model,
    fraction, seed, the epochs as configured and the passes they make), then every other knob of
    the identity row (tables.KNOBS, as compare.py groups runs); booleans as text, missing values
    left out (VisualDL takes int, float and str)."""
    values = {"run": name, "model": identity.get("model"), "fraction": float(cfg.data.fraction),
              "seed": int(cfg.seed), "epochs": cfg.schedule.epochs, "passes": passes}
    values.update({key: identity.get(key) for key in tables.KNOBS if key not in values})
    shown = {}
    for name, value in values.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        shown[name] = str(value) if isinstance(value, bool) else value if isinstance(value, (int, float, str)) \
            else str(value)
    return shown


class Recorder:
    """Use as a context manager: leaving it writes the best and final top-1 with the
    hyper-parameters and closes VisualDL.

    `state` is the loop's (engine.trainer.LoopState), read as it stands when the run stops;
    `identity` the run's identity row (run.record.identity_row), for the hyper-parameter view."""

    def __init__(self, folder, cfg, epochs: int, state, identity=None):
        self.folder, self.cfg, self.epochs, self.state = folder, cfg, epochs, state
        self.identity = identity or {}
        self.pending = []  # metrics rows of the epochs since the last checkpoint
        self.writers = {}  # VisualDL folder under vdl/ -> its LogWriter, opened on first use
        self.main = distributed.is_main()
        if self.main:
            tables.truncate_after_epoch(folder.metrics, state.epoch)
            tables.truncate_after_epoch(folder.locality, state.epoch)
            self.name = run_name(folder)
            self._writer("train"), self._writer("val")

    def _writer(self, part) -> LogWriter:
        if part not in self.writers:
            self.writers[part] = LogWriter(logdir=str(self.folder.vdl / part),
                                           display_name=f"{self.name} · {part.replace('_', ' ')}")
        return self.writers[part]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.main:
            return
        val, state = self._writer("val"), self.state
        if state.best_epoch > 0:  # evaluated at least once
            val.add_scalar(BEST, state.best_top1, state.epoch)
            val.add_scalar(FINAL, state.val_top1, state.epoch)
        val.add_hparams(hparams(self.cfg, self.identity, self.name, self.epochs), [BEST, FINAL])
        for writer in self.writers.values():
            writer.close()

    def record(self, metrics: dict, locality: list) -> None:
        """An epoch's metrics row (with val_* on an evaluation epoch) and its locality rows."""
        if "val_top1" in metrics:
            log.info("epoch %d/%d  train loss %.4f  val top-1 %.2f%%  top-5 %.2f%%  %.0f img/s", metrics["epoch"],
                     self.epochs, metrics["train_loss"], metrics["val_top1"], metrics["val_top5"],
                     metrics["img_per_s"])
        if not self.main:
            return
        self.pending.append(metrics)
        self._scalars(metrics, locality)
        if locality:
            rows = [tables.ordered_row(row, tables.LOCALITY_COLUMNS) for row in locality]
            tables.append_rows(self.folder.locality, rows, tables.LOCALITY_COLUMNS)

    def flush(self) -> None:
        """Write the pending metrics rows: before a checkpoint, and when the run stops diverged."""
        if self.main and self.pending:
            rows = [tables.ordered_row(row, tables.METRIC_COLUMNS) for row in self.pending]
            tables.append_rows(self.folder.metrics, rows, tables.METRIC_COLUMNS)
        self.pending = []

    def _scalars(self, metrics, locality):
        epoch = metrics["epoch"]
        for key, (part, tag) in TAGS.items():
            if metrics.get(key) is not None:  # val_* only on an evaluation epoch
                self._writer(part).add_scalar(tag, metrics[key], epoch)
        for row in locality:  # a chart per layer, a line per head
            head = self._writer(f"head_{row['head']:02d}")
            head.add_scalar(f"nonlocality/layer_{row['layer']:02d}", row["nonlocality"], epoch)
            if math.isfinite(row["gate"]):  # MHSA layers have none
                head.add_scalar(f"gate/layer_{row['layer']:02d}", row["gate"], epoch)
