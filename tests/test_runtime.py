"""runtime: the MKL code path chosen per processor, the malloc setting's opt-outs, and where the
set-up happens: in each entry point that runs Paddle, never on `import convitlab`."""
import os
import sys
from pathlib import Path

import paddle
import pytest
from helpers import run

from convitlab.core import tables
from convitlab.ops import runtime

ROOT = Path(__file__).resolve().parents[1]


def probe(code, **env):
    """Run `code` in a fresh Python with only these variables set (and the path to this checkout's
    sources); its stdout split into words."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", ""), **env}
    out = run([sys.executable, "-c", code], env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()

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
    monkeypatch.setattr(runtime, "cpu_info", lambda: dict(vendor=vendor, flags=set(flags.split())))
    assert runtime.mkl_cpu_type() == expected


def test_cpu_info_reads_this_machine():
    info = runtime.cpu_info()
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
    info = runtime.cpu_info()
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
    setup = "import os; from convitlab.ops import runtime; runtime.setup(); "
    assert probe(setup + "print(os.environ['MKL_DEBUG_CPU_TYPE'])", MKL_DEBUG_CPU_TYPE="4") == ["4"]


def test_paddle_defaults_opt_out():
    code = ("import os, paddle; from convitlab.ops import runtime; runtime.setup(); "
            "print(runtime.cpu_threads(), os.environ.get('MKL_DEBUG_CPU_TYPE'), "
            "paddle.get_flags(['FLAGS_use_stride_kernel'])['FLAGS_use_stride_kernel'])")
    assert probe(code, CONVITLAB_PADDLE_DEFAULTS="1") == ["1", "None", "True"]


def test_child_environment_drops_what_paddle_and_we_set():
    code = ("import os; from convitlab.ops import runtime; runtime.setup(); env = runtime.user_environment(); "
            "print(os.environ.get('OMP_NUM_THREADS'), env.get('OMP_NUM_THREADS'), env.get('MKL_DEBUG_CPU_TYPE'))")
    assert probe(code) == ["1", "None", "None"]
    assert probe(code, OMP_NUM_THREADS="2")[1] == "2"  # the user's own choice goes through


def test_importing_convitlab_has_no_side_effects():
    """Neither Paddle nor a thread or MKL setting comes with the package or its Paddle-free parts."""
    code = ("import os, sys, convitlab, convitlab.results.compare, convitlab.results.load, convitlab.core.tables, convitlab.config, "
            "convitlab.config_errors, convitlab.ops.runtime, convitlab.data.transforms, "
            "convitlab.models; print('paddle' in sys.modules, os.environ.get('OMP_NUM_THREADS'), "
            "os.environ.get('MKL_DEBUG_CPU_TYPE'))")
    assert probe(code) == ["False", "None", "None"]


@pytest.mark.parametrize("entry", ["train", "eval", "bench", "convert", "maps", "export", "predict"])
def test_each_paddle_entry_point_sets_up_the_runtime_before_paddle_loads(entry):
    """Loading the script (its top, not its main) gives Paddle every core, MKL's code path for this
    processor and the CPU flags; were Paddle loaded first, setup() would do nothing."""
    code = (f"import os, runpy; runpy.run_path({str(ROOT / 'src' / (entry + '.py'))!r}, run_name='probe'); "
            "import paddle; from convitlab.ops.runtime import cpu_threads; "
            "flags = paddle.get_flags(['FLAGS_use_stride_kernel', 'FLAGS_new_executor_serial_run']); "
            "print(cpu_threads(), os.environ.get('MKL_DEBUG_CPU_TYPE'), flags['FLAGS_use_stride_kernel'], "
            "flags['FLAGS_new_executor_serial_run'])")
    cpu_build = not paddle.is_compiled_with_cuda()
    assert probe(code) == [str(runtime.available_cores()), str(runtime.mkl_cpu_type()), str(not cpu_build),
                           str(cpu_build)]


def test_compare_runs_without_paddle(tmp_path):
    """src/compare.py, plots included, in a Python where importing Paddle fails."""
    for model, top1 in (("convit_micro", 60.0), ("deit_micro", 50.0)):
        for fraction in (0.5, 1.0):
            for seed in (0, 1):
                run_id = f"{model}_{fraction}_{seed}"
                tables.write_result(tmp_path / run_id, {"run_id": run_id, "model": model, "fraction": fraction,
                                                         "seed": seed, "status": "completed",
                                                         "top1": top1 * fraction + seed})
    code = ("import sys, runpy; sys.modules['paddle'] = None; "  # None: `import paddle` raises ImportError
            f"sys.argv = ['compare.py', *{[str(p) for p in sorted(tmp_path.iterdir())]!r}, '--out', 'out']; "
            f"runpy.run_path({str(ROOT / 'src' / 'compare.py')!r}, run_name='__main__')")
    out = run([sys.executable, "-c", code], cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "convit_micro" in out.stdout and (tmp_path / "out" / "comparison.csv").is_file()
    assert list((tmp_path / "out").glob("*.png")), "no plot drawn"

