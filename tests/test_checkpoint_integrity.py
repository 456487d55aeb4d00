"""What a run's checkpoints promise: best.pdparams is the best epoch's EMA, a checkpoint is whole or
refused (state.json included), a half-written one is ignored, and a divergence is recorded and final."""
import json
import math
import shutil

import numpy as np
import paddle
import pytest
from helpers import EVAL, QUICK, TRAIN, compose_train, read_csv, run, without_timings

# 3 steps an epoch on digits, every checkpoint kept: a few seconds a run.
SHORT = [*(o for o in QUICK if not o.startswith("schedule.epochs=")), "trainer.keep_checkpoints=3"]


def one_line_error(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


# --- EMA through the trainer ----------------------------------------------------------------------

def test_best_pdparams_is_the_best_epochs_ema_and_eval_reproduces_its_val_loss(tmp_path):
    run_dir = tmp_path / "run"
    ema_on = ["trainer.ema=true", "trainer.ema_decay=0.5"]
    proc = run(TRAIN + SHORT + ["schedule.epochs=3", *ema_on, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = read_csv(run_dir / "result.csv")[0]
    best_epoch = int(result["best_epoch"])
    checkpoint = run_dir / "checkpoints" / f"epoch_{best_epoch:04d}"
    best, ema, raw = (paddle.load(str(path)) for path in (run_dir / "checkpoints" / "best.pdparams",
                                                           checkpoint / "ema.pdparams", checkpoint / "model.pdparams"))
    assert best.keys() == ema.keys() == raw.keys()
    for name in best:  # bit for bit, dtype included
        assert best[name].dtype == ema[name].dtype and np.array_equal(best[name].numpy(), ema[name].numpy()), name
    assert any(not np.array_equal(best[name].numpy(), raw[name].numpy()) for name in best)

    out = tmp_path / "eval"
    evaluated = run(EVAL + [f"ckpt={run_dir / 'checkpoints' / 'best.pdparams'}", f"hydra.run.dir={out}"],
                    cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    recorded = next(r for r in read_csv(run_dir / "metrics.csv") if int(r["epoch"]) == best_epoch)
    row = read_csv(out / "result.csv")[0]
    assert float(row["final_val_loss"]) == pytest.approx(float(recorded["val_loss"]), rel=1e-6)
    assert float(row["top1"]) == pytest.approx(float(recorded["val_top1"]), abs=1e-9)


# --- checkpoint integrity -------------------------------------------------------------------------

def test_an_edited_state_json_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    args = TRAIN + SHORT + ["schedule.epochs=2", f"hydra.run.dir={run_dir}"]
    assert run(args, cwd=tmp_path).returncode == 0
    (run_dir / "result.csv").unlink()  # make it look unfinished
    state_file = run_dir / "checkpoints" / "epoch_0002" / "state.json"
    state = json.loads(state_file.read_text())
    state["best_top1"] = 100.0  # still valid JSON, still the files' checksums: only the loop state is wrong
    state_file.write_text(json.dumps(state, indent=1))
    line = one_line_error(run(args, cwd=tmp_path))
    assert "epoch_0002 is damaged" in line and "state.json does not match its checksum" in line, line
    assert "trainer.resume=false" in line and "epoch_0001" in line, line


def test_a_half_written_checkpoint_is_ignored_and_the_run_resumes_to_the_same_metrics(tmp_path):
    """As a crash while epoch 3's checkpoint is built leaves it: its rows in metrics.csv, a partial
    .tmp-epoch_0003/, no epoch_0003/, no result.csv."""
    run_dir = tmp_path / "run"
    args = TRAIN + SHORT + ["schedule.epochs=3", "model.drop_path_rate=0.1", f"hydra.run.dir={run_dir}"]
    assert run(args, cwd=tmp_path).returncode == 0
    straight = {name: read_csv(run_dir / name) for name in ("metrics.csv", "locality.csv")}
    checkpoints = run_dir / "checkpoints"
    leftover = checkpoints / ".tmp-epoch_0003"
    leftover.mkdir()
    written = (checkpoints / "epoch_0003" / "model.pdparams").read_bytes()
    (leftover / "model.pdparams").write_bytes(written[:len(written) // 2])
    shutil.rmtree(checkpoints / "epoch_0003")
    (run_dir / "result.csv").unlink()

    proc = run(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from {checkpoints / 'epoch_0002'}" in proc.stdout + proc.stderr
    assert not leftover.exists() and (checkpoints / "epoch_0003" / "state.json").is_file()
    assert without_timings(read_csv(run_dir / "metrics.csv")) == without_timings(straight["metrics.csv"])
    assert read_csv(run_dir / "locality.csv") == straight["locality.csv"]
    assert read_csv(run_dir / "result.csv")[0]["status"] == "completed"


def test_an_infinite_loss_stops_with_status_diverged(tmp_path, monkeypatch):
    from convitlab.engine import trainer
    from convitlab.run.launch import run_training

    real = trainer.soft_target_cross_entropy
    calls = {"n": 0}

    def loss_infinite_at_the_last_step_of_epoch_2(logits, targets):  # 3 steps an epoch
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * math.inf if calls["n"] == 6 else loss

    monkeypatch.setattr(trainer, "soft_target_cross_entropy", loss_infinite_at_the_last_step_of_epoch_2)
    row = run_training(compose_train(*SHORT, "schedule.epochs=3"), tmp_path)
    assert row["status"] == "diverged" and "training loss became inf in epoch 2" in row["error"], row
    assert read_csv(tmp_path / "result.csv")[0]["status"] == "diverged"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["epoch_0001"]


def test_a_diverged_sweep_job_leaves_the_others_finished_and_is_not_retrained(tmp_path):
    """A real knob: optimizer.lr=1e8 makes the tiny model's loss NaN in its second epoch."""
    sweep = tmp_path / "sweep"
    command = TRAIN + ["-m", "optimizer.lr=1e-3,1e8,5e-4", "debug=fast", "schedule.epochs=2",
                       f"hydra.sweep.dir={sweep}"]
    first = run(command, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = {float(r["lr"]): r for r in read_csv(sweep / "summary.csv")}
    assert {lr: r["status"] for lr, r in rows.items()} == {1e-3: "completed", 1e8: "diverged", 5e-4: "completed"}
    diverged = read_csv(rows[1e8]["run_dir"] + "/result.csv")[0]
    assert diverged["status"] == "diverged" and "training loss became" in diverged["error"]

    metrics = {lr: (r["run_dir"] + "/metrics.csv") for lr, r in rows.items()}
    before = {lr: open(path).read() for lr, path in metrics.items()}
    again = run(command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert f"run in {rows[1e8]['run_dir']} already diverged" in output
    assert output.count("not retrained") == 3
    assert {lr: open(path).read() for lr, path in metrics.items()} == before
    assert {float(r["lr"]): r["status"] for r in read_csv(sweep / "summary.csv")} == \
        {lr: r["status"] for lr, r in rows.items()}
