"""Training end to end: through the real entry point (subprocess) and through the compose API."""
import time

import pytest
from builders import make_image_folder, write_fake_cifar
from helpers import EVAL, QUICK, TRAIN, compose_train, kill_after_checkpoint, read_csv, run, trained, without_timings


def test_entry_point_writes_every_output(tiny_run):
    run_dir = tiny_run  # TRAIN + QUICK
    result = read_csv(run_dir / "result.csv")
    assert len(result) == 1 and result[0]["status"] == "completed"
    row = result[0]
    assert row["model"] == "convit_micro" and row["dataset"] == "digits" and row["epochs"] == "2"
    assert int(row["params"]) == 301_038 and int(row["flops"]) > 0
    assert 0 <= float(row["top1"]) <= 100 and row["paddle_version"] and row["config_hash"]
    metrics = read_csv(run_dir / "metrics.csv")
    assert [m["epoch"] for m in metrics] == ["1", "2"]
    locality = read_csv(run_dir / "locality.csv")
    assert len(locality) == 2 * 6 * 4  # epochs x layers x heads
    subset = read_csv(run_dir / "subset.csv")
    assert len(subset) > 1000  # fraction 1: the whole training split
    assert (run_dir / "checkpoints" / "epoch_0002" / "model.pdparams").is_file()
    assert (run_dir / "checkpoints" / "best.pdparams").is_file()
    assert any((run_dir / "vdl").iterdir())
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_compose_api_run_and_fraction(tmp_path):
    from convitlab.run.launch import run_training
    cfg = compose_train(*QUICK, "data.fraction=0.1", "model=deit_micro", "seed=3")
    row = run_training(cfg, tmp_path)
    assert row["status"] == "completed" and row["model"] == "deit_micro" and row["fraction"] == 0.1
    subset = read_csv(tmp_path / "subset.csv")
    labels = [r["label"] for r in subset]
    assert set(labels) == {str(c) for c in range(10)}
    assert len(subset) <= 0.1 * 1437 + 10


def test_finished_run_is_reported_not_retrained_and_other_config_refused(tmp_path, tiny_run):
    run_dir = tiny_run  # TRAIN + QUICK, finished
    before = (run_dir / "metrics.csv").read_text()
    start = time.time()
    again = run(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert again.returncode == 0 and "not retrained" in again.stdout + again.stderr
    assert time.time() - start < 60
    assert (run_dir / "metrics.csv").read_text() == before
    other = run(TRAIN + QUICK + [f"hydra.run.dir={run_dir}", "seed=7"], cwd=tmp_path)
    assert other.returncode == 2
    assert "holds a run of another config" in other.stderr and "Traceback" not in other.stderr
    assert read_csv(run_dir / "result.csv")[0]["status"] == "completed"  # untouched


@pytest.mark.timeout(600)  # three runs of 4 epochs
@pytest.mark.slow
@pytest.mark.parametrize("ema", [False, True])
def test_killed_run_resumes_to_the_same_metrics(tmp_path, ema):
    """SIGKILL after the second checkpoint, start again: metrics equal an uninterrupted run (with EMA
    on, the evaluated weights are the EMA's, so its state must come back too)."""
    args = ["schedule.epochs=4", "trainer.max_steps_per_epoch=4", "data.batch_size=32",
            "trainer.locality_batch_size=16", "trainer.progress_bar=false", "model.drop_path_rate=0.1",
            "data.augment.mixup=0.8", "data.augment.cutmix=1.0"]
    args += ["trainer.ema=true", "trainer.ema_decay=0.5"] if ema else []
    straight = trained(tmp_path / "straight", args)

    killed = tmp_path / "killed"
    kill_after_checkpoint(TRAIN + args + [f"hydra.run.dir={killed}"], killed, cwd=tmp_path)
    assert not (killed / "result.csv").exists()
    resumed = run(TRAIN + args + [f"hydra.run.dir={killed}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert without_timings(read_csv(killed / "metrics.csv")) == without_timings(read_csv(straight / "metrics.csv"))
    assert read_csv(killed / "locality.csv") == read_csv(straight / "locality.csv")


def test_damaged_checkpoint_is_reported_in_one_line(tmp_path, tiny_run):
    run_dir = tiny_run  # finished by args
    args = TRAIN + QUICK + [f"hydra.run.dir={run_dir}"]
    (run_dir / "result.csv").unlink()  # make it look unfinished
    model = run_dir / "checkpoints" / "epoch_0002" / "model.pdparams"
    model.write_bytes(model.read_bytes()[:100])
    proc = run(args, cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "epoch_0002 is damaged" in line and "trainer.resume=false" in line and "epoch_0001" in line
    assert "Traceback" not in proc.stderr
    fresh = run(args + ["trainer.resume=false"], cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]


def test_divergence_stops_with_status_diverged(tmp_path, monkeypatch):
    from convitlab.engine import trainer
    from convitlab.run.launch import run_training

    real = trainer.soft_target_cross_entropy
    calls = {"n": 0}

    def loss_that_explodes(logits, targets):  # finite for the first epoch (3 steps), then NaN
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(trainer, "soft_target_cross_entropy", loss_that_explodes)
    row = run_training(compose_train(*QUICK, "schedule.epochs=3"), tmp_path)
    assert row["status"] == "diverged" and "epoch 2" in row["error"]
    assert read_csv(tmp_path / "result.csv")[0]["status"] == "diverged"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["epoch_0001"]


def test_same_config_and_seed_give_the_same_metrics(tmp_path):
    from convitlab.run.launch import run_training
    for name in ("a", "b"):
        run_training(compose_train(*QUICK, "model.drop_path_rate=0.1"), tmp_path / name)
    a, b = (without_timings(read_csv(tmp_path / n / "metrics.csv")) for n in ("a", "b"))
    assert a == b


@pytest.mark.parametrize("ema", [False, True])
def test_eval_of_a_saved_checkpoint(tmp_path, ema, request):
    """best.pdparams holds the weights that scored best_top1 (the EMA's when EMA is on)."""
    if ema:
        run_dir = tmp_path / "run"
        extra = ["trainer.ema=true", "trainer.ema_decay=0.5"]
        assert run(TRAIN + QUICK + extra + [f"hydra.run.dir={run_dir}"], cwd=tmp_path).returncode == 0
    else:
        run_dir = request.getfixturevalue("tiny_run")  # TRAIN + QUICK
    trained = read_csv(run_dir / "result.csv")[0]
    out = tmp_path / "eval"
    proc = run(EVAL + [f"ckpt={run_dir}/checkpoints/best.pdparams", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    evaluated = read_csv(out / "result.csv")[0]
    assert float(evaluated["top1"]) == pytest.approx(float(trained["best_top1"]), abs=1e-6)
    wrong = run(EVAL + [f"ckpt={run_dir}/checkpoints/best.pdparams", "model=deit_micro",
                        f"hydra.run.dir={tmp_path / 'wrong'}"], cwd=tmp_path)
    assert wrong.returncode == 2 and "does not fit the model" in wrong.stderr


# Bad input through the real entry point: (overrides, text the one-line error must contain)
BAD_INPUT = [
    (["data.fraction=0"], "data.fraction=0.0 is not allowed"),
    (["data.fraction=1.2"], "data.fraction=1.2 is not allowed"),
    (["schedule.epochs=0"], "schedule.epochs=0 is not allowed"),
    (["data.batch_size=0"], "data.batch_size=0 is not allowed"),
    (["data.img_size=9"], "data.img_size=9 is not allowed"),
    (["model.local_up_to_layer=9"], "model.local_up_to_layer=9 is not allowed"),
    (["model.num_classes=12"], "model.num_classes=12 is not allowed: the data's classes (data.num_classes=10)"),
    (["data.num_classes=12"], "data.num_classes=12 does not match"),
    (["data.fraction=0.01", "data.batch_size=64"], "data.batch_size=64"),
    (["data=cifar10", "data.root=/nonexistent"], "cifar-10-python.tar.gz"),
    (["data=imagefolder", "data.root=/nonexistent"], "/nonexistent"),
]


@pytest.mark.parametrize("overrides,expected", BAD_INPUT)
def test_bad_input_is_one_line_and_nonzero(tmp_path, overrides, expected):
    run_dir = tmp_path / "run"
    proc = run(TRAIN + ["trainer.progress_bar=false", f"hydra.run.dir={run_dir}"] + overrides, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last
    assert not (run_dir / "checkpoints").exists()
    result = read_csv(run_dir / "result.csv")
    assert result[0]["status"] == "failed"  # recorded as failed, never as complete


def test_unknown_group_option_fails_at_composition(tmp_path):
    for override in ("model=convit_huge", "data=mnist", "optimizer=lamb", "schedule=step"):
        proc = run(TRAIN + [override], cwd=tmp_path)
        assert proc.returncode != 0 and "Could not find" in proc.stderr, override


def test_cifar_and_image_folder_runs_through_the_entry_point(tmp_path, cifar10_archive, image_folder):
    """The real archive and folder formats, made small here, trained end to end."""
    cifar = run(TRAIN + QUICK + ["data=cifar10", f"data.root={cifar10_archive}", "data.checksum=false",
                                 "data.img_size=16", "data.batch_size=8", "data.num_workers=0",
                                 f"hydra.run.dir={tmp_path / 'c'}"], cwd=tmp_path)
    assert cifar.returncode == 0, cifar.stderr[-2000:]
    row = read_csv(tmp_path / "c" / "result.csv")[0]
    assert row["status"] == "completed" and row["dataset"] == "cifar10" and row["img_size"] == "16"
    assert len(read_csv(tmp_path / "c" / "subset.csv")) == 30  # every image of the fake archive's 5 batches

    folder = run(TRAIN + QUICK + ["data=imagefolder", f"data.root={image_folder}", "data.num_classes=2",
                                  "data.img_size=16", "data.batch_size=2", "data.num_workers=0",
                                  f"hydra.run.dir={tmp_path / 'f'}"], cwd=tmp_path)
    assert folder.returncode == 0, folder.stderr[-2000:]
    assert read_csv(tmp_path / "f" / "result.csv")[0]["status"] == "completed"


def test_bad_data_files_fail_in_one_line(tmp_path):
    """Corrupt or incomplete data through the entry point: one line naming the file, status failed."""
    write_fake_cifar(tmp_path / "cifar", "cifar10")  # not the official bytes: its MD5 differs
    empty = make_image_folder(tmp_path / "empty")
    (empty / "train" / "bird").mkdir()
    broken = make_image_folder(tmp_path / "broken")
    (broken / "train" / "cat" / "zz.png").write_bytes(b"not a PNG")
    folder = ["data=imagefolder", "data.num_classes=2", "data.img_size=16", "data.batch_size=2", "data.num_workers=0"]
    cases = [(["data=cifar10", f"data.root={tmp_path / 'cifar'}"], "data.checksum=false"),
             ([*folder, f"data.root={empty}"], str(empty / "train" / "bird")),
             ([*folder, f"data.root={broken}"], str(broken / "train" / "cat" / "zz.png"))]
    for index, (overrides, expected) in enumerate(cases):
        run_dir = tmp_path / f"run{index}"
        proc = run(TRAIN + QUICK + overrides + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and expected in last, last
        assert read_csv(run_dir / "result.csv")[0]["status"] == "failed"


def test_hydra_command_line_tools(tmp_path):
    job = run(TRAIN + ["--cfg", "job", "model=deit_micro"], cwd=tmp_path)
    assert job.returncode == 0 and "name: deit_micro" in job.stdout and "fraction: 1.0" in job.stdout
    info = run(TRAIN + ["--info", "defaults"], cwd=tmp_path)
    assert info.returncode == 0 and "model/convit_micro" in info.stdout
    helped = run(TRAIN + ["--help"], cwd=tmp_path)
    assert helped.returncode == 0 and "experiment: " in helped.stdout and "sample_efficiency" in helped.stdout
