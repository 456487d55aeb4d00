"""Reading .pdparams from outside without running their code.

A .pdparams is a pickle, and unpickling calls whatever the file names: `paddle.load` on a
crafted file runs a shell command. Weights from elsewhere (published checkpoints, a file given
to eval.py, convert.py or load_pretrained) are read here instead, by an unpickler that builds
NumPy arrays and plain containers and refuses any other object the file asks for, in one line
naming the file, before anything of it is used.

What paddle.save writes (Paddle 2.x and 3.x, protocols 2 to 4), and so what is allowed: a dict
(or OrderedDict) of names to arrays rebuilt by numpy's _reconstruct / _frombuffer from a dtype
and bytes (_codecs.encode in protocol 2); tensors in nested containers saved as
tuple(name, array) (built through builtins.tuple); NumPy scalars; Paddle's bookkeeping keys
(StructuredToParameterName@@, UnpackBigParamInfor@@ for arrays split into slices). The run's
own checkpoints (checkpoints/epoch_*/) are trusted and read by paddle.load.
"""
import codecs
import collections
import pickle
from pathlib import Path

import numpy as np

from convitlab.core.errors import UserError, first_line

_RECONSTRUCT = np.empty(0).__reduce__()[0]        # numpy.{core,_core}.multiarray._reconstruct
_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]     # numpy.{core,_core}.numeric._frombuffer
_SCALAR = np.float32(0).__reduce__()[0]           # numpy.{core,_core}.multiarray.scalar
ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,          # bytes, as protocol 2 writes them
    ("builtins", "tuple"): tuple,                  # Paddle's tuple(name, array) for a tensor
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _SCALAR for core in ("core", "_core")},
}
_PLAIN = (str, bytes, int, float, bool, complex, type(None), np.generic)
_NAME_TABLE, _SPLIT_INFO = "StructuredToParameterName@@", "UnpackBigParamInfor@@"


class Refused(pickle.UnpicklingError):
    """The pickle asks for an object that is neither an array nor a plain container."""


class ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise Refused(f"it asks to run {module}.{name}")
        return ALLOWED[module, name]

    def persistent_load(self, pid):
        raise Refused(f"it asks for an external object ({str(pid)[:60]})")


def _check_plain(obj, depth=0):
    """Arrays of numbers, text or bytes in dicts, lists and tuples, and nothing else."""
    if depth > 100:
        raise Refused("it nests containers more than 100 deep")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise Refused(f"it holds an array of Python objects (dtype {obj.dtype})")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, depth + 1)
            _check_plain(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _check_plain(value, depth + 1)
    elif not isinstance(obj, _PLAIN):
        raise Refused(f"it holds a {type(obj).__module__}.{type(obj).__qualname__}")


def _as_arrays(obj):
    """Paddle's conventions undone: tuple(name, array) → array, split arrays joined, the name
    table dropped (what paddle.load does, without making tensors)."""
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        return obj[1]
    if isinstance(obj, dict):
        obj = dict(obj)
        obj.pop(_NAME_TABLE, None)
        for key, info in (obj.pop(_SPLIT_INFO, None) or {}).items():
            parts = [obj.pop(part) for part in info["slices"]]
            obj[key] = np.concatenate(parts).reshape(info["OriginShape"])
        return {key: _as_arrays(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_arrays(value) for value in obj)
    return obj


def load_arrays(path):
    """The content of a .pdparams (or any pickle of arrays) as NumPy arrays in plain containers.

    Raises UserError naming the file when it asks for anything else (nothing it names is run)
    or is not a readable pickle.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = ArrayUnpickler(f, encoding="latin1").load()
        _check_plain(obj)
        return _as_arrays(obj)
    except Refused as exc:
        raise UserError(f"checkpoint {str(path)!r} is refused: {exc}, and a weights file holds only arrays and "
                        "plain containers (nothing of it was run; use a .safetensors file or a .pdparams "
                        "written by paddle.save)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            ImportError, MemoryError, RecursionError) as exc:
        raise UserError(f"checkpoint {str(path)!r} is unreadable or corrupt ({first_line(exc)})") from None
