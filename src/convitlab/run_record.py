"""What a run directory says about its run: which config it holds, and whether it finished.

A run directory belongs to one config. Its hash (of everything that changes results) is
kept in run.json, so a run started again on the same directory resumes or reports itself
finished, and a different config there is refused instead of mixed in.
"""
import hashlib
import json
import subprocess
from pathlib import Path

from omegaconf import OmegaConf

import convitlab
from convitlab.atomic import write_text
from convitlab.errors import UserError
from convitlab.run_folder import RunFolder

# Keys that do not change what a run computes: they stay out of the hash, so a run started
# again with another value resumes, and out of a sweep job's folder name (conf/hydra/default.yaml).
NEUTRAL_KEYS = ("trainer.resume", "trainer.progress_bar", "trainer.device", "trainer.keep_checkpoints",
                "trainer.save_best", "data.num_workers", "data.eval_batch_size", "data.root", "data.download",
                "data.checksum", "tags", "study")
# What varies between the repeats of one setup: left out of setup_hash.
SEED_KEYS = ("seed", "data.subset_seed")


def _hash(cfg, leave_out) -> str:
    container = OmegaConf.to_container(cfg, resolve=True)
    for dotted in leave_out:
        *parents, leaf = dotted.split(".")
        node = container
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    blob = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_hash(cfg) -> str:
    """Identifies what a run computes: equal hashes, equal runs."""
    return _hash(cfg, NEUTRAL_KEYS)


def setup_hash(cfg) -> str:
    """The config hash less the seeds: runs that repeat one setup share it (comparison tables
    average over them and nothing else)."""
    return _hash(cfg, NEUTRAL_KEYS + SEED_KEYS)


def sweep_exclude_keys() -> list:
    """Overrides left out of a sweep job's folder name: the neutral keys and the preset choice
    (a preset names its own sweep folder)."""
    return [*NEUTRAL_KEYS, "experiment"]


def convitlab_version() -> str:
    """The package version, with the git commit when running from a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(convitlab.__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{convitlab.__version__}+{commit}" if commit else convitlab.__version__


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
