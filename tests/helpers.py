"""What the end-to-end tests share: the entry points, running them, reading the CSVs they write.

Every process a test starts goes through `started` (or `run` and `kill_after_checkpoint`, built on
it): it gets its own session, hence its own process group, and when the test leaves the `with`
block, whichever way (returned, failed, subprocess or pytest-timeout), the group and every
process it started are killed, so none outlives its test."""
import contextlib
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "src" / "train.py")]
EVAL = [sys.executable, str(ROOT / "src" / "eval.py")]
TIMING_COLUMNS = ("epoch_s", "img_per_s", "data_wait_frac")  # differ between identical runs
# Small and quick, but every stage of a run: 2 epochs of a few steps on digits.
QUICK = ["schedule.epochs=2", "trainer.max_steps_per_epoch=3", "data.batch_size=32",
         "trainer.locality_batch_size=16", "trainer.progress_bar=false"]


class ProcessInfo:
    """One process as /proc/<pid>/stat tells it."""

    def __init__(self, pid: int, stat: str):
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)  # the name in parentheses may hold spaces
        fields = rest.split()
        self.pid, self.name, self.state = pid, name, fields[0]
        self.parent, self.group = int(fields[1]), int(fields[2])


def processes() -> list:
    """Every process of this machine, read from /proc (those that end meanwhile left out)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found.append(ProcessInfo(int(entry), Path(f"/proc/{entry}/stat").read_text()))
            except OSError:
                continue
    return found


def _descendants(pid):
    """The processes below `pid` (its children, theirs, ...)."""
    children = {}
    for process in processes():
        children.setdefault(process.parent, []).append(process.pid)
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def kill_group(process):
    """SIGKILL the process's group, and the groups of the processes below it that left it
    (paddle.distributed.launch starts each rank in a session of its own)."""
    groups = {process.pid}  # start_new_session: the group's id is the process's id
    for pid in _descendants(process.pid):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    groups.discard(os.getpgrp())  # never pytest's own
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


@contextlib.contextmanager
def started(command, cwd=None, **popen_kwargs):
    """subprocess.Popen in a new session; its whole group is killed when the block is left."""
    with subprocess.Popen(command, cwd=cwd, start_new_session=True, **popen_kwargs) as process:
        try:
            yield process
        finally:
            kill_group(process)


def run(command, cwd=None, timeout=300, **popen_kwargs):
    """subprocess.run(capture_output=True, text=True), with `started`'s clean-up. The output goes
    to files, not pipes: a process left running that holds them cannot keep this waiting."""
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        with started(command, cwd, stdout=stdout, stderr=stderr, **popen_kwargs) as process:
            process.wait(timeout=timeout)
        return subprocess.CompletedProcess(command, process.returncode, *(read_back(f) for f in (stdout, stderr)))


def trained(work, overrides):
    """`python src/train.py <overrides>` run to its end in work/run; that run directory."""
    work.mkdir(parents=True, exist_ok=True)
    proc = run(TRAIN + list(overrides) + [f"hydra.run.dir={work / 'run'}"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return work / "run"


def read_back(file):
    file.seek(0)
    return file.read().decode(errors="replace")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_timings(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def compose_train(*overrides):
    """The train config as `python src/train.py <overrides>` composes it (real Hydra, real conf/)."""
    from hydra import compose, initialize_config_dir

    from convitlab.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def kill_after_checkpoint(command, run_dir, cwd, epoch=2, wait_s=240):
    """Start a training command and SIGKILL it once its checkpoint of `epoch` exists."""
    with started(command, cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        deadline = time.time() + wait_s
        while not (run_dir / "checkpoints" / f"epoch_{epoch:04d}").exists() and time.time() < deadline:
            time.sleep(0.05)
