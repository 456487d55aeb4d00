"""README's Troubleshooting rows not tested elsewhere, through `python src/train.py`: each bad
input ends with exactly one line on stderr naming it and what is allowed, exit code 2, and no
traceback (the value rows are in test_train.py's BAD_INPUT, the data files in test_data.py)."""
import os
import sys
from pathlib import Path

import pytest
from helpers import EVAL, ROOT, TRAIN, read_csv, run

QUICK = ["schedule.epochs=1", "trainer.max_steps_per_epoch=1", "data.batch_size=16", "trainer.locality_batch_size=8",
         "trainer.progress_bar=false"]
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # also on a GPU machine: Paddle sees none


def run_without_gpu(command, cwd, timeout=300):
    return run(command, cwd, timeout, env=NO_GPU)


def assert_one_line(proc, *expected):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("error: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]


# (overrides, texts the line must contain, whether the run directory gets a failed result.csv)
BAD_INPUT = [
    # no GPU: what is missing and the CPU alternative; found after composition, so recorded as failed
    (["trainer.device=gpu"], ["trainer.device='gpu'", "no usable GPU", "trainer.device=auto|cpu"], True),
    (["trainer.amp=fp16"], ["trainer.amp='fp16' needs a GPU", "trainer.amp=off"], True),
    (["trainer.amp=bf16"], ["trainer.amp='bf16' needs a GPU", "trainer.amp=off"], True),
    # composition errors: before any run directory exists, so nothing is written
    (["trainer.epoch=3"], ["trainer.epoch is not a config key", "did you mean schedule.epochs?",
                           "the keys of trainer are device, amp"], False),
    (["optimizer.lrr=1"], ["optimizer.lrr is not a config key", "did you mean optimizer.lr?"], False),
    (["model.locality_strenght=1"], ["did you mean model.locality_strength?"], False),
    (["optimizer.lr=abc"], ["optimizer.lr='abc' is not allowed: a number"], False),
    (["data.batch_size=many"], ["data.batch_size='many' is not allowed: an int"], False),
    (["trainer.save_best=maybe"], ["trainer.save_best='maybe' is not allowed: true or false"], False),
    (["data.subset_seed=x"], ["data.subset_seed='x' is not allowed: an int or null"], False),
    (["model=convit_huge"], ["Could not find 'model/convit_huge'", "model is one of convit_base", "deit_tiny"], False),
    (["optimizer=lamb"], ["Could not find 'optimizer/lamb'", "optimizer is one of adam, adamw, sgd"], False),
    (["trainer.device=tpu"], ["trainer.device='tpu' is not allowed: one of auto, cpu, gpu"], False),
    (["data.subset=last"], ["data.subset='last' is not allowed: one of random, first"], False),
    # `+key=` composes (Hydra's own message suggests it): the schema check refuses it, recorded as failed
    (["+trainer.epoch=3"], ["trainer.epoch is not a config key", "did you mean schedule.epochs?"], True),
]


@pytest.mark.parametrize("overrides,expected,recorded", BAD_INPUT)
def test_bad_input_through_train_py_is_one_line_exit_2(tmp_path, overrides, expected, recorded):
    run_dir = tmp_path / "run"
    proc = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"] + overrides, cwd=tmp_path)
    assert_one_line(proc, *expected)
    assert not (run_dir / "checkpoints").exists()
    if recorded:
        assert read_csv(run_dir / "result.csv")[0]["status"] == "failed"
    else:
        assert not run_dir.exists()


def test_eval_py_reports_composition_errors_in_one_line_too(tmp_path):
    proc = run_without_gpu(EVAL + ["ckpt=none.pdparams", "data.batch_size=many", f"hydra.run.dir={tmp_path / 'eval'}"],
               cwd=tmp_path)
    assert_one_line(proc, "data.batch_size='many' is not allowed: an int")


def test_a_sweep_with_a_bad_value_is_refused_in_one_line_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_without_gpu(TRAIN + ["-m", "optimizer.lr=1e-3,abc", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert_one_line(proc, "optimizer.lr='abc' is not allowed: a number")
    assert [p.name for p in sweep.iterdir()] == ["multirun.yaml"]  # Hydra's record of the sweep, no job


@pytest.mark.slow
def test_a_resume_with_another_number_of_ranks_is_one_line(tmp_path):
    """A checkpoint written by 2 CPU ranks (paddle.distributed.launch, as test_distributed.py),
    resumed by one process: refused before training, in one line."""
    run_dir = tmp_path / "run"
    # The real environment: Paddle's launcher fails on an empty CUDA_VISIBLE_DEVICES.
    launch = run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                  "--log_dir", str(tmp_path / "logs"), str(ROOT / "src" / "train.py"), *QUICK,
                  f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert launch.returncode == 0, (launch.stdout + launch.stderr)[-3000:]
    (run_dir / "result.csv").unlink()  # as if killed after its last checkpoint
    proc = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert_one_line(proc, "checkpoints/epoch_0001 was written by 2 rank(s), this run has 1",
                    "resume with the same number of ranks", "trainer.resume=false")
    assert read_csv(run_dir / "result.csv")[0]["status"] == "failed"


# --- issue 24: inputs and faults that once ended in a traceback, a misleading line or wrong data ----

def only_line(proc) -> str:
    """The one line of stderr, after asserting the contract: exit 2, one line, no traceback."""
    assert_one_line(proc)
    return proc.stderr.strip()


@pytest.mark.parametrize("override, key", [("seed=-1", "seed"), ("seed=4294967296", "seed"),
                                           ("data.subset_seed=-3", "data.subset_seed"),
                                           ("data.split_seed=-1", "data.split_seed")])
def test_seeds_are_range_checked_in_the_schema(tmp_path, override, key):
    run_dir = tmp_path / "run"
    proc = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}", override], cwd=tmp_path)
    value = override.split("=")[1]
    allowed = "an int in 0..4294967295" + (" or null" if key == "data.subset_seed" else "")
    assert only_line(proc) == f"error: {key}={value} is not allowed: {allowed}"
    assert read_csv(run_dir / "result.csv")[0]["status"] == "failed"
    assert not (run_dir / "run.json").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("bad, expected", [
    (["seed=-1"], "error: seed=-1 is not allowed: an int in 0..4294967295"),
    # found while the data is built, after the directory was marked as this config's
    (["data.fraction=0.01", "data.batch_size=64"], "error: data.batch_size=64 is more than the ")])
def test_a_run_that_fails_its_checks_leaves_its_directory_to_the_corrected_command(tmp_path, bad, expected):
    run_dir = tmp_path / "run"
    quick = [o for o in QUICK if not o.startswith("data.batch_size=")]
    proc = run_without_gpu(TRAIN + quick + [f"hydra.run.dir={run_dir}", *bad], cwd=tmp_path)
    assert only_line(proc).startswith(expected)
    assert read_csv(run_dir / "result.csv")[0]["status"] == "failed" and not (run_dir / "checkpoints").exists()
    corrected = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert corrected.returncode == 0, corrected.stderr[-2000:]
    assert read_csv(run_dir / "result.csv")[0]["status"] == "completed"
    assert [row["epoch"] for row in read_csv(run_dir / "metrics.csv")] == ["1"]


def test_a_diverged_run_exits_2_with_one_line_and_so_does_its_report(tmp_path):
    """optimizer.lr=1e8 makes the tiny model's loss NaN in its second epoch (the sweep case, which
    carries on: test_checkpoint_integrity.py)."""
    run_dir = tmp_path / "run"
    command = TRAIN + ["debug=fast", "schedule.epochs=2", "optimizer.lr=1e8", f"hydra.run.dir={run_dir}"]
    for attempt in ("trained", "reported"):
        proc = run_without_gpu(command, cwd=tmp_path)
        line = only_line(proc)
        assert line.startswith(f"error: run in {run_dir} diverged (training loss became nan in epoch 2"), line
        assert line.endswith("lower optimizer.lr or set trainer.grad_clip, then run again in another hydra.run.dir "
                             "or with trainer.resume=false"), line
        assert read_csv(run_dir / "result.csv")[0]["status"] == "diverged"
        assert [row["epoch"] for row in read_csv(run_dir / "metrics.csv")] == ["1"]
    assert "not retrained" in proc.stdout


def _not_a_folder(tmp_path, kind):
    """A path where a run directory cannot be: (the path, what the line says about it)."""
    if kind == "file":
        (tmp_path / "taken").write_text("mine")
        return tmp_path / "taken", f"{tmp_path / 'taken'} is a file"
    if kind == "file as a parent":
        (tmp_path / "taken").write_text("mine")
        return tmp_path / "taken" / "run", f"{tmp_path / 'taken' / 'run'}: {tmp_path / 'taken'} is a file"
    if kind == "dangling symlink":
        (tmp_path / "link").symlink_to(tmp_path / "gone")
        return tmp_path / "link", f"{tmp_path / 'link'} is a symbolic link to {tmp_path / 'gone'}, which does not exist"
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    return tmp_path / "a", f"{tmp_path / 'a'} is a symbolic link loop (-> {tmp_path / 'b'})"


@pytest.mark.parametrize("kind", ["file", "file as a parent", "dangling symlink", "symlink loop"])
def test_a_run_directory_that_cannot_be_a_folder_is_one_line(tmp_path, kind):
    run_dir, says = _not_a_folder(tmp_path, kind)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    way_out = {"dangling symlink": "create that folder, or choose another hydra.run.dir",
               "symlink loop": "choose another hydra.run.dir, or replace the link"}.get(
                   kind, "choose another hydra.run.dir, or move it away")
    assert only_line(proc) == f"error: run directory {says}: {way_out}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created, nothing changed
    if "file" in kind:
        assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("too_long", ["name", "path"])
def test_a_run_directory_name_or_path_too_long_is_refused_before_training(tmp_path, too_long):
    if too_long == "name":
        run_dir = tmp_path / ("n" * 256)
        expected = "has a folder name of 256 bytes ("
        allowed = "): at most 255 are allowed there: choose another hydra.run.dir, with shorter names"
    else:  # short enough to be created, too long for the files of a checkpoint inside it
        run_dir = tmp_path.joinpath(*["d" * 200] * 20)
        run_dir = Path(str(run_dir)[:4060].rstrip("/"))
        expected = f"is a path of {len(str(run_dir))} bytes: at most 3995 are allowed"
        allowed = "choose another hydra.run.dir, shorter"
    proc = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    line = only_line(proc)
    assert line.startswith("error: run directory /") and expected in line and line.endswith(allowed), line
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def read_only_disk(tmp_path, tiny_run):
    """tmp_path/disk: a real read-only file system (a tmpfs remounted ro: needs root) holding a copy
    of the finished tiny run as disk/done."""
    import shutil
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], timeout=30).returncode:
        pytest.skip("mounting a file system needs root (and a kernel that lets this process mount)")
    try:
        shutil.copytree(tiny_run, disk / "done", symlinks=True)
        assert run(["mount", "-o", "remount,ro", str(disk)], timeout=30).returncode == 0
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], timeout=30, check=False)


def files_under(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*"))


@pytest.mark.parametrize("case", ["new run", "finished run again", "eval"])
def test_a_run_directory_on_a_read_only_file_system_is_one_line(tmp_path, read_only_disk, tiny_run, case):
    before = files_under(read_only_disk)
    if case == "eval":
        run_dir = read_only_disk / "eval"
        proc = run_without_gpu(EVAL + [f"ckpt={tiny_run / 'checkpoints' / 'best.pdparams'}",
                                       f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    else:
        run_dir = read_only_disk / ("new" if case == "new run" else "done")
        proc = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    kept = " (its result.csv says completed: read it where it is)" if case == "finished run again" else ""
    assert only_line(proc) == (f"error: cannot write in run directory {run_dir} (Read-only file system){kept}: "
                               "choose a hydra.run.dir on a file system you can write to")
    assert files_under(read_only_disk) == before
