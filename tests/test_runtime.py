"""runtime: the MKL code path chosen per processor, and the malloc setting's opt-outs."""
import sys

import pytest
from helpers import run

from convitlab import runtime

SKX = "avx avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl"


@pytest.mark.parametrize("vendor, flags, expected", [
    ("AuthenticAMD", SKX, "7"),                          # Zen 4/5: MKL's Skylake-X AVX-512 path
    ("AuthenticAMD", "avx avx2 fma", "5"),               # Zen 1-3: the AVX2 path
    ("AuthenticAMD", "avx avx2 fma avx512f", "5"),       # partial AVX-512: not the SKX path
    ("AuthenticAMD", "sse4_2 avx", None),
    ("GenuineIntel", SKX, None),                         # MKL dispatches Intel by itself
    ("", "", None),                                      # no /proc/cpuinfo
])
def test_mkl_cpu_type(monkeypatch, vendor, flags, expected):
    monkeypatch.setattr(runtime, "_cpu_info", lambda: (vendor, set(flags.split())))
    assert runtime.mkl_cpu_type() == expected


def test_cpu_info_reads_this_machine():
    vendor, flags = runtime._cpu_info()
    if sys.platform.startswith("linux"):
        assert vendor and "fpu" in flags


@pytest.mark.parametrize("variable", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                      "CONVITLAB_MALLOC_DEFAULTS"])
def test_malloc_left_alone_when_the_user_chose(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    assert runtime.keep_freed_memory() is False


def test_user_mkl_choice_is_kept():
    probe = "import os, convitlab; print(os.environ['MKL_DEBUG_CPU_TYPE'])"
    env = {"MKL_DEBUG_CPU_TYPE": "4", "PATH": "/usr/bin:/bin"}
    out = run([sys.executable, "-c", probe], env=env, timeout=120)
    assert out.stdout.strip() == "4", out.stderr[-2000:]


def test_paddle_defaults_opt_out():
    probe = ("import os, convitlab, paddle; from convitlab.runtime import cpu_threads; "
             "print(cpu_threads(), os.environ.get('MKL_DEBUG_CPU_TYPE'), "
             "paddle.get_flags(['FLAGS_use_stride_kernel'])['FLAGS_use_stride_kernel'])")
    env = {"CONVITLAB_PADDLE_DEFAULTS": "1", "PATH": "/usr/bin:/bin"}
    out = run([sys.executable, "-c", probe], env=env, timeout=120)
    assert out.stdout.split() == ["1", "None", "True"], out.stderr[-2000:]


def test_child_environment_drops_what_paddle_and_we_set():
    probe = ("import os, convitlab; from convitlab.runtime import user_environment; env = user_environment(); "
             "print(os.environ.get('OMP_NUM_THREADS'), env.get('OMP_NUM_THREADS'), env.get('MKL_DEBUG_CPU_TYPE'))")
    out = run([sys.executable, "-c", probe], env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.stdout.split() == ["1", "None", "None"], out.stderr[-2000:]
    out = run([sys.executable, "-c", probe], env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}, timeout=120)
    assert out.stdout.split()[1] == "2"  # the user's own choice goes through
