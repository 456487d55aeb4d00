"""The layout of a run directory: every file a run keeps there, named here and nowhere else.

    <run dir>/
      .lock            the process training there (run/lock.py)
      .hydra/          Hydra's record of the job (its overrides.yaml: results/sweeps.py)
      run.json         which config the directory belongs to (run/record.py)
      config.yaml      that config, resolved (run/launch.py)
      pretrained.json  the file a fine-tuned run started from, and its hash (engine/finetune.py)
      subset.csv       the per-class subset's images and labels
      checkpoints/     epoch_NNNN/ and best.pdparams (their insides: engine/checkpoint.py)
      metrics.csv      one row per epoch          } engine/recorder.py
      locality.csv     one row per epoch, layer and head
      vdl/             VisualDL's logs            }
      result.csv       the run's one row (run/launch.py; its columns: core/tables.py)
      overrides.txt    a sweep job whose folder is named by a hash: its overrides (job_folder_name)
"""
import hashlib
import os
import shutil
from pathlib import Path

from convitlab.core.errors import UserError, broken_link

LOCK = ".lock"
HYDRA = ".hydra"
RECORD = "run.json"
CONFIG = "config.yaml"
PRETRAINED = "pretrained.json"
SUBSET = "subset.csv"
CHECKPOINTS = "checkpoints"
BEST = "best.pdparams"  # in CHECKPOINTS: the best epoch's weights, for evaluation and export
METRICS = "metrics.csv"
LOCALITY = "locality.csv"
VDL = "vdl"
RESULT = "result.csv"
JOB_OVERRIDES = "overrides.txt"  # a sweep job named by a hash: the folder name it would have had
# The kernel's limits on a path (Linux): PATH_MAX bytes in all, NAME_MAX in one name unless the
# file system says otherwise. INSIDE is room for the longest path a run writes below its directory
# (checkpoints/.tmp-epoch_NNNN/optimizer.pdopt, .hydra/overrides.yaml, vdl/head_NN/vdlrecords.<time>.log, ...),
# so a long directory is refused before training rather than at its first checkpoint.
PATH_MAX, NAME_MAX, INSIDE = 4096, 255, 100
# What a fresh start (trainer.resume=false) removes: the outputs of training, not the lock,
# Hydra's record, the config or the pretrained record, which the new run writes again.
OUTPUTS = (CHECKPOINTS, VDL, METRICS, LOCALITY, SUBSET, RESULT, RECORD)


class RunFolder:
    """The paths of one run directory's files."""

    def __init__(self, path):
        self.path = Path(path)

    lock = property(lambda self: self.path / LOCK)
    hydra_overrides = property(lambda self: self.path / HYDRA / "overrides.yaml")
    record = property(lambda self: self.path / RECORD)
    config = property(lambda self: self.path / CONFIG)
    pretrained = property(lambda self: self.path / PRETRAINED)
    subset = property(lambda self: self.path / SUBSET)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    best = property(lambda self: self.path / CHECKPOINTS / BEST)
    metrics = property(lambda self: self.path / METRICS)
    locality = property(lambda self: self.path / LOCALITY)
    vdl = property(lambda self: self.path / VDL)
    result = property(lambda self: self.path / RESULT)
    job_overrides = property(lambda self: self.path / JOB_OVERRIDES)

    def clear_outputs(self) -> None:
        for name in OUTPUTS:
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def job_folder_name(overrides: str) -> str:
    """A sweep job's folder name: its overrides (Hydra's override_dirname), or, when that would pass
    NAME_MAX, `overrides-` and a hash of them (the same overrides, the same folder: a sweep started
    again finds its jobs), the overrides then kept in the folder's overrides.txt (RunGuard)."""
    if len(os.fsencode(overrides)) <= NAME_MAX:
        return overrides
    return f"overrides-{hashlib.sha256(overrides.encode()).hexdigest()[:16]}"


def check_run_dir(path) -> None:
    """Refuse, in one line, a path that cannot become a run directory: a file, a dangling symbolic
    link or a loop where the folder (or one of its parents) would be, or a name or path too long."""
    path = Path(os.path.abspath(path))
    way_out = "choose another hydra.run.dir"
    size = len(os.fsencode(str(path)))
    if size + INSIDE >= PATH_MAX:
        raise UserError(f"run directory {_short(path)} is a path of {size} bytes: at most {PATH_MAX - INSIDE - 1} "
                        f"are allowed (the files a run writes inside it must stay within the {PATH_MAX} of a path): "
                        f"{way_out}, shorter")
    existing = next(p for p in (path, *path.parents) if os.path.isdir(p))
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = NAME_MAX
    for name in path.relative_to(existing).parts:
        if len(os.fsencode(name)) > name_max:
            raise UserError(f"run directory {_short(path)} has a folder name of {len(os.fsencode(name))} bytes "
                            f"({_short(name)}): at most {name_max} are allowed there: {way_out}, with shorter names")
    for part in (path, *path.parents):  # from the run directory up to the first folder that exists
        if part == existing:
            return
        where = f"run directory {_short(path)}" + ("" if part == path else f": {part}")
        link = broken_link(part)
        if link is not None:
            fix = f"{way_out}, or replace the link" if "loop" in link else f"create that folder, or {way_out}"
            raise UserError(f"{where} is {link}: {fix}")
        if os.path.lexists(part):
            kind = "a file" if part.is_file() else "not a folder"
            raise UserError(f"{where} is {kind}: {way_out}, or move it away")


def _short(text, keep: int = 60) -> str:
    """A path or name of any length, cut to a readable length for a one-line error."""
    text = str(text)
    return text if len(text) <= 2 * keep else f"{text[:keep]}...{text[-keep:]}"
