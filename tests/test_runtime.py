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
    monkeypatch.setattr(runtime, "_cpu_info", lambda: dict(vendor=vendor, flags=set(flags.split())))
    assert runtime.mkl_cpu_type() == expected


def test_cpu_info_reads_this_machine():
    info = runtime._cpu_info()
    if sys.platform.startswith("linux"):
        assert info["vendor"] and info["family"].isdigit() and info["model"].isdigit() and "fpu" in info["flags"]


def cpuinfo_text(vendor, family, model, flags, name="Some Processor"):
    """Two processors, as /proc/cpuinfo lists them: the first one's fields are the ones read."""
    first = (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
             f"model name\t: {name}\nstepping\t: 1\nflags\t\t: {flags}\nbugs\t\t: spectre_v1\n\n")
    return first + first.replace("processor\t: 0", "processor\t: 1").replace(flags, "fpu")


@pytest.mark.parametrize("vendor, family, model, flags, kind", [
    ("AuthenticAMD", 26, 2, SKX, "AMD family 26 (Zen 5)"),
    ("AuthenticAMD", 25, 97, SKX, "AMD family 25 (Zen 4)"),
    ("AuthenticAMD", 25, 33, "avx avx2 fma", "AMD family 25 (Zen 3)"),
    ("AuthenticAMD", 23, 49, "avx avx2 fma", "AMD family 23 (Zen 1/2)"),
    ("GenuineIntel", 6, 143, SKX + " amx_tile amx_bf16", "Intel family 6 model 143"),
])
def test_cpu_kind_from_cpuinfo(tmp_path, monkeypatch, vendor, family, model, flags, kind):
    (tmp_path / "cpuinfo").write_text(cpuinfo_text(vendor, family, model, flags))
    monkeypatch.setattr(runtime, "CPUINFO", str(tmp_path / "cpuinfo"))
    info = runtime._cpu_info()
    assert (info["vendor"], info["family"], info["model"], info["model_name"]) == (
        vendor, str(family), str(model), "Some Processor")
    assert info["flags"] == set(flags.split())  # the first processor's, not the second's
    assert runtime.cpu_kind(info) == kind


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
