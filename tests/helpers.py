"""What the end-to-end tests share: the entry points, running them, reading the CSVs they write."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "src" / "train.py")]
EVAL = [sys.executable, str(ROOT / "src" / "eval.py")]
TIMING_COLUMNS = ("epoch_s", "img_per_s", "data_wait_frac")  # differ between identical runs


def run(command, cwd, timeout=300):
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


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
    child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + wait_s
    while not (run_dir / "checkpoints" / f"epoch_{epoch:04d}").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
