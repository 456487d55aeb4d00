"""Results across runs: loading runs and sweeps as DataFrames (load.py), gathering a sweep
(sweeps.py), and the paper-style comparison: its tables and output files (compare.py), the
gain's interval and t-test (stats.py), its figures (plots.py) and what those two share (cells.py).

`from convitlab.results import load_results, load_metrics, load_locality` in a notebook.
"""
import importlib

_WHERE = {"load_results": "load", "load_metrics": "load", "load_locality": "load"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
