"""The layout of a run directory: every file a run keeps there, named here and nowhere else.

    <run dir>/
      .lock            the process training there (engine/run_lock.py)
      .hydra/          Hydra's record of the job (its overrides.yaml: sweeps.py)
      run.json         which config the directory belongs to (run_record.py)
      config.yaml      that config, resolved (engine/run.py)
      pretrained.json  the file a fine-tuned run started from, and its hash (finetune.py)
      subset.csv       the per-class subset's images and labels
      checkpoints/     epoch_NNNN/ and best.pdparams (their insides: engine/checkpoint.py)
      metrics.csv      one row per epoch          } engine/recorder.py
      locality.csv     one row per epoch, layer and head
      vdl/             VisualDL's logs            }
      result.csv       the run's one row (results.py)
"""
import shutil
from pathlib import Path

LOCK = ".lock"
HYDRA = ".hydra"
RECORD = "run.json"
CONFIG = "config.yaml"
PRETRAINED = "pretrained.json"
SUBSET = "subset.csv"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.csv"
LOCALITY = "locality.csv"
VDL = "vdl"
RESULT = "result.csv"
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
    metrics = property(lambda self: self.path / METRICS)
    locality = property(lambda self: self.path / LOCALITY)
    vdl = property(lambda self: self.path / VDL)
    result = property(lambda self: self.path / RESULT)

    def clear_outputs(self) -> None:
        for name in OUTPUTS:
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
