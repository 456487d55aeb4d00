"""What the run hashes and sweep folder names promise, tested against the project's own list of
result-neutral keys (convitlab.config.NEUTRAL_KEYS): a neutral key changes neither hash nor
folder name, every other key changes config_hash, and only the seeds leave setup_hash alone."""
import sys
from enum import Enum

import pytest
from helpers import ROOT, TRAIN, compose_train, read_csv, run
from omegaconf import DictConfig, ListConfig, OmegaConf

from convitlab.config import NEUTRAL_KEYS, SEED_KEYS, config_hash, setup_hash, validate

COMPARE = [sys.executable, str(ROOT / "src" / "compare.py")]
# Neutral keys whose allowed values are a closed set: another allowed value.
OTHER_CHOICE = {"trainer.device": "cpu", "trainer.resume": False}


def leaves(node, prefix=""):
    """Every leaf key of a composed config, dotted (an empty dict counts as a leaf)."""
    keys = []
    for key, value in node.items_ex(resolve=False):
        dotted = f"{prefix}.{key}" if prefix else key
        keys += leaves(value, dotted) if isinstance(value, DictConfig) and len(value) else [dotted]
    return keys


def other_value(cfg, key):
    """A value of `key` that differs from the composed one."""
    if key in OTHER_CHOICE:
        return OTHER_CHOICE[key]
    value = OmegaConf.select(cfg, key)
    if isinstance(value, Enum):  # a closed choice: another of its values
        return next(member.value for member in type(value) if member != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if value is None:
        return 7  # an int, or a string where the schema holds one
    if isinstance(value, ListConfig):
        return [1] * (len(value) + 1)
    if isinstance(value, DictConfig):
        return {"other": "x"}
    return f"{value}_other"


def override(cfg, key) -> str:
    """The command-line form of setting `key` to another value."""
    value = other_value(cfg, key)
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, list):
        return f"{key}=[{','.join(map(str, value))}]"
    return f"{key}={value}"


def test_every_neutral_key_is_a_config_key_and_changes_neither_hash():
    base = compose_train()
    for key in NEUTRAL_KEYS:  # a misspelt entry would silently stay in the hash
        assert OmegaConf.select(base, key, default="<absent>") != "<absent>", key
        changed = compose_train(override(base, key))
        validate(changed)  # a real, allowed value
        assert OmegaConf.select(changed, key) != OmegaConf.select(base, key), key
        assert config_hash(changed) == config_hash(base), key
        assert setup_hash(changed) == setup_hash(base), key


def test_every_other_key_changes_the_config_hash_and_only_seeds_leave_setup_hash_alone():
    base = compose_train()
    others = [key for key in leaves(base) if key not in NEUTRAL_KEYS]
    assert {"optimizer.lr", "data.fraction", "model.name", *SEED_KEYS} <= set(others)
    for key in others:  # the composed config, one key changed (composing 90 configs would take long)
        changed = base.copy()
        OmegaConf.update(changed, key, other_value(base, key), merge=False)
        assert config_hash(changed) != config_hash(base), key
        assert (setup_hash(changed) == setup_hash(base)) == (key in SEED_KEYS), key


@pytest.mark.parametrize("override", ["optimizer.lr=3e-4", "model=deit_micro", "data.fraction=0.5",
                                      "optimizer=sgd", "experiment=demo", "ablation=no_local_init"])
def test_group_choices_and_named_keys_change_both_hashes(override):
    base, changed = compose_train(), compose_train(override)
    assert config_hash(changed) != config_hash(base)
    assert setup_hash(changed) != setup_hash(base)


def test_a_two_seed_sweep_names_folders_without_neutral_keys_and_compares(tmp_path):
    """The path `make demo` takes (sweep, then compare.py), with every neutral key set to another
    value on the command line: none of them may reach a job's folder name."""
    base = compose_train()
    neutral = [override(base, key) for key in NEUTRAL_KEYS]
    quick = ["schedule.epochs=1", "trainer.max_steps_per_epoch=2", "data.batch_size=16",
             "trainer.locality_batch_size=8"]
    sweep = tmp_path / "sweep"
    done = run([*TRAIN, "-m", "model=convit_micro,deit_micro", "seed=0,1", *quick, *neutral,
                f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = {",".join(sorted([f"model={m}", f"seed={s}", *quick])) for m in ("convit_micro", "deit_micro")
                for s in (0, 1)}
    assert {p.name for p in sweep.iterdir() if p.is_dir()} == expected

    rows = {(r["model"], r["seed"]): r for r in (read_csv(sweep / name / "result.csv")[0] for name in expected)}
    for model in ("convit_micro", "deit_micro"):
        first, second = rows[(model, "0")], rows[(model, "1")]
        assert first["status"] == second["status"] == "completed"
        assert first["config_hash"] != second["config_hash"] and first["setup_hash"] == second["setup_hash"]
    assert rows[("convit_micro", "0")]["setup_hash"] != rows[("deit_micro", "0")]["setup_hash"]

    shown = run([*COMPARE, str(sweep), "--no-plots"], cwd=tmp_path, timeout=300)
    assert shown.returncode == 0, shown.stderr
    table = read_csv(sweep / "comparison.csv")
    assert len(table) == 1 and table[0]["convit_micro n"] == table[0]["deit_micro n"] == "2"
