"""Result tables (append, truncate, typed reading, result.csv) and gathering a sweep into summary.csv."""
import csv
import math

import pytest
from omegaconf import OmegaConf

from convitlab import results
from convitlab.sweeps import GatherSweep, gather_sweep


def metric_row(epoch, **extra):
    return {"epoch": epoch, "lr": 0.1 + 0.2, "train_loss": 1 / 3, "train_top1": 50.0, "val_loss": math.inf,
            "val_top1": 12.5, "val_top5": 100.0, "epoch_s": 1e-7, "img_per_s": 123.456, "data_wait_frac": 0.0,
            **extra}


def test_append_truncate_read_round_trip_with_typed_values(tmp_path):
    path = tmp_path / "metrics.csv"
    results.truncate_after_epoch(path, 3)  # missing file: nothing happens
    assert not path.exists() and results.read_last_row(path) == {}
    for epoch in (1, 2, 3):
        results.append_rows(path, [metric_row(epoch)], results.METRIC_COLUMNS)
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == results.METRIC_COLUMNS
    rows = results.read_rows(path)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and type(rows[0]["epoch"]) is int
    assert rows[0]["lr"] == 0.1 + 0.2  # full precision, bit for bit
    assert rows[0]["train_loss"] == 1 / 3 and rows[0]["val_loss"] == math.inf and rows[0]["epoch_s"] == 1e-7
    assert type(rows[0]["train_top1"]) is float
    results.truncate_after_epoch(path, 2)
    assert [r["epoch"] for r in results.read_rows(path)] == [1, 2]
    results.append_rows(path, [metric_row(3)], results.METRIC_COLUMNS)
    assert results.read_last_row(path) == metric_row(3)


def test_append_keeps_old_rows_when_a_column_appears(tmp_path):
    path = tmp_path / "locality.csv"
    results.append_rows(path, [{"epoch": 1, "layer": 0, "head": 0, "gate": math.nan}], results.LOCALITY_COLUMNS)
    results.append_rows(path, [{"epoch": 2, "layer": 0, "head": 0, "gate": 0.5, "new": "x"}], results.LOCALITY_COLUMNS)
    first, second = results.read_rows(path)
    assert math.isnan(first["gate"]) and first["new"] is None and first["nonlocality"] is None
    assert second["gate"] == 0.5 and second["new"] == "x"


def test_string_columns_stay_strings_and_blanks_become_none(tmp_path):
    row = {"run_id": "0042", "config_hash": "1234567890123456", "model": "convit_micro", "img_size": "32x48",
           "seed": 0, "use_local_init": True, "train_gating": False, "tags": "123", "error": None,
           "fraction": 0.05, "overrides": "seed=1 data.fraction=0.05"}
    results.write_result(tmp_path, row)
    back = results.read_result(tmp_path)
    assert back["config_hash"] == "1234567890123456" and back["run_id"] == "0042" and back["tags"] == "123"
    assert back["img_size"] == "32x48" and back["seed"] == 0 and back["fraction"] == 0.05
    assert back["use_local_init"] is True and back["train_gating"] is False
    assert back["error"] is None and back["top1"] is None  # blank, and a column the row did not have
    results.write_result(tmp_path, {**row, "img_size": 32})
    assert results.read_result(tmp_path)["img_size"] == 32


def test_result_has_every_column_in_order_and_extra_keys_after(tmp_path):
    results.write_result(tmp_path, {"note": "extra", "top1": 47.8, "run_id": "r", "status": "completed"})
    with open(tmp_path / "result.csv", newline="") as f:
        header, values = list(csv.reader(f))
    assert header == results.RESULT_COLUMNS + ["note"]
    assert len(values) == len(header)
    assert results.read_result(tmp_path)["note"] == "extra"
    assert len(results.RESULT_COLUMNS) == len(set(results.RESULT_COLUMNS))


def test_read_result_of_missing_or_unreadable_file_is_none(tmp_path):
    assert results.read_result(tmp_path) is None
    (tmp_path / "result.csv").write_bytes(b"\xff\xfe\x00garbage\x81")
    assert results.read_result(tmp_path) is None
    (tmp_path / "result.csv").write_text("run_id,status\n")  # header only
    assert results.read_result(tmp_path) is None


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    for epoch in (1, 2):
        results.append_rows(path, [metric_row(epoch)], results.METRIC_COLUMNS)
    results.truncate_after_epoch(path, 1)
    results.write_result(tmp_path, {"run_id": "r"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "result.csv"]

    before = path.read_bytes()

    def fail_midway(value):
        raise RuntimeError("disk full")

    monkeypatch.setattr(results, "format_value", fail_midway)
    with pytest.raises(RuntimeError):
        results.append_rows(path, [metric_row(2)], results.METRIC_COLUMNS)
    assert path.read_bytes() == before  # the old table, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "result.csv"]


def make_job(sweep, name, overrides, row=None):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "checkpoints" / "epoch_0001").mkdir(parents=True)  # a job's own folders are not jobs
    if row is not None:
        results.write_result(job, {"run_id": name, "run_dir": f"/elsewhere/{name}", **row})
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
    rows = results.read_rows(path)
    assert [r["run_dir"] for r in rows] == [str(sweep / f"seed={i}") for i in range(3)]
    assert [r["status"] for r in rows] == ["completed", "failed", "unfinished"]
    assert rows[0]["top1"] == 50.0 and rows[0]["config_hash"] == "0001"
    assert rows[1]["error"] == "RuntimeError: out of memory"
    assert rows[2]["overrides"] == "seed=2 model=deit_micro" and rows[2]["run_id"] == "seed=2"
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == results.RESULT_COLUMNS
    assert not [p for p in sweep.iterdir() if p.name.endswith(".tmp")]


def test_gather_sweep_callback_and_a_job_without_overrides(tmp_path):
    sweep = fake_sweep(tmp_path)
    (sweep / "nested" / "job" / ".hydra").mkdir(parents=True)
    GatherSweep().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    rows = results.read_rows(sweep / "summary.csv")
    assert len(rows) == 4
    nested = [r for r in rows if r["run_dir"].endswith("job")][0]
    assert nested["status"] == "unfinished" and nested["overrides"] is None
