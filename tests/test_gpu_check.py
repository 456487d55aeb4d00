"""What can be checked of the GPU checks without a GPU: `make check-gpu`'s first lines
(convitlab.ops.gpu_check) against a faked Paddle, its one-line refusal here, and that the flash test
of tests/test_gpu.py compares two passes of the same function."""
import subprocess
import sys
import types

import numpy as np
import paddle
import pytest
from helpers import ROOT, run

from convitlab.ops import gpu_check


def fake_paddle(cuda="12.6", gpus=(), count_error=None):
    def device_count():
        if count_error:
            raise count_error
        return len(gpus)

    cuda_api = types.SimpleNamespace(device_count=device_count,
                                     get_device_name=lambda i: gpus[i][0],
                                     get_device_capability=lambda i: gpus[i][1])
    return types.SimpleNamespace(__version__="3.3.1", is_compiled_with_cuda=lambda: cuda is not None,
                                 version=types.SimpleNamespace(cuda=lambda: cuda if cuda else "False"),
                                 device=types.SimpleNamespace(cuda=cuda_api))


def test_each_gpu_with_capability_driver_and_cuda():
    lines, usable = gpu_check.report(fake_paddle(gpus=[("NVIDIA A100-SXM4-40GB", (8, 0)), ("Tesla T4", (7, 5))]),
                                     "550.54.14")
    assert usable
    assert lines == ["GPU 0: NVIDIA A100-SXM4-40GB, compute capability 8.0, NVIDIA driver 550.54.14, "
                     "Paddle 3.3.1 built with CUDA 12.6",
                     "GPU 1: Tesla T4, compute capability 7.5, NVIDIA driver 550.54.14, "
                     "Paddle 3.3.1 built with CUDA 12.6"]


@pytest.mark.parametrize("paddle_module, driver, says", [
    (fake_paddle(cuda=None), None, ["the CPU build", "no NVIDIA driver found"]),
    (fake_paddle(), "535.104.05", ["(CUDA 12.6) sees no GPU", "NVIDIA driver 535.104.05 (too old)"]),
    (fake_paddle(count_error=RuntimeError("CUDA driver version is insufficient")), "470.82.01", ["(too old)"]),
    (fake_paddle(), "560.35.03", ["sees no GPU", "NVIDIA driver 560.35.03:"]),
])
def test_no_gpu_is_one_line_with_the_driver_requirement(paddle_module, driver, says):
    lines, usable = gpu_check.report(paddle_module, driver)
    assert not usable and len(lines) == 1
    assert "the cu126 wheels need NVIDIA driver >= 550.54" in lines[0]
    for part in says:
        assert part in lines[0]
    assert ("too old" in lines[0]) == (driver is not None and gpu_check.version_tuple(driver) < gpu_check.MIN_DRIVER)


def test_driver_version_from_the_kernel_module_without_nvidia_smi(monkeypatch, tmp_path):
    def no_nvidia_smi(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n"
                    "GCC version:  gcc version 12.2.0\n")
    real_open = open
    monkeypatch.setattr(subprocess, "run", no_nvidia_smi)
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        proc if path == "/proc/driver/nvidia/version" else path, *a, **k))
    assert gpu_check.driver_version() == "550.54.14"
    proc.unlink()
    assert gpu_check.driver_version() is None


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="checks the CPU build's refusal")
def test_check_gpu_refuses_here_in_one_line_first():
    out = run([sys.executable, "-m", "convitlab.ops.gpu_check"], timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    line, = out.stderr.strip().splitlines()
    assert line.startswith("no GPU visible: Paddle") and "NVIDIA driver >= 550.54" in line
    recipe = (ROOT / "Makefile").read_text().split("\ncheck-gpu:", 1)[1].splitlines()
    assert "convitlab.ops.gpu_check" in recipe[1]  # the machine's lines before the tests and the benchmark


def test_the_flash_comparison_runs_one_function_twice():
    """tests/test_gpu.py compares the fused path with the explicit one in training mode: the model
    it builds must give the same outputs twice (with the default drop_path_rate it did not)."""
    from test_gpu import batch, comparable_convit, small_convit

    x, _ = batch()
    model = comparable_convit()
    assert model.training
    np.testing.assert_array_equal(model(x).numpy(), model(x).numpy())
    noisy = small_convit()
    noisy.train()
    assert not np.array_equal(noisy(x).numpy(), noisy(x).numpy())  # what the fix is for
