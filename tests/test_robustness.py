"""Stopped, doubled or handed a hostile file (issue 16), through the real entry points:
one process per run directory, SIGTERM/SIGINT stop cleanly and resume exactly, a full disk is
named in one line, and weights from outside never run code."""
import json
import os
import pickle
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import EVAL, QUICK, ROOT, TRAIN, processes, read_csv, run, started, trained, without_timings

from convitlab.core.layout import RunFolder
from convitlab.run import lock as run_lock

CONVERT = [sys.executable, str(ROOT / "src" / "convert.py")]
FAULTS = ROOT / "tests" / "faults"  # sitecustomize.py: a full disk where asked
# Long enough to be caught mid-run: 6 epochs of 8 steps (a few seconds per epoch on 2 cores).
LONG = ["schedule.epochs=6", "trainer.max_steps_per_epoch=8", "data.batch_size=32", "trainer.locality_batch_size=16",
        "trainer.progress_bar=false", "model.drop_path_rate=0.1"]
SHORT = ["schedule.epochs=3", *(o for o in QUICK if not o.startswith("schedule.epochs="))]


def start(args, cwd):
    return started(TRAIN + args, cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process=None, timeout=240):
    deadline = time.time() + timeout
    while not path.exists():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process ended ({process.returncode}) before {path} appeared: "
                                 f"{process.stderr.read()[-2000:]}")
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def snapshot(directory: Path) -> dict:
    """Every file under `directory` with its size, modification time and content digest."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            stat = path.stat()
            files[str(path.relative_to(directory))] = (stat.st_size, stat.st_mtime_ns, hash(path.read_bytes()))
    return files


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def epochs(run_dir: Path) -> list:
    return [int(row["epoch"]) for row in read_csv(run_dir / "metrics.csv")]


def job_dir(sweep: Path, override: str):
    """The sweep's job folder whose name (its overrides) includes `override`, or None."""
    return next((p for p in sweep.glob("*") if override in p.name.split(",")), None)


def wait_for_job_checkpoint(sweep: Path, override: str, process, timeout=240):
    deadline = time.time() + timeout
    while True:
        folder = job_dir(sweep, override) if sweep.exists() else None
        if folder is not None and (folder / "checkpoints" / "epoch_0001").exists():
            return folder
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The LONG run, uninterrupted: what a stopped and resumed run must end with."""
    return trained(tmp_path_factory.mktemp("straight"), LONG)


# --- 1. one process per run directory ----------------------------------------------------------

def test_a_second_process_on_a_run_directory_refuses_naming_the_holder_and_touches_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with start(LONG + [f"hydra.run.dir={run_dir}"], cwd=tmp_path) as first:
        wait_for(run_dir / "checkpoints" / "epoch_0001", first)
        os.kill(first.pid, signal.SIGSTOP)  # frozen: it holds the directory but writes nothing meanwhile
        before = snapshot(run_dir)
        second = run(TRAIN + LONG + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        after = snapshot(run_dir)
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    line = last_line(second.stderr)
    assert line.startswith(f"error: run directory {run_dir} is in use by process {first.pid} on "
                           f"{socket.gethostname()} since "), line
    assert "train.py" in line and len(second.stderr.strip().splitlines()) == 1
    assert after == before  # not one byte: no .hydra/, no log line, no result
    assert first.returncode == 0, err[-2000:]
    assert epochs(run_dir) == [1, 2, 3, 4, 5, 6]  # each epoch once
    assert read_csv(run_dir / "result.csv")[0]["status"] == "completed"
    assert not RunFolder(run_dir).lock.exists()  # given back at the end


def test_a_killed_runs_lock_is_taken_over_with_a_log_line(tmp_path):
    run_dir = tmp_path / "run"
    with start(LONG + [f"hydra.run.dir={run_dir}"], cwd=tmp_path) as killed:
        wait_for(run_dir / "checkpoints" / "epoch_0001", killed)
        killed.kill()
        killed.communicate()
    holder = json.loads(RunFolder(run_dir).lock.read_text())
    assert holder["pid"] == killed.pid and holder["host"] == socket.gethostname()
    again = run(TRAIN + LONG + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    output = again.stdout + again.stderr
    assert f"was left by process {killed.pid} on {socket.gethostname()}" in output and "taken over" in output
    assert "resuming from" in output
    assert epochs(run_dir) == [1, 2, 3, 4, 5, 6]


def test_ranks_of_one_launch_share_the_lock_and_another_launch_waits(tmp_path, monkeypatch):
    """Rank 0 holds the directory; rank 1 of the same launch (same master and endpoints) shares it
    without writing, rank 1 of another launch does not. (Both ranks through the real launcher:
    tests/test_distributed.py.)"""
    launch = {"PADDLE_TRAINERS_NUM": "2", "PADDLE_MASTER": "127.0.0.1:6170",
              "PADDLE_TRAINER_ENDPOINTS": "127.0.0.1:6171,127.0.0.1:6172"}
    for name, value in launch.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PADDLE_TRAINER_ID", "0")
    rank0 = run_lock.RunLock(tmp_path).acquire()
    try:
        written = RunFolder(tmp_path).lock.read_text()
        monkeypatch.setenv("PADDLE_TRAINER_ID", "1")
        rank1 = run_lock.RunLock(tmp_path)
        rank1._join_launch(wait_s=1)
        assert rank1.shared and rank1.fd is None
        assert RunFolder(tmp_path).lock.read_text() == written
        monkeypatch.setenv("PADDLE_TRAINER_ENDPOINTS", "127.0.0.1:7171,127.0.0.1:7172")  # another launch
        with pytest.raises(run_lock.RunDirInUse, match=f"rank 1: rank 0 of this launch did not take the lock .*"
                                                       f"process {os.getpid()}"):
            run_lock.RunLock(tmp_path)._join_launch(wait_s=0.5)
    finally:
        rank0.release()
    assert not RunFolder(tmp_path).lock.exists()


def test_a_relaunched_sweep_reports_the_job_in_use_and_runs_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    busy = sweep / "debug=fast,model=convit_micro"  # the folder Hydra names that job
    lock = run_lock.RunLock(busy).acquire()  # this test process plays the copy of the sweep still running it
    try:
        proc = run(TRAIN + ["-m", "debug=fast", "model=convit_micro,deit_micro", f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path)
    finally:
        lock.release()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"job {busy} skipped: in use by process {os.getpid()} on {socket.gethostname()}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (busy / "result.csv").exists() and not (busy / "checkpoints").exists()
    assert not (busy / "metrics.csv").exists()
    other = sweep / "debug=fast,model=deit_micro"
    assert read_csv(other / "result.csv")[0]["status"] == "completed"
    statuses = {Path(row["run_dir"]).name: row["status"] for row in read_csv(sweep / "summary.csv")}
    assert statuses == {other.name: "completed", busy.name: "unfinished"}


# --- 2. SIGTERM and SIGINT -----------------------------------------------------------------------

@pytest.mark.timeout(600)  # the straight run, then stop and resume
@pytest.mark.slow
@pytest.mark.parametrize("signum, to_group, workers", [
    (signal.SIGTERM, False, 0), (signal.SIGINT, False, 0),
    # What scancel, `kill -- -PGID` and Ctrl-C do: the loader workers get the signal too.
    (signal.SIGTERM, True, 2), (signal.SIGINT, True, 2)])
def test_a_stop_signal_ends_at_a_step_boundary_and_the_printed_command_resumes_exactly(tmp_path, signum, to_group,
                                                                                      workers, straight):
    run_dir = tmp_path / "run"
    with start(LONG + [f"data.num_workers={workers}", f"hydra.run.dir={run_dir}"], cwd=tmp_path) as proc:
        wait_for(run_dir / "checkpoints" / "epoch_0001", proc)
        if to_group:
            os.killpg(proc.pid, signum)  # started in a session of its own: the group is the run's
        else:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err + out  # neither Python's nor Paddle's C++ one
    line = last_line(err)
    assert line.startswith(f"interrupted by {name}: epoch") and "resume with: python " in line, line
    assert f"hydra.run.dir={run_dir}" in line and f"{name} received: stopping at the next step boundary" in out
    result = read_csv(run_dir / "result.csv")[0]
    done = int(result["epochs_done"])
    assert result["status"] == "interrupted" and f"stopped by {name}" in result["error"]
    assert done >= 1 and (run_dir / "checkpoints" / f"epoch_{done:04d}").is_dir()
    assert not (run_dir / "checkpoints" / f"epoch_{done + 1:04d}").exists()
    assert epochs(run_dir) == list(range(1, done + 1))
    assert not RunFolder(run_dir).lock.exists()

    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:2] == ["python", TRAIN[1]]
    resumed = run([sys.executable, *command[1:]], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert read_csv(run_dir / "result.csv")[0]["status"] == "completed"
    # The same numbers whatever data.num_workers is: every random draw comes from (seed, epoch, image).
    assert without_timings(read_csv(run_dir / "metrics.csv")) == without_timings(read_csv(straight / "metrics.csv"))
    assert read_csv(run_dir / "locality.csv") == read_csv(straight / "locality.csv")


def group_members(pgid: int) -> list:
    """(pid, state, name) of the Python processes in process group `pgid`: the run, its loader
    workers, launcher jobs. Not the short shell commands Paddle runs while it loads (sh, cat, grep,
    ldd, awk: they come and go before training starts), which would be counted now and then."""
    found = processes()
    python = {p.name for p in found if p.pid == pgid}  # the group's leader is the Python process started
    return [(p.pid, p.state, p.name) for p in found if p.group == pgid and p.name in python]


@pytest.mark.timeout(600)
@pytest.mark.slow
@pytest.mark.parametrize("how", ["run", "basic sweep", "joblib sweep"])
def test_loader_workers_end_with_each_pass_so_a_run_never_holds_more_than_its_workers(tmp_path, how):
    workers, passes = 2, 6
    args = ["debug=fast", f"schedule.epochs={passes}", f"data.num_workers={workers}"]
    if how == "run":
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
        # The run and one pass's workers: training and evaluation passes never overlap.
        bound = 1 + workers
    else:
        args = ["-m", *args, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
        if how == "joblib sweep":
            args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
        # The sweep process (the basic launcher runs its jobs in it); under joblib also its 2 job
        # processes, each with its workers, and the resource trackers of loky and multiprocessing.
        bound = 1 + workers if how == "basic sweep" else 1 + 2 * (1 + workers) + 2
    largest = []
    # Without the compiled CPU kernels, whose cache key asks the C++ compiler (a process forked
    # from the run, a python one until it execs) once per process: the loader's processes alone.
    env = {**os.environ, "CONVITLAB_CPU_KERNELS": "0"}
    with started(TRAIN + args, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        while proc.poll() is None:
            members = group_members(proc.pid)
            largest = max(largest, members, key=len)
            time.sleep(0.02)
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    folders = [tmp_path / "run"] if how == "run" else sorted((tmp_path / "sweep").glob("*seed=*"))
    assert len(folders) == (1 if how == "run" else 2)
    assert all(epochs(folder) == list(range(1, passes + 1)) for folder in folders)
    assert workers < len(largest) <= bound, largest


def test_a_stop_signal_delivered_twice_at_once_is_one_request(monkeypatch):
    """A signal sent to a process group and forwarded again by a launcher (paddle.distributed.launch,
    submitit's local controller) arrives twice within milliseconds: one stop, not a stop at once."""
    from convitlab.core import signals

    monkeypatch.setattr(signals, "_stop", {"signal": None, "at": 0.0, "owner": None})
    monkeypatch.setattr(signals, "_deferred", [])
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        signals.stop_at_step_boundaries((signal.SIGTERM,))
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the process is still here: not taken as a second request
        assert signals.stop_signal() == signal.SIGTERM
        with pytest.raises(signals.Interrupted) as caught:
            signals.run_deferred_signals(step=5)
        assert caught.value.exit_code == 143
        signals.run_deferred_signals(step=6)  # raised once
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.timeout(600)  # a sweep of two stopped, then resumed
@pytest.mark.slow
def test_a_stopped_sweep_stops_its_job_starts_no_other_and_resumes(tmp_path):
    sweep = tmp_path / "sweep"
    command = TRAIN + ["-m", "model=convit_micro,deit_micro", f"hydra.sweep.dir={sweep}"] + LONG
    with started(command, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        first = wait_for_job_checkpoint(sweep, "model=convit_micro", proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in out + err
    assert last_line(err).startswith("sweep stopped by SIGTERM") and "run the same command again" in last_line(err)
    assert read_csv(first / "result.csv")[0]["status"] == "interrupted"
    second = job_dir(sweep, "model=deit_micro")
    assert second is None or not (second / "checkpoints").exists()  # not started
    statuses = {Path(row["run_dir"]).name: row["status"] for row in read_csv(sweep / "summary.csv")}
    assert statuses[first.name] == "interrupted"
    again = run(command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    statuses = {Path(row["run_dir"]).name: row["status"] for row in read_csv(sweep / "summary.csv")}
    assert sorted(statuses.values()) == ["completed", "completed"] and len(statuses) == 2
    assert epochs(first) == [1, 2, 3, 4, 5, 6]


# --- 3. a full disk --------------------------------------------------------------------------------

def assert_disk_full_reported(proc, run_dir, file_name):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert line.startswith(f"error: no space left on device writing {run_dir / 'checkpoints' / 'epoch_0002'}/"), line
    assert file_name is None or line.split(" (")[0].endswith(file_name), line
    assert " left on " in line and "free some space there" in line and "run the same command again" in line
    result = read_csv(run_dir / "result.csv")[0]
    assert result["status"] == "failed" and result["error"] == line[len("error: "):]
    # The previous checkpoint is whole (its checksums hold) and nothing half-built is left.
    from convitlab.engine.checkpoint import Checkpointer
    checkpoints = Checkpointer(run_dir / "checkpoints")
    assert [p.name for p in checkpoints.generations()] == ["epoch_0001"]
    assert checkpoints.verify(run_dir / "checkpoints" / "epoch_0001")["epoch"] == 1
    assert not list((run_dir / "checkpoints").glob(".tmp-*")) and not list(run_dir.rglob(".*.tmp"))


def resume_after_freeing_space(run_dir, cwd):
    """Leftovers of a killed write are removed on the next start, which resumes and finishes."""
    leftovers = [run_dir / "checkpoints" / ".tmp-epoch_0002", run_dir / ".metrics.csv.k1ll3d00.tmp",
                 run_dir / "checkpoints" / ".best.pdparams.k1ll3d00.tmp"]
    leftovers[0].mkdir()
    (leftovers[0] / "model.pdparams").write_bytes(b"half")
    for path in leftovers[1:]:
        path.write_text("half")
    proc = run(TRAIN + SHORT + [f"hydra.run.dir={run_dir}"], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "removed the temporary files of an interrupted write" in output and "resuming from" in output
    assert not any(path.exists() for path in leftovers)
    assert epochs(run_dir) == [1, 2, 3]


def test_a_full_disk_while_checkpointing_is_one_line_and_the_previous_checkpoint_survives(tmp_path):
    """Writes into the second checkpoint fail with ENOSPC (tests/faults/sitecustomize.py), through
    the real save path: Checkpointer.save, paddle.save, open()."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")])),
           "CONVITLAB_TEST_FULL_DISK": ".tmp-epoch_0002"}
    proc = run(TRAIN + SHORT + [f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env)
    assert_disk_full_reported(proc, run_dir, "model.pdparams")
    resume_after_freeing_space(run_dir, tmp_path)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        return run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_a_really_full_disk(tmp_path):
    """The same on a real 8 MiB file system (a tmpfs: needs root), which fills up while the second
    epoch's checkpoint is written (about 3.5 MiB each, with best.pdparams beside them)."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "8m"):
        pytest.skip("mounting a tmpfs needs root (the injected full disk above runs everywhere)")
    try:
        run_dir = disk / "run"
        proc = run(TRAIN + SHORT + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert_disk_full_reported(proc, run_dir, None)
        assert run(["mount", "-o", "remount,size=64m", str(disk)], timeout=30).returncode == 0
        resume_after_freeing_space(run_dir, tmp_path)
    finally:
        run(["umount", "-l", str(disk)], timeout=30)


# --- 4. weights from outside never run code ------------------------------------------------------

class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def crafted_pdparams(path: Path, marker: Path) -> Path:
    """Real-looking weights with one entry that runs a shell command when unpickled."""
    state = {"cls_token": np.zeros((1, 1, 64), np.float32), "pos_embed": np.zeros((1, 16, 64), np.float32),
             "head.bias": _RunsAShellCommand(marker)}
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=4)
    return path


def test_the_crafted_file_does_run_code_when_unpickled_as_paddle_load_would(tmp_path):
    """The control: the file is hostile, so the refusals below are what keeps the marker away."""
    marker = tmp_path / "marker"
    crafted = crafted_pdparams(tmp_path / "crafted.pdparams", marker)
    run([sys.executable, "-c", f"import pickle; pickle.load(open({str(crafted)!r}, 'rb'))"], timeout=60)
    assert marker.exists()


@pytest.mark.parametrize("entry", ["eval", "finetune", "convert"])
def test_a_crafted_pdparams_is_refused_in_one_line_and_runs_nothing(tmp_path, entry):
    marker = tmp_path / "marker"
    crafted = crafted_pdparams(tmp_path / "crafted.pdparams", marker)
    if entry == "eval":
        proc = run(EVAL + [f"ckpt={crafted}", f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path)
    elif entry == "finetune":
        run_dir = tmp_path / "run"
        proc = run(TRAIN + SHORT + [f"model.pretrained={crafted}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert read_csv(run_dir / "result.csv")[0]["status"] == "failed" and not (run_dir / "checkpoints").exists()
    else:
        proc = run(CONVERT + [f"source={crafted}", f"target={tmp_path / 'out.pdparams'}", "model=convit_micro"],
                   cwd=tmp_path)
        assert not (tmp_path / "out.pdparams").exists()
    assert not marker.exists()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = last_line(proc.stderr)
    assert line == (f"error: checkpoint {str(crafted)!r} is refused: it asks to run posix.system, and a weights file "
                    "holds only arrays and plain containers (nothing of it was run; use a .safetensors file or a "
                    ".pdparams written by paddle.save)"), line
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_safe_reader_reads_what_paddle_save_writes(tmp_path):
    """Every layout paddle.save produces (state dicts, optimizer states, tensors in nested
    containers, pickle protocols 2-4) reads back as paddle.load(return_numpy=True) does."""
    import paddle

    from convitlab.core.safe_pickle import load_arrays
    from convitlab.models import create_model
    from convitlab.models.weights import save_pdparams

    model = create_model("convit_micro", img_size=8, patch_size=2, num_classes=10)
    optimizer = paddle.optimizer.AdamW(parameters=model.parameters())
    model(paddle.randn([2, 1, 8, 8])).sum().backward()
    optimizer.step()
    files = [save_pdparams(model, tmp_path / "model.pdparams")]
    for protocol in (2, 3, 4):
        files.append(tmp_path / f"p{protocol}.pdparams")
        paddle.save(model.state_dict(), str(files[-1]), protocol=protocol)
    files.append(tmp_path / "optimizer.pdopt")
    paddle.save(optimizer.state_dict(), str(files[-1]))
    files.append(tmp_path / "nested.pdparams")
    paddle.save({"step": 3, "lr": [0.1, "cosine"], "w": paddle.ones([2], dtype="int64"),
                 "inner": {"b": paddle.ones([3]).astype("bfloat16"), "none": None}}, str(files[-1]))

    def same(ours, theirs):
        if isinstance(ours, dict):
            return ours.keys() == theirs.keys() and all(same(ours[k], theirs[k]) for k in ours)
        if isinstance(ours, (list, tuple)):
            return len(ours) == len(theirs) and all(same(a, b) for a, b in zip(ours, theirs))
        if isinstance(ours, np.ndarray):
            return ours.dtype == np.asarray(theirs).dtype and np.array_equal(ours, np.asarray(theirs))
        return ours == theirs

    for path in files:
        assert same(load_arrays(path), paddle.load(str(path), return_numpy=True)), path
    assert len(load_arrays(files[0])) == len(model.state_dict())
