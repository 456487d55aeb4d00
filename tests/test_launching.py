"""What a test launches through tests/helpers.py ends with the test, grandchildren included:
when the launch times out (subprocess or pytest-timeout), when the test fails, and when the
launched process returns leaving a child running."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, run, started

# Writes its pid and its children's to argv[1]. "sleep": two sleeping children, one in its group,
# one in a session of its own (as paddle.distributed.launch starts its ranks), then sleeps too.
# "exit": one sleeping child in its group, then returns at once.
SPAWNER = """
import os, subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
sessions = (False, True) if sys.argv[2] == "sleep" else (False,)
children = [subprocess.Popen(sleep, start_new_session=new) for new in sessions]  # holding stdout and stderr
pids = [os.getpid()] + [child.pid for child in children]
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(" ".join(map(str, pids)))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
if sys.argv[2] == "sleep":
    time.sleep(600)
"""


def spawner(tmp_path, mode):
    script = tmp_path / "spawner.py"
    script.write_text(SPAWNER)
    return [sys.executable, str(script), str(tmp_path / "pids"), mode]


def running(pid):
    """Whether `pid` still runs (a zombie waiting to be reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def launched_pids(tmp_path, count):
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == count
    return pids


def assert_ended(pids, within_s=10):
    deadline = time.time() + within_s
    while any(map(running, pids)) and time.time() < deadline:
        time.sleep(0.05)
    assert [pid for pid in pids if running(pid)] == []


def test_a_launch_that_times_out_ends_with_all_it_started(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        run(spawner(tmp_path, "sleep"), tmp_path, timeout=3)
    assert_ended(launched_pids(tmp_path, 3))


def test_a_failing_test_ends_what_it_started(tmp_path):
    with pytest.raises(AssertionError, match="the test failed"):
        with started(spawner(tmp_path, "sleep"), tmp_path):
            while not (tmp_path / "pids").exists():
                time.sleep(0.02)
            pids = launched_pids(tmp_path, 3)
            assert all(map(running, pids))  # the check below has teeth: they were running
            raise AssertionError("the test failed")
    assert_ended(pids)


def test_a_launch_that_returns_leaves_no_child_running(tmp_path):
    proc = run(spawner(tmp_path, "exit"), tmp_path, timeout=60)  # not held up by the child
    assert proc.returncode == 0, proc.stderr
    assert_ended(launched_pids(tmp_path, 2))


def test_pytest_timeout_ends_what_the_test_started(tmp_path):
    """The pyproject's pytest settings (timeout_method=signal) on a test that hangs in a launch."""
    test = tmp_path / "test_hangs.py"
    test.write_text(f"import pytest\nfrom helpers import run\n\n\n@pytest.mark.timeout(3)\n"
                    f"def test_hangs():\n    run({spawner(tmp_path, 'sleep')!r}, timeout=600)\n")
    path = [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]  # helpers, and the sources first as here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    proc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
                "--rootdir", str(tmp_path), str(test)], tmp_path, timeout=120, env=env)
    assert proc.returncode == 1 and "Timeout (>3.0s)" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert_ended(launched_pids(tmp_path, 3))
