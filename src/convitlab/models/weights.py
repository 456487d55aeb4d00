"""Import of reference checkpoints: timm's .safetensors, the authors' .pth, our own .pdparams.

None of them runs code when read: .safetensors holds raw tensors, .pth is read by torch.load
with weights_only=True, and .pdparams (a pickle) by safe_pickle's arrays-only unpickler.

Reference (PyTorch) checkpoints use the same parameter names as convitlab; only Linear
weights differ, stored [out, in] there and [in, out] in Paddle.
"""
import logging
import os
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn
from safetensors.numpy import load_file

from convitlab.core.errors import UserError, broken_link, first_line
from convitlab.core.files import atomic_path
from convitlab.core.safe_pickle import load_arrays
from convitlab.models.convit import resize_pos_embed, square_grid

log = logging.getLogger(__name__)
FORMATS = (".safetensors", ".pth", ".pdparams")


def read_checkpoint(path):
    """(state dict of NumPy arrays of finite floats, layout) where layout is "reference" or "paddle"."""
    state, layout = _read_file(path)
    for name, value in state.items():
        check_weight(path, name, value)
    return state, layout


def check_weight(path, name, value) -> None:
    """A weight is an array of finite floating-point numbers: anything else (integers, booleans,
    text, NaN) would load as numbers no checkpoint meant, and train or evaluate on without a word."""
    where = f"checkpoint {str(path)!r}: {name}"
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        what = f"dtype {value.dtype}" if isinstance(value, np.ndarray) else f"a {type(value).__name__}"
        raise UserError(f"{where} holds {what}, not floating-point weights: give a file of the model's weights "
                        "(float16, float32 or float64 arrays)")
    bad = value.size - int(np.isfinite(value).sum())
    if bad:
        raise UserError(f"{where} holds {bad} NaN or infinite value(s) of {value.size}: these weights are damaged "
                        "or come from a diverged run; give a checkpoint from before it diverged")


def _read_file(path):
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} is a folder, not a file: give a {', '.join(FORMATS)} file "
                        "(a run's weights: <run dir>/checkpoints/best.pdparams)")
    if not path.is_file():
        link = broken_link(path)
        if link is not None:
            raise UserError(f"checkpoint {str(path)!r} is {link}: give a {', '.join(FORMATS)} file")
        if os.path.lexists(path):
            raise UserError(f"checkpoint {str(path)!r} is not a regular file: give a {', '.join(FORMATS)} file")
        raise UserError(f"checkpoint {str(path)!r} does not exist: give a {', '.join(FORMATS)} file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return load_file(str(path)), "reference"
        if suffix == ".pth":
            return _read_torch(path), "reference"
        if suffix == ".pdparams":  # a pickle: read without running any of it (safe_pickle)
            state = load_arrays(path)
            state = state.get("model", state) if isinstance(state, dict) else state
            if not isinstance(state, dict):
                raise UserError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a dict of weights")
            arrays = (np.ndarray, np.generic)  # anything else is refused by name (check_weight)
            return {k: np.asarray(v) if isinstance(v, arrays) else v for k, v in state.items()}, "paddle"
    except UserError:
        raise
    except Exception as exc:  # a torn or foreign file: say which file and why, in one line
        raise UserError(f"checkpoint {str(path)!r} is unreadable or corrupt ({first_line(exc)})") from None
    raise UserError(f"checkpoint {str(path)!r} has an unknown format: expected one of {', '.join(FORMATS)}")


def _read_torch(path):
    try:
        import torch  # optional: only .pth files need it
    except ImportError:
        raise UserError(f"reading {str(path)!r} needs PyTorch: pip install -e '.[torch]' "
                        "(or convert it to .safetensors elsewhere)") from None
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("model", state)
    # float() only for floats (NumPy has no bfloat16): integer tensors stay integers, for check_weight to refuse.
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).numpy()
            for k, v in state.items() if hasattr(v, "numpy")}


def linear_weight_names(model):
    return {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}


POLICIES = ("load", "finetune")


def fit_state_dict(model, state, layout="paddle", policy="load", channel_adapt="sum"):
    """`state`'s arrays in the model's names, layout and shapes: (values, notes), else a UserError.

    The one place a state dict is matched to a model. With either policy, Linear weights of the
    reference layout are transposed and a pos_embed of another square grid is interpolated.
    - policy="load" (eval.py, convert.py, load_pretrained): a head for another number of classes
      is refused, in a message of its own when it is the only misfit: a head that is not the
      checkpoint's would score random outputs as its classes.
    - policy="finetune" (engine/finetune.py): such a head keeps the model's initialisation; the
      relative positions some ports save (rel_indices) are skipped, as the model rebuilds them
      for its grid; the patch filters of a 3-channel file on a 1-channel model are summed over
      the channels, or averaged (channel_adapt="mean").
    Anything else that does not fit is one line listing the missing, unexpected and mis-shaped
    tensors. `notes` has one line per tensor skipped, re-initialised, resized or adapted.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: one of {', '.join(POLICIES)}")
    finetune = policy == "finetune"
    linear = linear_weight_names(model) if layout == "reference" else set()
    targets = model.state_dict()
    missing = sorted(set(targets) - set(state))
    misshaped, values, notes = [], {}, []
    unexpected, head_classes = [], []  # head_classes: the head's tensors of another class count
    for name in state:  # the file's order, for the notes
        if name not in targets:
            if finetune and name.split(".")[-1] == "rel_indices":  # a grid buffer some ports save
                notes.append(f"skipped {name} {list(np.shape(state[name]))}: relative positions, rebuilt "
                             "for the model's grid")
            else:
                unexpected.append(name)
            continue
        value = np.asarray(state[name], dtype=np.float32)
        if name in linear:
            value = value.T
        have, want = list(value.shape), list(targets[name].shape)
        if have == want:
            values[name] = value
        elif name == "pos_embed" and value.ndim == 3 and have[-1] == want[-1]:
            values[name] = resize_pos_embed_array(value, model.grid_size)  # UserError unless a square grid
            old = square_grid(have[1])
            notes.append(f"resized pos_embed {have} -> {want}: {old[0]}x{old[1]} grid interpolated (bicubic) "
                         f"to {model.grid_size[0]}x{model.grid_size[1]}")
        elif (finetune and name == "patch_embed.proj.weight" and value.ndim == 4 and have[1] == 3 and want[1] == 1
              and have[0] == want[0] and have[2:] == want[2:]):
            combine = value.sum if channel_adapt == "sum" else value.mean
            values[name] = combine(axis=1, keepdims=True)
            notes.append(f"adapted {name} {have} -> {want}: the 3 input channels' filters "
                         f"{'summed' if channel_adapt == 'sum' else 'averaged'} for 1-channel images")
        elif name.startswith("head.") and have[:-1] == want[:-1]:
            if finetune:
                values[name] = targets[name].numpy()
                notes.append(f"re-initialised {name} {want}: the file's {have} is for {have[-1]} classes, "
                             f"the data has {want[-1]}")
            else:
                head_classes.append((name, have, want))
        else:
            misshaped.append(f"{name} {have} vs model {want}")
    unexpected, misshaped, head_classes = sorted(unexpected), sorted(misshaped), sorted(head_classes)
    if head_classes and not (missing or unexpected or misshaped):
        name, have, want = head_classes[0]
        raise UserError(f"checkpoint's head is for {have[-1]} classes ({name} {have}), the model's for {want[-1]} "
                        f"(data.num_classes): use data.num_classes={have[-1]}, or fine-tune a new head with "
                        "train.py model.pretrained=<file>")
    misshaped += [f"{name} {have} vs model {want}" for name, have, want in head_classes]
    if missing or unexpected or misshaped:
        parts = [f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected),
                                     ("mis-shaped", misshaped)) if keys]
        raise UserError("checkpoint does not fit the model (" + "; ".join(parts) + ")")
    return values, notes


def set_state(model, values) -> None:
    """Assign fitted values (fit_state_dict's) to the model's tensors."""
    targets = model.state_dict()
    for name, value in values.items():
        targets[name].set_value(value)


def load_state_dict(model, state, layout="paddle", policy="load", channel_adapt="sum"):
    """Assign a NumPy state dict to `model` after fitting it (fit_state_dict); returns the notes."""
    values, notes = fit_state_dict(model, state, layout, policy, channel_adapt)
    set_state(model, values)
    return notes


def resize_pos_embed_array(value, grid):
    """A [1, N, C] pos_embed array of a square grid interpolated to `grid`."""
    old = square_grid(value.shape[1])
    if old is None:
        raise UserError(f"pos_embed has {value.shape[1]} positions, not a square grid: "
                        "cannot infer its resolution to interpolate")
    return resize_pos_embed(paddle.to_tensor(value), old, grid).numpy()


def load_pretrained(model, path):
    """Load a .safetensors (timm), .pth (authors, needs PyTorch) or .pdparams checkpoint."""
    state, layout = read_checkpoint(path)
    load_state_dict(model, state, layout)
    return model


def save_pdparams(model, path):
    """Save the model's weights as .pdparams, atomically."""
    with atomic_path(path) as tmp:
        paddle.save(model.state_dict(), str(tmp))
    return os.fspath(path)
