"""The private APIs convitlab relies on, where no public route exists: each is used in one place,
marked `# private API: <name>` there, and checked here, so an upgrade of Paddle or Hydra that
moves or changes one fails this file instead of a run.

- hydra._internal.utils.run_and_report: Hydra's only hook around composition (config_errors.py:
  its errors as one line with exit code 2).
- paddle.amp.AmpScaler._update: the scale update GradScaler.update() calls (engine/amp.py: without
  its float() of a shape-[1] tensor, which NumPy >= 2.4 refuses).
- paddle.io DataLoader's _try_shutdown_all: the only way to end the workers of a pass not read to
  its end (data/loaders.py).
- paddle._C_ops._run_custom_op: calls a registered custom op without Paddle's generated Python
  wrapper, which would need a build step per op (ops/cpu_kernels.py).
- paddle.base.core.set_num_threads: the thread count after import (ops/runtime.py; the public
  route, OMP_NUM_THREADS, is read only when Paddle loads).
"""
import inspect
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "convitlab"
USED = {"hydra._internal.utils.run_and_report": "config_errors.py",
        "paddle.amp.AmpScaler._update": "engine/amp.py",
        "_DataLoaderIterMultiProcess._try_shutdown_all": "data/loaders.py",
        "paddle._C_ops._run_custom_op": "ops/cpu_kernels.py",
        "paddle.base.core.set_num_threads": "ops/runtime.py"}


def test_each_private_api_is_marked_in_exactly_one_place():
    marks = {}
    for path in SRC.rglob("*.py"):
        for name in re.findall(r"# private API: ([\w.]+)", path.read_text()):
            marks.setdefault(name, []).append(path.relative_to(SRC).as_posix())
    assert marks == {name: [where] for name, where in USED.items()}


def test_hydra_run_and_report_wraps_every_step_of_a_command_line():
    import hydra._internal.utils as hydra_utils
    assert list(inspect.signature(hydra_utils.run_and_report).parameters) == ["func"]
    # _run_hydra hands its steps to the module's run_and_report, looked up when it runs
    assert "run_and_report(" in inspect.getsource(hydra_utils._run_hydra)


def test_grad_scaler_update_goes_through_update_and_its_counters():
    from paddle.amp.grad_scaler import AmpScaler, GradScaler
    assert "self._update()" in inspect.getsource(GradScaler.update)
    state = inspect.getsource(AmpScaler.__init__) + inspect.getsource(AmpScaler._update)
    for name in ("_enable", "_cache_found_inf", "_incr_count", "_decr_count", "_decr_every_n_nan_or_inf",
                 "_incr_every_n_steps", "_scale", "_decr_ratio", "_incr_ratio"):
        assert f"self.{name}" in state, name


def test_multi_process_loader_pass_has_try_shutdown_all():
    from paddle.io.dataloader import dataloader_iter
    assert callable(dataloader_iter._DataLoaderIterMultiProcess._try_shutdown_all)


@pytest.mark.parametrize("module, name", [("paddle._C_ops", "_run_custom_op"), ("paddle.base.core", "set_num_threads")])
def test_paddle_internals_exist(module, name):
    import importlib
    assert callable(getattr(importlib.import_module(module), name))
