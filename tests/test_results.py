"""Result tables (append, truncate, typed reading, result.csv), gathering a sweep into summary.csv, and the
DataFrames of load_results, load_metrics and load_locality; damaged rows, the kind column and file modes."""
import csv
import logging
import math
import re
import stat
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import EVAL, QUICK, ROOT, TRAIN, run
from omegaconf import OmegaConf

from convitlab.core import tables
from convitlab.core.errors import UserError
from convitlab.results import load
from convitlab.results.sweeps import gather_sweep
from convitlab.run.callbacks import GatherSweep


def metric_row(epoch, **extra):
    return {"epoch": epoch, "lr": 0.1 + 0.2, "train_loss": 1 / 3, "train_top1": 50.0, "val_loss": math.inf,
            "val_top1": 12.5, "val_top5": 100.0, "epoch_s": 1e-7, "img_per_s": 123.456, "data_wait_frac": 0.0,
            **extra}


def test_append_truncate_read_round_trip_with_typed_values(tmp_path):
    path = tmp_path / "metrics.csv"
    tables.truncate_after_epoch(path, 3)  # missing file: nothing happens
    assert not path.exists()
    for epoch in (1, 2, 3):
        tables.append_rows(path, [metric_row(epoch)], tables.METRIC_COLUMNS)
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == tables.METRIC_COLUMNS
    rows = tables.read_rows(path)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and type(rows[0]["epoch"]) is int
    assert rows[0]["lr"] == 0.1 + 0.2  # full precision, bit for bit
    assert rows[0]["train_loss"] == 1 / 3 and rows[0]["val_loss"] == math.inf and rows[0]["epoch_s"] == 1e-7
    assert type(rows[0]["train_top1"]) is float
    tables.truncate_after_epoch(path, 2)
    assert [r["epoch"] for r in tables.read_rows(path)] == [1, 2]
    tables.append_rows(path, [metric_row(3)], tables.METRIC_COLUMNS)
    assert tables.read_rows(path)[-1] == {**dict.fromkeys(tables.METRIC_COLUMNS), **metric_row(3)}


def test_append_keeps_old_rows_when_a_column_appears(tmp_path):
    path = tmp_path / "locality.csv"
    tables.append_rows(path, [{"epoch": 1, "layer": 0, "head": 0, "gate": math.nan}], tables.LOCALITY_COLUMNS)
    tables.append_rows(path, [{"epoch": 2, "layer": 0, "head": 0, "gate": 0.5, "new": "x"}], tables.LOCALITY_COLUMNS)
    first, second = tables.read_rows(path)
    assert math.isnan(first["gate"]) and first["new"] is None and first["nonlocality"] is None
    assert second["gate"] == 0.5 and second["new"] == "x"


def test_string_columns_stay_strings_and_blanks_become_none(tmp_path):
    row = {"run_id": "0042", "config_hash": "1234567890123456", "model": "convit_micro", "img_size": "32x48",
           "seed": 0, "use_local_init": True, "train_gating": False, "tags": "123", "error": None,
           "fraction": 0.05, "overrides": "seed=1 data.fraction=0.05"}
    tables.write_result(tmp_path, row)
    back = tables.read_result(tmp_path)
    assert back["config_hash"] == "1234567890123456" and back["run_id"] == "0042" and back["tags"] == "123"
    assert back["img_size"] == "32x48" and back["seed"] == 0 and back["fraction"] == 0.05
    assert back["use_local_init"] is True and back["train_gating"] is False
    assert back["error"] is None and back["top1"] is None  # blank, and a column the row did not have
    tables.write_result(tmp_path, {**row, "img_size": 32})
    assert tables.read_result(tmp_path)["img_size"] == 32


def test_result_has_every_column_in_order_and_extra_keys_after(tmp_path):
    tables.write_result(tmp_path, {"note": "extra", "top1": 47.8, "run_id": "r", "status": "completed"})
    with open(tmp_path / "result.csv", newline="") as f:
        header, values = list(csv.reader(f))
    assert header == tables.RESULT_COLUMNS + ["note"]
    assert len(values) == len(header)
    assert tables.read_result(tmp_path)["note"] == "extra"
    assert len(tables.RESULT_COLUMNS) == len(set(tables.RESULT_COLUMNS))


def test_read_result_of_missing_or_unreadable_file_is_none(tmp_path):
    assert tables.read_result(tmp_path) is None
    (tmp_path / "result.csv").write_bytes(b"\xff\xfe\x00garbage\x81")
    assert tables.read_result(tmp_path) is None
    (tmp_path / "result.csv").write_text("run_id,status\n")  # header only
    assert tables.read_result(tmp_path) is None


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    for epoch in (1, 2):
        tables.append_rows(path, [metric_row(epoch)], tables.METRIC_COLUMNS)
    tables.truncate_after_epoch(path, 1)
    tables.write_result(tmp_path, {"run_id": "r"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "result.csv"]

    before = path.read_bytes()

    def fail_midway(value):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tables, "format_value", fail_midway)
    with pytest.raises(RuntimeError):
        tables.append_rows(path, [metric_row(2)], tables.METRIC_COLUMNS)
    assert path.read_bytes() == before  # the old table, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "result.csv"]


def make_job(sweep, name, overrides, row=None):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "checkpoints" / "epoch_0001").mkdir(parents=True)  # a job's own folders are not jobs
    if row is not None:
        tables.write_result(job, {"run_id": name, "run_dir": f"/elsewhere/{name}", **row})
    return job


def fake_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    make_job(sweep, "seed=0", ["seed=0"], {"status": "completed", "top1": 50.0, "seed": 0, "config_hash": "0001"})
    make_job(sweep, "seed=1", ["seed=1"], {"status": "failed", "error": "RuntimeError: out of memory", "seed": 1})
    make_job(sweep, "seed=2", ["seed=2", "model=deit_micro"])  # killed: .hydra/ but no result.csv
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_gather_sweep_has_one_row_per_job_with_its_status(tmp_path):
    sweep = fake_sweep(tmp_path)
    path = gather_sweep(sweep)
    assert path == sweep / "summary.csv"
    rows = tables.read_rows(path)
    assert [r["run_dir"] for r in rows] == [str(sweep / f"seed={i}") for i in range(3)]
    assert [r["status"] for r in rows] == ["completed", "failed", "unfinished"]
    assert rows[0]["top1"] == 50.0 and rows[0]["config_hash"] == "0001"
    assert rows[1]["error"] == "RuntimeError: out of memory"
    assert rows[2]["overrides"] == "seed=2 model=deit_micro" and rows[2]["run_id"] == "seed=2"
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == tables.RESULT_COLUMNS
    assert not [p for p in sweep.iterdir() if p.name.endswith(".tmp")]


def test_gather_sweep_callback_and_a_job_without_overrides(tmp_path):
    sweep = fake_sweep(tmp_path)
    (sweep / "nested" / "job" / ".hydra").mkdir(parents=True)
    GatherSweep().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    rows = tables.read_rows(sweep / "summary.csv")
    assert len(rows) == 4
    nested = [r for r in rows if r["run_dir"].endswith("job")][0]
    assert nested["status"] == "unfinished" and nested["overrides"] is None


# ---------- DataFrames: load_results, load_metrics, load_locality ----------

def typed_frame():
    """One column of every kind load_results gives, with missing values and awkward numbers."""
    return pd.DataFrame({
        "run_id": pd.array(["0042", "r1", None], dtype="string"),  # looks like a number: still text
        "config_hash": pd.array(["1234567890123456", "00ff", "7e5"], dtype="string"),
        "model": pd.array(["convit_micro", None, "deit_micro"], dtype="string"),
        "seed": pd.array([0, None, 2], dtype="Int64"),
        "params": pd.array([2**53 + 1, 12, None], dtype="Int64"),  # beyond a float's integers
        "fraction": [0.05, 0.1 + 0.2, np.nan],
        "top1": [1 / 3, math.inf, -1e-300],
        "use_local_init": pd.array([True, None, False], dtype="boolean"),
        "img_size": pd.array(["32x48", "32", None], dtype="string"),
    })


def test_write_then_load_round_trips_values_and_dtypes(tmp_path):
    frame = typed_frame()
    tables.write_table(tmp_path / "t.csv", frame)
    back = tables.typed_columns(tables.read_text(tmp_path / "t.csv"))
    pd.testing.assert_frame_equal(back, frame, check_exact=True)
    # Twice: what load gives, written again, loads the same, byte for byte.
    tables.write_table(tmp_path / "again.csv", back)
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "t.csv").read_bytes()
    # A run's result.csv: every column of RESULT_COLUMNS, typed; hashes and run ids as text.
    tables.write_result(tmp_path / "run", {"run_id": "0007", "config_hash": "0123", "seed": 3, "fraction": 0.05,
                                            "use_local_init": True, "status": "completed", "top1": 47.8})
    loaded = load.load_results(tmp_path / "run")
    assert list(loaded.columns) == tables.RESULT_COLUMNS + ["source"]
    assert loaded.loc[0, "run_id"] == "0007" and loaded.loc[0, "config_hash"] == "0123"
    assert loaded.dtypes[["run_id", "config_hash", "model", "error", "source"]].eq("string").all()
    assert (loaded.dtypes["seed"], loaded.dtypes["fraction"], loaded.dtypes["use_local_init"]) == ("Int64", "float64",
                                                                                                    "boolean")
    assert loaded.loc[0, "source"] == str(tmp_path / "run" / "result.csv") and pd.isna(loaded.loc[0, "model"])


def test_load_results_of_a_sweep_with_a_failed_and_an_unfinished_job(tmp_path):
    sweep = fake_sweep(tmp_path)
    frame = load.load_results(sweep)
    assert list(frame["status"]) == ["completed", "failed", "unfinished"]
    assert frame.dtypes["status"] == "string" and frame.dtypes["seed"] == "Int64"
    assert frame.loc[0, "top1"] == 50.0 and math.isnan(frame.loc[1, "top1"]) and frame.loc[0, "config_hash"] == "0001"
    assert frame.loc[1, "error"] == "RuntimeError: out of memory" and frame.loc[2, "overrides"] == "seed=2 model=deit_micro"
    assert set(frame["source"]) == {str(sweep / "summary.csv")}
    assert not (sweep / "summary.csv").exists()  # gathered in memory: reading writes nothing
    # Several inputs at once: another run directory, and a list of inputs.
    other = tmp_path / "other"
    tables.write_result(other, {"run_id": "other", "status": "completed", "top1": 40.0, "run_dir": str(other)})
    more = load.load_results(sweep, [other])
    assert len(more) == 4 and list(more["source"])[-1] == str(other / "result.csv")
    assert more.loc[3, "run_dir"] == str(other) and more.loc[0, "run_dir"] == str(sweep / "seed=0")


def test_gathering_keeps_each_job_cell_as_written(tmp_path):
    sweep = fake_sweep(tmp_path)
    job = sweep / "seed=0"
    (job / "result.csv").write_text("run_id,seed,lr,top1,status\nseed=0,0,1e-07,50.00,completed\n")
    gather_sweep(sweep)
    with open(sweep / "summary.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert (first["lr"], first["top1"], first["run_dir"]) == ("1e-07", "50.00", str(job))


def test_an_older_table_without_some_columns_still_loads(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("model,seed,top1\nconvit_micro,0,50.5\ndeit_micro,1,\n")
    frame = load.load_results(old)
    assert list(frame.columns) == ["model", "seed", "top1", "source"]
    assert list(frame["seed"]) == [0, 1] and frame.loc[0, "top1"] == 50.5 and math.isnan(frame.loc[1, "top1"])
    # Loaded with a newer table: the columns it lacks are blank in its rows.
    tables.write_result(tmp_path / "run", {"model": "convit_micro", "seed": 2, "top1": 51.0, "status": "completed"})
    both = load.load_results(old, tmp_path / "run")
    assert len(both) == 3 and list(both["status"].isna()) == [True, True, False]
    assert both.dtypes["seed"] == "Int64"


def test_unreadable_or_missing_input_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="nowhere: no such file or directory"):
        load.load_results(tmp_path / "nowhere")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"model,top1\n\xff\xfe\x81\n")
    with pytest.raises(UserError, match="bad.csv: not a readable CSV") as err:
        load.load_results(bad)
    assert "\n" not in str(err.value)


def job_with_curves(sweep, name, model, seed, epochs):
    job = make_job(sweep, name, [f"seed={seed}"], {"status": "completed", "model": model, "seed": seed, "lr": 1e-3,
                                                   "top1": 50.0 + seed})
    tables.append_rows(job / "metrics.csv", [metric_row(e, lr=1e-3 * e, val_top1=40.0 + e) for e in range(1, epochs + 1)],
                        tables.METRIC_COLUMNS)
    tables.append_rows(job / "locality.csv", [{"epoch": e, "layer": 0, "head": h, "nonlocality": 2.0 + h,
                                                "gate": math.nan if model == "deit_micro" else 0.5}
                                               for e in range(1, epochs + 1) for h in range(2)],
                        tables.LOCALITY_COLUMNS)
    return job


def test_load_metrics_and_locality_join_each_runs_identity(tmp_path):
    sweep = tmp_path / "sweep"
    job_with_curves(sweep, "a", "convit_micro", 0, epochs=3)
    job_with_curves(sweep, "b", "deit_micro", 1, epochs=2)
    make_job(sweep, "c", ["seed=2"])  # unfinished, no curves: not in them
    metrics = load.load_metrics(sweep)
    assert len(metrics) == 5 and list(metrics.index) == [0, 0, 0, 1, 1]  # the run's row in load_results
    assert list(metrics["model"]) == ["convit_micro"] * 3 + ["deit_micro"] * 2
    assert list(metrics["epoch"]) == [1, 2, 3, 1, 2] and metrics.dtypes["epoch"] == "Int64"
    assert metrics.loc[0, "lr_run"].tolist() == [1e-3] * 3 and metrics.loc[0, "lr"].tolist() == [1e-3, 2e-3, 3e-3]
    assert metrics["val_top1"].tolist() == [41.0, 42.0, 43.0, 41.0, 42.0] and set(metrics["status"]) == {"completed"}
    assert metrics["source"].iloc[-1] == str(sweep / "b" / "metrics.csv")
    pivot = metrics.pivot_table(index="epoch", columns="model", values="val_top1")
    assert pivot.loc[2, "deit_micro"] == 42.0
    locality = load.load_locality(sweep)
    assert len(locality) == 10 and locality.dtypes["gate"] == "float64"
    assert locality[locality["model"] == "deit_micro"]["gate"].isna().all()
    assert locality.groupby("model")["nonlocality"].mean().to_dict() == {"convit_micro": 2.5, "deit_micro": 2.5}


def test_curves_of_runs_without_any_keep_their_columns(tmp_path):
    metrics = load.load_metrics(fake_sweep(tmp_path))  # no job wrote a metrics.csv
    assert metrics.empty and {"model", "seed", "lr_run", "epoch", "lr", "val_top1", "source"} <= set(metrics.columns)
    assert metrics.groupby("epoch")["val_top1"].mean().empty  # what a notebook does with it still works


# ---------- damaged rows ----------

def cut_after_first_digit_of(path, column):
    """Cut the file after the first character of `column`'s value in its first row, as a copy
    interrupted there would leave it."""
    text = path.read_text()
    header, row = text.split("\n")[:2]
    position = header.split(",").index(column)
    start = len(header) + 1 + len(",".join(row.split(",")[:position])) + 1
    path.write_text(text[:start + 1])
    return text[start:start + 1]


def drop_a_field(path):
    header, row, rest = path.read_text().split("\n", 2)
    fields = row.split(",")
    path.write_text("\n".join([header, ",".join(fields[:3] + fields[4:]), rest]))


def cut_in_the_header(path):
    path.write_text(path.read_text()[:15])


@pytest.mark.parametrize("damage,reason", [
    (lambda path: cut_after_first_digit_of(path, "top1"), r"row 1 has \d+ of \d+ fields, row 1 has no line end"),
    (drop_a_field, r"row 1 has (\d+) of (?!\1)\d+ fields$"),
    (cut_in_the_header, "it holds no row"),
])
def test_a_result_csv_that_is_not_a_complete_row_is_damaged_never_completed(tmp_path, caplog, damage, reason):
    sweep = fake_sweep(tmp_path)
    job, result = sweep / "seed=0", sweep / "seed=0" / "result.csv"
    assert tables.read_result(job)["status"] == "completed"
    damage(result)
    assert tables.read_result(job) is None  # a run started again is not "already completed"
    with caplog.at_level(logging.WARNING, logger="convitlab.results.load"):
        (row,) = load.load_results(job).to_dict("records")
    assert row["status"] == "damaged" and pd.isna(row.get("top1"))
    assert row["error"].startswith(f"{result} is damaged: ") and re.search(reason, row["error"]), row["error"]
    assert "\n" not in row["error"] and row["run_dir"] == str(job)
    assert [r.getMessage() for r in caplog.records] == [f"{row['error']}: not loaded as a result (status damaged)"]
    frame = load.load_results(sweep)  # in a sweep: the job is damaged, the others as they were
    assert list(frame["status"]) == ["damaged", "failed", "unfinished"] and frame.loc[0, "error"] == row["error"]
    summary = tables.read_rows(gather_sweep(sweep))
    assert summary[0]["status"] == "damaged" and summary[0]["top1"] is None


def test_the_first_digit_of_top1_is_not_a_result_of_1(tmp_path):
    sweep = fake_sweep(tmp_path)
    assert cut_after_first_digit_of(sweep / "seed=0" / "result.csv", "top1") == "5"  # 50.0 cut to "5"
    frame = load.load_results(sweep)
    assert not frame["status"].eq("completed").any() and frame["top1"].isna().all()


def test_complete_tables_of_older_versions_still_load_and_a_cut_summary_row_is_damaged(tmp_path):
    old = tmp_path / "old.csv"  # no kind, no status: complete, so loaded as written
    old.write_text("model,seed,top1\nconvit_micro,0,50.5\nconvit_micro,1,51.5\n")
    assert list(load.load_results(old)["top1"]) == [50.5, 51.5]
    old.write_text("model,seed,top1\nconvit_micro,0,50.5\nconvit_micro,1,5")
    frame = load.load_results(old)
    assert frame.loc[0, "top1"] == 50.5 and pd.isna(frame.loc[0, "status"])
    assert frame.loc[1, "status"] == "damaged" and math.isnan(frame.loc[1, "top1"])
    assert frame.loc[1, "error"] == f"{old} is damaged: row 2 has no line end"


def test_a_cut_result_csv_is_resumed_not_reported_finished(tiny_run):
    result = tiny_run / "result.csv"
    before = tables.read_result(tiny_run)
    cut_after_first_digit_of(result, "top1")
    proc = run(TRAIN + QUICK + [f"hydra.run.dir={tiny_run}"], cwd=tiny_run.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not retrained" not in proc.stdout + proc.stderr
    after = tables.read_result(tiny_run)
    assert after["status"] == "completed" and after["top1"] == before["top1"] and after["kind"] == "train"


# ---------- kinds and file modes, through the entry points ----------

def modes(folder, *names):
    """{path relative to folder: permission bits} of every file and folder in it, or of `names`."""
    paths = [folder / name for name in names] or [folder, *folder.rglob("*")]
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def test_written_files_honour_the_umask_and_rows_say_their_kind(tmp_path, caplog):
    run_dir = tmp_path / "sweep" / "seed_0"  # a sweep of one job, trained under umask 027
    proc = run(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"], cwd=tmp_path, umask=0o027)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = modes(run_dir)
    assert {"result.csv", "metrics.csv", "locality.csv", "checkpoints/best.pdparams",
            "checkpoints/epoch_0002/model.pdparams", "checkpoints/epoch_0002/state.json"} <= set(written)
    assert {name: oct(mode) for name, mode in written.items()
            if mode != (0o750 if (run_dir / name).is_dir() else 0o640)} == {}
    assert tables.read_result(run_dir)["kind"] == "train"

    # Under the usual umask 022: an evaluation of its best weights, then compare.py with its plots
    # and the sweep's summary.
    eval_dir = tmp_path / "eval"
    proc = run(EVAL + [f"ckpt={run_dir / 'checkpoints' / 'best.pdparams'}", f"hydra.run.dir={eval_dir}",
                       "trainer.progress_bar=false"], cwd=tmp_path, umask=0o022)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tables.read_result(eval_dir)["kind"] == "eval" and modes(eval_dir, "result.csv") == {"result.csv": 0o644}
    proc = run([sys.executable, str(ROOT / "src" / "compare.py"), str(tmp_path / "sweep"), str(eval_dir),
                "--out", str(tmp_path / "report"), "--write-summary"], cwd=tmp_path, umask=0o022)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "left out 1 eval row (kind=eval): --kind eval compares them" in proc.stdout
    assert "| 1 |" not in proc.stdout and "(1) |" in proc.stdout  # the training run alone
    assert modes(tmp_path / "sweep", "summary.csv") == {"summary.csv": 0o644}
    report = modes(tmp_path / "report")
    assert {"comparison.csv", "comparison.md", "nonlocality.png", "gates.png"} <= set(report)
    assert {name: oct(mode) for name, mode in report.items() if mode != (0o755 if name == "." else 0o644)} == {}

    # load_results: training rows by default, with a line on the evaluation left out.
    with caplog.at_level(logging.WARNING, logger="convitlab.results.load"):
        runs = load.load_results(tmp_path / "sweep", eval_dir)
    assert list(runs["kind"]) == ["train"] and list(runs["run_dir"]) == [str(run_dir)]
    assert [r.getMessage() for r in caplog.records] == [
        "left out 1 eval row (kind=eval): load_results(..., kind='eval') loads them"]
    assert list(load.load_results(tmp_path / "sweep", eval_dir, kind="eval")["run_dir"]) == [str(eval_dir)]
    assert len(load.load_results(tmp_path / "sweep", eval_dir, kind="all")) == 2
    with pytest.raises(UserError, match="kind='evaluation' is not allowed: one of train, eval, all"):
        load.load_results(eval_dir, kind="evaluation")
