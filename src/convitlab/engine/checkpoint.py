"""Training checkpoints: complete or absent, never half-written, and checked when read.

Each checkpoint is a folder `epoch_NNNN/` (model.pdparams, optimizer.pdopt, ema.pdparams,
rng.pkl, state.json with the files' SHA-256 and its own) built under a temporary name and renamed
into place. The newest `keep` generations are kept, so a damaged one has a fallback (its error names it);
`best.pdparams` holds the weights of the best epoch for evaluation (the EMA weights when EMA is on).
"""
import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import paddle

from convitlab.core import distributed
from convitlab.core.errors import UserError
from convitlab.core.files import (
    atomic_path,
    disk_full_error,
    file_digest,
    human_bytes,
    is_disk_full,
    remove_temporaries,
)
from convitlab.core.layout import BEST
from convitlab.engine import rng

_EPOCH_DIR = re.compile(r"^epoch_(\d{4,})$")
_TMP_PREFIX = ".tmp-"  # a checkpoint being built: .tmp-epoch_NNNN/
# A checkpoint folder's files; best.pdparams sits beside the folders.
MODEL, OPTIMIZER, EMA, RNG, STATE = "model.pdparams", "optimizer.pdopt", "ema.pdparams", "rng.pkl", "state.json"


def _state_digest(state: dict) -> str:
    """SHA-256 of state.json's content less its own digest: an edited loop state shows as damage."""
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename(key, mapping):
    for old, new in mapping.items():
        if key == old or key.startswith(old + "_"):
            return new + key[len(old):]
    return key


class Checkpointer:
    def __init__(self, directory, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def generations(self):
        """Checkpoint folders, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if p.is_dir() and (m := _EPOCH_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self):
        generations = self.generations()
        return generations[-1] if generations else None

    def latest_state(self) -> dict:
        """The newest checkpoint's state.json as it reads ({} when none or unreadable): unverified,
        for reporting how far a run got, never for resuming."""
        latest = self.latest()
        try:
            return json.loads((latest / STATE).read_text()) if latest is not None else {}
        except (OSError, ValueError):
            return {}

    def save(self, epoch, model, optimizer, state: dict, rng_states: list, ema=None, scaler=None):
        """A checkpoint of epoch `epoch`; rng_states holds every rank's RNG state, in rank order."""
        final = self.directory / f"epoch_{epoch:04d}"
        tmp = self.directory / f"{_TMP_PREFIX}{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        writing = final
        try:
            tmp.mkdir(parents=True)
            writing = final / MODEL
            paddle.save(model.state_dict(), str(tmp / writing.name))
            writing = final / OPTIMIZER
            names = {p.name: name for name, p in model.named_parameters()}  # not Paddle's per-process ids
            paddle.save({_rename(k, names): v for k, v in optimizer.state_dict().items()}, str(tmp / writing.name))
            if ema is not None:
                writing = final / EMA
                paddle.save(ema.state_dict(), str(tmp / writing.name))
            writing = final / RNG
            extras = {"rng": rng_states, "scaler": scaler.state_dict() if scaler is not None else None}
            with open(tmp / writing.name, "wb") as f:
                pickle.dump(extras, f)
            writing = final / STATE
            files = {p.name: file_digest(p) for p in sorted(tmp.iterdir())}
            content = {**state, "epoch": epoch, "files": files}
            (tmp / writing.name).write_text(json.dumps({**content, "sha256": _state_digest(content)}, indent=1))
            writing = final
            for path in tmp.iterdir():  # on disk before the rename makes them the checkpoint (power loss)
                _fsync(path)
            shutil.rmtree(final, ignore_errors=True)  # a same-epoch leftover from a killed run
            tmp.rename(final)
            _fsync(self.directory)
        except BaseException as exc:
            # No half-built checkpoint left behind, and its space back for result.csv and the logs;
            # the previous checkpoints are untouched.
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(exc):
                previous = self.latest()
                size = sum(p.stat().st_size for p in previous.iterdir()) if previous else 0
                hint = (f" (a checkpoint takes {human_bytes(size)}; trainer.keep_checkpoints={self.keep} of them "
                        "are kept)" if previous else "")
                raise disk_full_error(writing, exc, hint) from None
            raise
        for old in self.generations()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def remove_leftovers(self) -> list:
        """Remove what a killed save left: half-built checkpoint folders and temporaries."""
        if not self.directory.is_dir():
            return []
        removed = [p for p in sorted(self.directory.glob(_TMP_PREFIX + "*")) if p.is_dir()]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed + remove_temporaries(self.directory)

    def save_best(self, model):
        with atomic_path(self.directory / BEST) as tmp:
            paddle.save(model.state_dict(), str(tmp))

    def verify(self, folder: Path) -> dict:
        """state.json of a checkpoint whose files all match their checksums, else UserError."""
        previous = [g for g in self.generations() if g != folder]
        way_out = ("set trainer.resume=false to start afresh"
                   + (f", or delete it to resume from {previous[-1].name}" if previous else ""))
        try:
            state = json.loads((folder / STATE).read_text())
            recorded = state.pop("sha256", None)
            if recorded != _state_digest(state):
                raise ValueError("state.json does not match its checksum" if recorded else
                                 "state.json has no checksum of its own (written by an older convitlab)")
            for name, digest in state["files"].items():
                if file_digest(folder / name) != digest:
                    raise ValueError(f"{name} does not match its checksum")
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"checkpoint {folder} is damaged ({exc}): {way_out}") from None
        return state

    def load(self, folder, model, optimizer, ema=None, scaler=None) -> dict:
        folder = Path(folder)
        state = self.verify(folder)
        model.set_state_dict(paddle.load(str(folder / MODEL)))
        ids = {name: p.name for name, p in model.named_parameters()}
        saved = paddle.load(str(folder / OPTIMIZER))
        optimizer.set_state_dict({_rename(k, ids): v for k, v in saved.items()})
        if ema is not None and (folder / EMA).exists():
            ema.set_state_dict(paddle.load(str(folder / EMA)))
        with open(folder / RNG, "rb") as f:
            extras = pickle.load(f)
        rank = distributed.rank()  # each rank resumes its own random stream (drop path, dropout)
        states = extras["rng"]
        rng.restore(states[rank] if rank < len(states) else states[0])  # on any device and GPU count
        if scaler is not None and extras.get("scaler"):
            scaler.load_state_dict(extras["scaler"])
        return state
