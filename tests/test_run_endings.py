"""How runs begin and end, through the real entry points: an absurd plan is refused before any
work, a warm-up as long as the run is named, a single run closes with its outcome and what to
run next, and eval.py refuses a head that does not fit, writes under outputs/eval/ and leaves a
failed result.csv when it fails."""

import pytest
from helpers import EVAL, QUICK, TRAIN, read_csv, run

from convitlab.models import create_model
from convitlab.models.weights import save_pdparams

MICRO_DIGITS = ["model=convit_micro"]  # digits: 8x8 grey images, patch 2, 10 classes (the defaults)


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def test_a_plan_of_more_passes_than_allowed_is_refused_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(TRAIN + ["debug=fast", "data.fraction=1e-9", "data.batch_size=4", f"hydra.run.dir={run_dir}"],
               cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert line.startswith("error: schedule.epochs=1 full-data epochs at data.fraction=1e-09 make "
                           "1,000,000,000 passes") and "more than the 1,000,000 allowed" in line, line
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.csv").exists()
    (row,) = read_csv(run_dir / "result.csv")
    assert row["status"] == "failed" and "1,000,000,000 passes" in row["error"]
    assert (row["model"], row["fraction"], row["seed"]) == ("convit_micro", "1e-09", "0") and row["config_hash"]
    # Counting passes instead: the same plan is 1 pass, and runs.
    proc = run(TRAIN + ["debug=fast", "data.fraction=1e-9", "data.batch_size=4", "schedule.scale_epochs=false",
                        f"hydra.run.dir={tmp_path / 'passes'}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_csv(tmp_path / "passes" / "result.csv")[0]["epochs"] == "1"


@pytest.mark.slow
def test_a_single_run_closes_with_its_outcome_and_the_commands_that_apply(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(TRAIN + QUICK + ["data.fraction=0.5", "model.locality_strength=0.5", f"hydra.run.dir={run_dir}"],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = read_csv(run_dir / "result.csv")
    # schedule.epochs=2 with the default 2 warm-up epochs: named in one line
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "warmup_epochs" in line]
    assert len(warnings) == 1 and "schedule.warmup_epochs=2 is not less than schedule.epochs=2" in warnings[0]
    closing = proc.stdout.strip().splitlines()[-4:]
    assert closing[0] == (f"completed: convit_micro on digits (data.fraction=0.5), top-1 {float(row['top1']):.2f}% "
                          f"at the end, best {float(row['best_top1']):.2f}% after epoch {row['best_epoch']} of "
                          f"{row['epochs']}; trained for " + closing[0].split("; trained for ", 1)[1])
    assert ", this command took " in closing[0] and closing[0].endswith(" s")
    assert closing[1] == f"run directory: {run_dir}"
    assert closing[2].startswith(f"compare: python src/compare.py {run_dir} ")
    assert closing[3] == f"evaluate its best weights: python src/eval.py run={run_dir} [data.root=<elsewhere>]"
    # The printed evaluation scores the run's best weights with its model and data (its
    # locality_strength, which eval's defaults do not have); a model.*/data.* key given wins.
    out = tmp_path / "evaluated"
    proc = run(EVAL + [f"run={run_dir}", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (evaluated,) = read_csv(out / "result.csv")
    assert evaluated["kind"] == "eval" and float(evaluated["top1"]) == float(row["best_top1"])
    assert (evaluated["locality_strength"], evaluated["fraction"]) == ("0.5", "0.5")
    assert evaluated["pretrained"] == str(run_dir / "checkpoints" / "best.pdparams")
    proc = run(EVAL + [f"run={run_dir}", "data.eval_batch_size=7", f"hydra.run.dir={tmp_path / 'again'}"],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_csv(tmp_path / "again" / "result.csv")[0]["top1"] == evaluated["top1"]
    # Started again, the finished run is not retrained, and says how long it trained.
    again = run(TRAIN + QUICK + ["data.fraction=0.5", "model.locality_strength=0.5", f"hydra.run.dir={run_dir}"],
                cwd=tmp_path)
    assert again.returncode == 0 and "not retrained" in again.stdout + again.stderr
    assert again.stdout.strip().splitlines()[-4].split("; trained for ")[1].startswith(
        closing[0].split("; trained for ")[1].split(",")[0])


def test_eval_of_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    proc = run(EVAL + [f"run={tmp_path}", f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert last_line(proc.stderr) == (f"error: run='{tmp_path}' is not a training run's folder: it holds no "
                                      "config.yaml (give the folder train.py printed as its run directory)")
    proc = run(EVAL + [f"hydra.run.dir={tmp_path / 'out2'}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and last_line(proc.stderr).startswith("error: ckpt=<file> is required")


def test_eval_refuses_a_head_that_does_not_fit_and_records_the_failure_under_outputs_eval(tmp_path):
    five = save_pdparams(create_model("convit_micro", num_classes=5), tmp_path / "five.pdparams")
    proc = run(EVAL + MICRO_DIGITS + [f"ckpt={five}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert line.startswith("error: checkpoint's head is for 5 classes") and "model's for 10" in line, line
    assert "Traceback" not in proc.stderr and "top-1" not in proc.stdout
    assert not (tmp_path / "outputs" / "runs").exists()  # never among the training runs
    (folder,) = (tmp_path / "outputs" / "eval").iterdir()
    (row,) = read_csv(folder / "result.csv")
    assert (row["kind"], row["status"], row["top1"]) == ("eval", "failed", "")
    assert row["error"] == line.removeprefix("error: ") and row["pretrained"] == str(five)

    ten = save_pdparams(create_model("convit_micro"), tmp_path / "ten.pdparams")
    proc = run(EVAL + MICRO_DIGITS + [f"ckpt={ten}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "outputs" / "eval").iterdir())) == 2
    assert not (tmp_path / "outputs" / "runs").exists()


def test_eval_with_no_checkpoint_file_is_one_line_and_a_failed_row(tmp_path):
    proc = run(EVAL + MICRO_DIGITS + [f"ckpt={tmp_path / 'missing.pdparams'}",
                                      f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "does not exist" in last_line(proc.stderr)
    (row,) = read_csv(tmp_path / "out" / "result.csv")
    assert row["status"] == "failed" and "does not exist" in row["error"] and row["kind"] == "eval"
