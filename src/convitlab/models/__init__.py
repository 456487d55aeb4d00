"""The ConViT family: attention kinds, block, backbone and the named sizes.

Names load their module on first use, so reading the sizes (models/sizes.py, plain data) does
not import Paddle: the config schema and compare.py need them without it.
"""
import importlib

_WHERE = {"GPSA": "attention", "ReferenceGPSA": "attention", "MHSA": "attention", "Block": "convit",
          "ConViT": "convit", "create_model": "registry", "list_models": "sizes", "model_defaults": "sizes"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
