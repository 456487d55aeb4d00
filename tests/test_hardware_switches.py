"""Every hardware-specific switch of convitlab.ops.runtime still exists in the installed Paddle and
does what the speed work relies on (experiments/perf/README.md): MKL_DEBUG_CPU_TYPE in the MKL
that Paddle bundles, the Paddle flags, glibc's mallopt, the thread count; and pyproject bounds
Paddle to the versions these were measured with.

Each check runs in a fresh Python, since the switches act when Paddle is first imported."""
import functools
import json
import os
import re
import sys
from pathlib import Path

import paddle
import pytest
from helpers import run
from packaging.requirements import Requirement

from convitlab.ops import runtime

ROOT = Path(__file__).resolve().parents[1]
SKX = "avx avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl"
# MKL's name of its code path for each MKL_DEBUG_CPU_TYPE the runtime sets (MKL_Get_Version's Processor)
MKL_PATHS = {"5": "(Intel(R) AVX2) enabled processors", "7": "(Intel(R) AVX-512) enabled processors"}
REAL_FLAGS = runtime.cpu_info()["flags"]


def python(code, env=None, args=(), **kwargs):
    """Run `code` in a fresh Python with this worktree's sources; its last stdout line, parsed as JSON."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT / "src")}
    out = run([sys.executable, "-c", code, *args], timeout=180, env={**base, **(env or {})}, **kwargs)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def needs_isa(cpu_type):
    """MKL's AVX-512 (or AVX2) kernels can only be run where the processor has those instructions."""
    needed = set(SKX.split()) if cpu_type == "7" else {"avx2"}
    if not needed <= REAL_FLAGS:
        pytest.skip(f"this processor lacks {sorted(needed - REAL_FLAGS)}: MKL_DEBUG_CPU_TYPE={cpu_type} cannot run here")


# What MKL runs, seen without a clock: the code path it names (MKL_Get_Version's Processor) and
# whether its products fuse multiply-adds. Each row of this product is e² - e·e, e = 1 + 2^-12: e²
# is not a float32, so unfused it is 0, fused (one rounding, AVX2 and AVX-512 kernels; the generic
# and AVX kernels have no FMA) it is ±2^-24. At 256³ MKL runs its sgemm kernels (below 64 it may not).
MKL_PROBE = """
import json
import numpy as np
e = np.float32(1 + 2 ** -12)
a, b = np.zeros((256, 256), np.float32), np.zeros((256, 256), np.float32)
a[:, 0], a[:, 1], b[0], b[1] = e, -e, e, e
def mkl_state(paddle, runtime):
    fused = bool(np.all(paddle.matmul(paddle.to_tensor(a), paddle.to_tensor(b)).numpy() != 0))
    return [runtime.paddle_mkl()[1], fused]
"""
MKL_STATE = MKL_PROBE + ("from convitlab.ops import runtime; runtime.setup(); import paddle; "
                         "print(json.dumps(mkl_state(paddle, runtime)))")


@functools.lru_cache
def mkl_state(cpu_type):
    """[the code path MKL names, whether its products fuse multiply-adds] when the user sets
    MKL_DEBUG_CPU_TYPE (None: Paddle as it comes)."""
    return python(MKL_STATE, env={"MKL_DEBUG_CPU_TYPE": cpu_type} if cpu_type else {"CONVITLAB_PADDLE_DEFAULTS": "1"})


def test_paddle_bundles_the_mkl_the_switch_was_measured_with():
    """MKL_DEBUG_CPU_TYPE is undocumented: its values were read off MKL 2019.0.5; a Paddle bundling
    another MKL needs them measured again (and pyproject's bound raised)."""
    version, path = runtime.paddle_mkl()
    assert version == runtime.MKL_MEASURED, f"Paddle {paddle.__version__} bundles MKL {version}"
    assert path


@pytest.mark.parametrize("cpu_type", ["5", "7"])
def test_mkl_debug_cpu_type_selects_the_code_path(cpu_type):
    """The switch is relied on for MKL's AVX2 (5) or AVX-512 (7) kernels, which fuse multiply-adds.
    Where MKL names that path (Intel, Zen 5) the name must say so; MKL 2019.0.5 on Zen 3 names its
    generic path whatever it runs, and there the kernels must differ from those it picks itself."""
    needs_isa(cpu_type)
    path, fused = mkl_state(cpu_type)
    assert fused, f"MKL_DEBUG_CPU_TYPE={cpu_type}: MKL's products do not fuse multiply-adds ({path})"
    if not path.endswith(MKL_PATHS[cpu_type]):
        default_path, default_fused = mkl_state(None)
        assert path == default_path and not default_fused, (path, default_path, default_fused)


CONFIGURE = MKL_PROBE + """
import importlib.util, os, sys
# runtime.py loaded as its own module, so its CPUINFO can point at a simulated processor before setup()
spec = importlib.util.spec_from_file_location("rt", sys.argv[1])
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
rt.CPUINFO = sys.argv[2]
assert "paddle" not in sys.modules
rt.setup()
import paddle
print(json.dumps([os.environ.get("MKL_DEBUG_CPU_TYPE"), *mkl_state(paddle, rt)]))
"""


def cpuinfo(vendor, family, model, flags):
    return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
            f"model name\t: a processor\nflags\t\t: {flags}\n\n")


@pytest.mark.parametrize("vendor, family, flags, expected", [
    ("AuthenticAMD", 26, SKX, "7"),            # Zen 4/5
    ("AuthenticAMD", 25, "avx avx2 fma", "5"),  # Zen 3
    ("GenuineIntel", 6, SKX, None),            # MKL dispatches Intel processors itself
])
def test_mkl_switch_is_set_before_paddle_loads_on_amd_only(tmp_path, vendor, family, flags, expected):
    """With /proc/cpuinfo saying AMD, configuring Paddle sets the switch and MKL then runs that path
    (the same name and kernels as when the user sets it); saying Intel, MKL is left to pick its
    path itself."""
    needs_isa(expected or "5")
    (tmp_path / "cpuinfo").write_text(cpuinfo(vendor, family, 1, flags))
    chosen, *state = python(CONFIGURE, args=(str(ROOT / "src" / "convitlab" / "ops" / "runtime.py"), str(tmp_path / "cpuinfo")))
    assert chosen == expected
    assert state == mkl_state(expected)


FLAGS = ("import json; from convitlab.ops import runtime; runtime.setup(); import paddle; from convitlab.ops.runtime import CPU_FLAGS; "
         "view = paddle.randn([4, 6]).transpose([1, 0]); "
         "print(json.dumps([paddle.get_flags(list(CPU_FLAGS)), view.is_contiguous()]))")


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="the CPU flags are set on a CPU build only")
def test_paddle_flags_exist_and_hold_after_import():
    flags, contiguous = python(FLAGS)  # get_flags raises on a flag this Paddle does not know
    assert flags == runtime.CPU_FLAGS
    assert contiguous  # without stride kernels a transpose is a copy, not a strided view
    # the user's own FLAGS_* win, and the stride flag is what makes the difference
    flags, contiguous = python(FLAGS, env={"FLAGS_use_stride_kernel": "1", "FLAGS_new_executor_serial_run": "0"})
    assert flags == {name: not value for name, value in runtime.CPU_FLAGS.items()}
    assert not contiguous


MALLOC = """
import ctypes, json
from convitlab.ops import runtime
runtime.setup()
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = Mallinfo2, ctypes.c_void_p
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 << 20)
print(json.dumps(libc.mallinfo2().hblkhd - before))  # bytes glibc serves by mmap
libc.free(ctypes.c_void_p(block))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_malloc_keeps_large_blocks_in_the_heap():
    """A 64 MiB block comes from the heap (kept when freed), not from a fresh mmap, unless opted out."""
    assert python(MALLOC) == 0
    assert python(MALLOC, env={"CONVITLAB_MALLOC_DEFAULTS": "1"}) >= 64 << 20


THREADS = ("import ctypes, json, os; from convitlab.ops import runtime; runtime.setup(); import paddle; "
           "mkl = ctypes.CDLL(os.path.join(os.path.dirname(paddle.__file__), 'libs', 'libmklml_intel.so')); "
           "print(json.dumps([mkl.MKL_Get_Max_Threads(), len(os.sched_getaffinity(0))]))")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_threads_are_the_available_cores_unless_the_user_chose():
    mkl_threads, cores = python(THREADS)
    assert mkl_threads == cores  # Paddle alone would use 1
    first_core = min(os.sched_getaffinity(0))
    assert python(THREADS, preexec_fn=lambda: os.sched_setaffinity(0, {first_core})) == [1, 1]
    assert python(THREADS, env={"OMP_NUM_THREADS": "1"})[0] == 1  # MKL caps larger counts at the cores


def test_pyproject_bounds_paddle_to_the_measured_versions():
    """The switches were measured with the installed Paddle: pyproject caps Paddle above it."""
    # the requirement strings as written (tomllib is Python 3.11+, the project supports 3.10)
    found = {Requirement(r).name: Requirement(r)
             for r in re.findall(r'"(paddlepaddle[^"]*)"', (ROOT / "pyproject.toml").read_text())}
    assert set(found) == {"paddlepaddle", "paddlepaddle-gpu"}
    for requirement in found.values():
        assert any(spec.operator in ("<", "<=") for spec in requirement.specifier), requirement
    assert found["paddlepaddle"].specifier.contains(paddle.__version__)
