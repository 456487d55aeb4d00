"""Sweeps through Hydra's launchers: joblib (parallel jobs sharing one machine), submitit_local
(the cluster path run here, with a preemption and requeue), and our SLURM config."""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ROOT, TRAIN, read_csv, run, started
from hydra import compose, initialize_config_dir

from convitlab.config import register_configs
from convitlab.ops.runtime import available_cores

QUICK = ["debug=fast"]  # 1 epoch of 2 steps of 16 images
register_configs()


def own_overrides(job_name):
    """A job folder's name less the debug preset every job here shares (debug names folders too)."""
    return ",".join(part for part in job_name.split(",") if part not in QUICK)


def job_dir(sweep_dir, overrides):
    """The folder of the job with these overrides (and the shared debug preset)."""
    return next(p for p in sweep_dir.iterdir() if p.is_dir() and own_overrides(p.name) == overrides)


def summary(sweep_dir):
    return {own_overrides(Path(row["run_dir"]).name): row for row in read_csv(sweep_dir / "summary.csv")}


# --- joblib -----------------------------------------------------------------------------------

@pytest.mark.timeout(600)  # the sweep twice
@pytest.mark.slow
def test_joblib_sweep_runs_jobs_in_parallel_survives_a_failure_and_reruns_only_what_is_unfinished(tmp_path):
    sweep = tmp_path / "sweep"
    # data.fraction=0.002 keeps 10 images, fewer than one batch of 16: that job fails.
    command = TRAIN + ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "data.fraction=1.0,0.5,0.002",
                       f"hydra.sweep.dir={sweep}"] + QUICK
    first = run(command, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = summary(sweep)
    assert set(rows) == {"data.fraction=1.0", "data.fraction=0.5", "data.fraction=0.002"}
    assert rows["data.fraction=1.0"]["status"] == rows["data.fraction=0.5"]["status"] == "completed"
    failed = read_csv(job_dir(sweep, "data.fraction=0.002") / "result.csv")
    assert len(failed) == 1 and failed[0]["status"] == "failed"
    assert "data.batch_size=16" in failed[0]["error"] and "\n" not in failed[0]["error"]
    assert rows["data.fraction=0.002"]["status"] == "failed"

    # Each job process gave Paddle its share of the cores (cores // parallel jobs).
    parallel = min(2, available_cores())
    threads = max(1, available_cores() // parallel)
    for job in ("data.fraction=1.0", "data.fraction=0.5"):
        log = (job_dir(sweep, job) / "train.log").read_text()
        shared = re.search(r"job #\d+: (\d+) CPU threads \((\d+) cores shared by (\d+) parallel jobs\)", log)
        assert shared and shared.groups() == (str(threads), str(available_cores()), str(parallel)), log
        assert rows[job]["threads"] == str(threads)

    # The same sweep again: finished jobs are reported, an unfinished one (no result.csv, as if
    # killed) resumes from its checkpoint, the failed one is tried again.
    done = job_dir(sweep, "data.fraction=1.0")
    before = (done / "metrics.csv").read_text(), (done / "metrics.csv").stat().st_mtime_ns
    (job_dir(sweep, "data.fraction=0.5") / "result.csv").unlink()
    failed_mtime = (job_dir(sweep, "data.fraction=0.002") / "result.csv").stat().st_mtime_ns
    time.sleep(0.01)
    again = run(command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert re.search(rf"run in {re.escape(str(done))} already completed .*not retrained", output)
    assert len(re.findall("not retrained", output)) == 1
    assert ((done / "metrics.csv").read_text(), (done / "metrics.csv").stat().st_mtime_ns) == before
    assert f"resuming from {job_dir(sweep, 'data.fraction=0.5') / 'checkpoints'}" in output
    assert (job_dir(sweep, "data.fraction=0.002") / "result.csv").stat().st_mtime_ns != failed_mtime
    rows = summary(sweep)
    assert [rows[j]["status"] for j in ("data.fraction=1.0", "data.fraction=0.5", "data.fraction=0.002")] == \
        ["completed", "completed", "failed"]


# --- submitit ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(TRAIN + ["-m", "hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1",
                        "model=convit_micro,deit_micro", f"hydra.sweep.dir={sweep}"] + QUICK, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = summary(sweep)
    assert set(rows) == {"model=convit_micro", "model=deit_micro"}
    assert all(row["status"] == "completed" for row in rows.values())
    assert {row["model"] for row in rows.values()} == {"convit_micro", "deit_micro"}
    for job, row in rows.items():
        assert "1 CPU threads (hydra.launcher.cpus_per_task)" in (job_dir(sweep, job) / "train.log").read_text()
        assert row["threads"] == "1"
    assert (sweep / ".submitit").is_dir()  # submitit's own files, which the summary leaves out


def submitit_tasks(marker: str) -> list:
    """Pids of the submitit job processes whose command line mentions `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in args and any(marker.encode() in a for a in args):
            pids.append(int(entry))
    return pids


@pytest.mark.timeout(600)  # 8 epochs, requeued once
@pytest.mark.slow
def test_preempted_submitit_job_is_requeued_into_the_same_directory_and_resumes(tmp_path):
    """SLURM signals a job (USR2) before preempting it or at its time limit; submitit then calls
    the launcher's checkpoint(), which resubmits the same job: same overrides, same job dir.
    The local executor does the same with a restart, so the whole path runs here."""
    sweep = tmp_path / "sweep"
    with started(TRAIN + ["-m", "hydra/launcher=submitit_local", "model=convit_micro", f"hydra.sweep.dir={sweep}",
                          "schedule.epochs=8", "trainer.max_steps_per_epoch=8", "data.batch_size=32",
                          "trainer.locality_batch_size=16", "trainer.progress_bar=false"],
                 tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as sweep_proc:
        deadline = time.time() + 180
        while not list(sweep.glob("*/checkpoints/epoch_0002")) and time.time() < deadline:
            time.sleep(0.05)
        (checkpoint,) = sweep.glob("*/checkpoints/epoch_0002")
        job = checkpoint.parents[1]
        tasks = submitit_tasks(str(sweep))
        assert len(tasks) == 1
        os.kill(tasks[0], signal.SIGUSR2)  # what SLURM sends before preemption or the time limit
        out, _ = sweep_proc.communicate(timeout=240)
    assert sweep_proc.returncode == 0, out[-3000:]
    submitit_logs = "".join(p.read_text() for p in sorted((sweep / ".submitit").rglob("*_log.*")))
    assert "this job is preempted" in submitit_logs and "Requeued job" in submitit_logs, submitit_logs[-3000:]
    log = (job / "train.log").read_text()
    assert "resuming from" in log
    assert [m["epoch"] for m in read_csv(job / "metrics.csv")] == [str(e) for e in range(1, 9)]
    assert [r["status"] for r in read_csv(sweep / "summary.csv")] == ["completed"]


def compose_hydra(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_config_composes_with_our_defaults(tmp_path, monkeypatch):
    """hydra/launcher=slurm: the plugin's schema with our values, turned into an sbatch script."""
    import submitit
    from hydra.utils import instantiate

    cfg = compose_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}",
                        "hydra.job.name=train")
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    expected = {"partition": "gpu", "timeout_min": 240, "max_num_timeout": 10, "signal_delay_s": 120, "nodes": 1,
                "tasks_per_node": 1, "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32,
                "array_parallelism": 64}
    assert {key: launcher_cfg[key] for key in expected} == expected
    assert compose_hydra("hydra/launcher=slurm").hydra.launcher.partition is None  # left to the user
    with pytest.raises(Exception, match="cpu_per_task"):  # the plugin's schema checks our keys
        compose_hydra("hydra/launcher=slurm", "hydra.launcher.cpu_per_task=3")

    # What the plugin hands submitit, caught before anything is submitted.
    captured = {}

    def fake_map_array(executor, function, *args):
        captured.update(executor=executor, function=function, args=args)
        return []

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    launcher = instantiate(launcher_cfg)
    launcher.setup(hydra_context=None, task_function=lambda cfg: None, config=cfg)
    assert launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0) == []
    slurm = captured["executor"]._executor
    assert slurm.max_num_timeout == 10
    script = slurm._make_submission_file_text("python job.py", "0")
    for flag in ("--partition=gpu", "--time=240", "--signal=USR2@120", "--cpus-per-task=8", "--gpus-per-node=1",
                 "--ntasks-per-node=1", "--mem=32GB", "--nodes=1", "--job-name=train"):
        assert f"#SBATCH {flag}" in script, flag
    # A requeue resubmits the same call: the launcher itself with the same job arguments.
    job_args = [arg[0] for arg in captured["args"]]
    delayed = launcher.checkpoint(*job_args)
    assert delayed.function is launcher and delayed.args == tuple(job_args)


def test_a_signal_handler_that_exits_runs_between_steps_not_inside_backward():
    """submitit's handler requeues then raises SystemExit; raised inside a PyLayer's backward
    Paddle turns it into an OSError and the job fails instead. Deferred, it runs at the next
    step boundary (run_deferred_signals) and exits cleanly."""
    import paddle
    from paddle.autograd import PyLayer

    from convitlab.core import signals

    class SignalDuringBackward(PyLayer):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            os.kill(os.getpid(), signal.SIGUSR2)  # handled here, in the middle of backward
            return grad * 2

    calls = []

    def requeue_and_exit(signum, frame):
        calls.append(signum)
        raise SystemExit(3)

    previous = signal.signal(signal.SIGUSR2, requeue_and_exit)
    try:
        signals.defer_signal_handlers((signal.SIGUSR2,))
        x = paddle.ones([2])
        x.stop_gradient = False
        SignalDuringBackward.apply(x).sum().backward()
        assert calls == [] and x.grad.numpy().tolist() == [2.0, 2.0]
        with pytest.raises(SystemExit):
            signals.run_deferred_signals()
        assert calls == [signal.SIGUSR2]
        signals.run_deferred_signals()  # each signal handled once
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
