"""The result row comes from the loop's state (LoopState, kept in every checkpoint), not from
re-reading metrics.csv: it agrees with the rows the Recorder wrote, also after a resume that has
no epoch left to train and when a run diverges between evaluations. Every row a run writes has
the columns of core.tables' schema, in its order."""
import csv
import signal

import pytest
from helpers import QUICK, compose_train, read_csv

from convitlab.core import tables
from convitlab.core.layout import RunFolder
from convitlab.core.signals import Interrupted
from convitlab.engine import trainer
from convitlab.run.launch import interrupted_outcome, run_training
from convitlab.run.record import first_row, identity_row

# result.csv column <- the metrics.csv column it reports
FINAL = {"top1": "val_top1", "top5": "val_top5", "final_val_loss": "val_loss", "final_train_loss": "train_loss"}


def test_result_row_is_the_last_rows_also_after_a_resume_with_nothing_left(tmp_path):
    folder = RunFolder(tmp_path)
    run_training(compose_train(*QUICK), tmp_path)
    first = read_csv(folder.result)[0]
    last = read_csv(folder.metrics)[-1]
    assert {k: first[k] for k in FINAL} == {k: last[v] for k, v in FINAL.items()}

    folder.result.unlink()  # killed after its last checkpoint, before result.csv
    row = run_training(compose_train(*QUICK), tmp_path)
    assert row["status"] == "completed"
    again = read_csv(folder.result)[0]
    kept = [*FINAL, "best_top1", "best_epoch", "images_seen", "train_time_s", "skipped_steps"]
    assert {k: again[k] for k in kept} == {k: first[k] for k in kept}
    assert read_csv(folder.metrics)[-1] == last


def test_a_diverged_run_reports_its_last_epoch_and_its_last_evaluation(tmp_path, monkeypatch):
    real = trainer.soft_target_cross_entropy
    calls = {"n": 0}

    def loss_that_explodes(logits, targets):  # finite for three epochs (3 steps each), then NaN
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] > 9 else loss

    monkeypatch.setattr(trainer, "soft_target_cross_entropy", loss_that_explodes)
    # Evaluated (and checkpointed) at epochs 2, 4, 5: epoch 3's row waits for the next checkpoint
    # and is written when epoch 4 diverges; the last evaluation is epoch 2's.
    row = run_training(compose_train(*QUICK, "schedule.epochs=5", "trainer.eval_every=2"), tmp_path)
    assert row["status"] == "diverged" and "epoch 4" in row["error"]
    metrics = read_csv(RunFolder(tmp_path).metrics)
    assert [m["epoch"] for m in metrics] == ["1", "2", "3"] and metrics[2]["val_top1"] == ""
    result = read_csv(RunFolder(tmp_path).result)[0]
    assert result["final_train_loss"] == metrics[2]["train_loss"]
    assert {k: result[k] for k in FINAL if k != "final_train_loss"} == \
        {k: metrics[1][v] for k, v in FINAL.items() if k != "final_train_loss"}
    assert result["best_epoch"] == "2" and result["best_top1"] == metrics[1]["val_top1"]


def test_the_rows_a_run_writes_hold_exactly_the_schemas_columns_in_order(tmp_path):
    """core.tables is the one schema: identity_row fills CONFIG_COLUMNS, the result row is
    RESULT_COLUMNS, metrics.csv and locality.csv have METRIC_COLUMNS and LOCALITY_COLUMNS, and an
    interrupted run's outcome uses outcome columns only; each in the schema's order, nothing else."""
    cfg = compose_train(*QUICK)
    assert list(identity_row(cfg, tmp_path, "0123")) == tables.CONFIG_COLUMNS
    assert list(first_row(tmp_path, tables.TRAIN)) == tables.RESULT_COLUMNS
    row = run_training(cfg, tmp_path)
    assert row["status"] == "completed" and list(row) == tables.RESULT_COLUMNS
    folder = RunFolder(tmp_path)
    for path, columns in ((folder.result, tables.RESULT_COLUMNS), (folder.metrics, tables.METRIC_COLUMNS),
                          (folder.locality, tables.LOCALITY_COLUMNS)):
        with open(path, newline="") as f:
            assert next(csv.reader(f)) == columns, path.name
    outcome = interrupted_outcome(tmp_path, Interrupted(signal.SIGTERM), row["epochs"])
    assert set(outcome) <= set(tables.OUTCOME_COLUMNS) and outcome["epochs_done"] == row["epochs"]


def test_the_schemas_selections_are_its_own_columns():
    result = set(tables.RESULT_COLUMNS)
    assert set(tables.KNOBS) <= set(tables.IDENTITY_COLUMNS) and "seed" not in tables.KNOBS
    assert set(tables.CONFIG_COLUMNS) <= result and set(tables.RUN_KEYS) <= result
    assert tables.STRING_COLUMNS <= result | {tables.SOURCE}
    for columns in (tables.KNOBS, tables.CONFIG_COLUMNS, tables.METRIC_COLUMNS, tables.LOCALITY_COLUMNS):
        assert len(columns) == len(set(columns))
    assert tables.ordered_row({"layer": 1, "epoch": 2}, tables.LOCALITY_COLUMNS) == {
        "epoch": 2, "layer": 1, "head": None, "nonlocality": None, "gate": None, "window_distance": None}
    with pytest.raises(ValueError, match="not columns of the table: val_top1"):
        tables.ordered_row({"epoch": 1, "val_top1": 50.0}, tables.LOCALITY_COLUMNS)
    with pytest.raises(ValueError, match="missing columns: head"):
        tables.ordered_row({"epoch": 1, "layer": 0}, tables.LOCALITY_COLUMNS[:3], complete=True)


def read_vdl(folder):
    """{part: (display name, {tag: [(step, value)]}, hparams, hparam metrics)} of each VisualDL
    folder under `folder`, read back by VisualDL's own LogReader."""
    from visualdl import LogReader

    parts = {}
    for part in sorted(p for p in folder.iterdir() if p.is_dir()):
        (log_file,) = part.glob("vdlrecords.*.log")
        reader = LogReader(file_path=str(log_file))
        tags = reader.get_tags()
        scalars = {tag: [(r.id, r.value) for r in reader.get_data("scalar", tag)] for tag in tags.get("scalar", [])}
        hparams, metrics = {}, []
        if "hyper_parameters" in tags:
            (record,) = reader.get_data("hyper_parameters", "hparam")
            hparams = {info.name: getattr(info, info.WhichOneof("type")) for info in record.hparam.hparamInfos}
            metrics = [info.name for info in record.hparam.metricInfos]
        parts[part.name] = (reader.tags2name[str(log_file)], scalars, hparams, metrics)
    return parts


def test_visualdl_logs_train_and_val_on_one_chart_heads_per_layer_and_the_hyper_parameters(tmp_path):
    run_dir = tmp_path / "my_sweep" / "model=convit_micro,seed=3"
    row = run_training(compose_train(*QUICK, "model=convit_micro", "seed=3", "data.fraction=0.5"), run_dir)
    parts = read_vdl(RunFolder(run_dir).vdl)
    heads = [f"head_{h:02d}" for h in range(4)]
    assert sorted(parts) == sorted(["train", "val", *heads])
    for part, (name, *_) in parts.items():  # relative, meaningful, one per part
        assert name == f"model=convit_micro,seed=3 (my_sweep) · {part.replace('_', ' ')}"
    train, val = parts["train"][1], parts["val"][1]
    # the same tags in train and val: one chart each for loss and top-1, the group sorting first
    assert set(train) == {"classification/loss", "classification/top1", "schedule/lr", "speed/img_per_s"}
    assert {"classification/loss", "classification/top1", "classification/top5"} <= set(val)
    assert min(tag.split("/")[0] for tag in [*train, *val, *parts["head_00"][1]]) == "classification"
    assert not any("train_" in tag or "val_" in tag for tag in [*train, *val])
    metrics = read_csv(RunFolder(run_dir).metrics)
    assert [step for step, _ in train["classification/loss"]] == [int(m["epoch"]) for m in metrics]
    assert [v for _, v in val["classification/top1"]] == pytest.approx(
        [float(m["val_top1"]) for m in metrics if m["val_top1"]])
    # a chart per layer, a line (a head's folder) per head: every GPSA layer's gate, every layer's nonlocality
    locality = read_csv(RunFolder(run_dir).locality)
    layers = sorted({int(r["layer"]) for r in locality})
    gated = sorted({int(r["layer"]) for r in locality if r["gate"] != "nan"})
    for head in heads:
        tags = parts[head][1]
        assert sorted(tags) == sorted([f"gate/layer_{layer:02d}" for layer in gated] +
                                      [f"nonlocality/layer_{layer:02d}" for layer in layers])
    assert gated and len(gated) < len(layers)
    # the hyper-parameter view: the knobs, seed, fraction, epochs and passes, best and final top-1
    name, scalars, hparams, hparam_metrics = parts["val"]
    assert hparam_metrics == ["result/best_top1", "result/final_top1"]
    assert scalars["result/best_top1"][-1][1] == pytest.approx(float(row["best_top1"]))
    assert scalars["result/final_top1"][-1][1] == pytest.approx(float(row["top1"]))
    assert list(hparams)[:6] == ["run", "model", "fraction", "seed", "epochs", "passes"]
    assert {"run": "model=convit_micro,seed=3 (my_sweep)", "model": "convit_micro", "seed": 3, "fraction": 0.5, "epochs": 2, "passes": 4,
            "locality_strength": 1.0, "local_up_to_layer": 5}.items() <= hparams.items()
    assert set(tables.KNOBS) - {"epochs", "study", "ablation"} <= set(hparams)  # study, ablation: unset here
    assert not any(parts[p][2] for p in parts if p != "val")


def test_a_hash_named_job_is_shown_by_its_overrides(tmp_path):
    from convitlab.engine.recorder import run_name

    folder = RunFolder(tmp_path / "sweep" / "overrides-0123456789abcdef")
    folder.path.mkdir(parents=True)
    assert run_name(folder) == "overrides-0123456789abcdef (sweep)"
    folder.job_overrides.write_text("model=convit_micro,seed=0\n")
    assert run_name(folder) == "model=convit_micro,seed=0 (sweep)"
