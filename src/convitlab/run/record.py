"""What a run directory says about its run: which config it holds, and which code ran it.

A run directory belongs to one config. Its hash (config.config_hash: everything that changes
results) is kept in run.json, so a run started again on the same directory resumes or reports itself
finished, and a different config there is refused instead of mixed in.
"""
import json
import subprocess
from pathlib import Path

import paddle

import convitlab
from convitlab.config import setup_hash
from convitlab.core import distributed, tables
from convitlab.core.errors import UserError
from convitlab.core.files import write_text
from convitlab.core.layout import RunFolder
from convitlab.data.transforms import image_size_pair
from convitlab.ops.runtime import cpu_threads


def convitlab_version() -> str:
    """The package version, with the git commit when running from a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(convitlab.__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{convitlab.__version__}+{commit}" if commit else convitlab.__version__


def first_row(run_dir, kind, overrides=()) -> dict:
    """A result row of the schema (every column of tables.RESULT_COLUMNS, in order), blank but
    what is known before the config is checked: the run's name, kind, folder and overrides.
    A run that fails its checks is written with these, so its result.csv still says which run it was."""
    return tables.ordered_row({"run_id": Path(run_dir).name, "kind": kind, "run_dir": str(run_dir),
                               "overrides": " ".join(overrides)}, tables.RESULT_COLUMNS)


def identity_row(cfg, run_dir, cfg_hash, overrides=()):
    """The columns of result.csv that say which run this is (every knob a sweep may vary) and what
    made it: exactly tables.CONFIG_COLUMNS, in their order."""
    m, d, o = cfg.model, cfg.data, cfg.get("optimizer") or {}  # eval configs have no optimizer
    h, w = image_size_pair(m.img_size, "model.img_size")
    values = {"run_id": Path(run_dir).name, "study": cfg.get("study"), "ablation": cfg.get("ablation"),
              "model": m.name, "dataset": d.name, "fraction": d.fraction, "subset": d.subset,
              "locality_strength": m.locality_strength, "local_up_to_layer": m.local_up_to_layer,
              "use_local_init": m.use_local_init, "train_gating": m.train_gating, "train_gpsa": m.train_gpsa,
              "embed_dim": m.embed_dim, "num_heads": m.num_heads, "depth": m.depth,
              "img_size": h if h == w else f"{h}x{w}", "patch_size": m.patch_size, "seed": cfg.seed,
              "batch_size": d.batch_size, "lr": o.get("lr"), "optimizer": o.get("name"),
              "weight_decay": o.get("weight_decay"), "drop_path_rate": m.drop_path_rate,
              "label_smoothing": cfg.trainer.label_smoothing, "random_crop": d.augment.random_crop,
              "mixup": d.augment.mixup, "cutmix": d.augment.cutmix, "ema": cfg.trainer.ema,
              "world_size": distributed.world_size(), "threads": cpu_threads(), "overrides": " ".join(overrides),
              "config_hash": cfg_hash, "setup_hash": setup_hash(cfg), "convitlab_version": convitlab_version(),
              "paddle_version": paddle.__version__, "run_dir": str(run_dir), "tags": " ".join(cfg.get("tags", []))}
    return tables.ordered_row(values, tables.CONFIG_COLUMNS, complete=True)


class RunRecord:
    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = RunFolder(run_dir).record

    def stored_hash(self):
        try:
            return json.loads(self.path.read_text()).get("config_hash")
        except (FileNotFoundError, ValueError):
            return None

    def claim(self, cfg_hash: str, overwrite: bool) -> None:
        """Mark the directory as this config's, refusing one that holds another config."""
        stored = self.stored_hash()
        if stored not in (None, cfg_hash) and not overwrite:
            raise UserError(f"run directory {self.run_dir} holds a run of another config (hash {stored}, "
                            f"this one {cfg_hash}): choose another hydra.run.dir, or trainer.resume=false "
                            "to replace it")
        write_text(self.path, json.dumps({"config_hash": cfg_hash}))
