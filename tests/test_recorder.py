"""The result row comes from the loop's state (LoopState, kept in every checkpoint), not from
re-reading metrics.csv: it agrees with the rows the Recorder wrote, also after a resume that has
no epoch left to train and when a run diverges between evaluations."""
from helpers import QUICK, compose_train, read_csv

from convitlab.engine import trainer
from convitlab.run.launch import run_training
from convitlab.core.layout import RunFolder

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
