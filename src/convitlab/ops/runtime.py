"""CPU threads, MKL and Paddle flags before Paddle loads; the machine record; device choice.

Paddle's CPU build pins itself to one thread (it sets OMP_NUM_THREADS=1 on import when
unset), so `setup()` imports Paddle and gives it every core this process may use. A count the
user set (OMP_NUM_THREADS) is left alone. Before the import it also points Paddle's bundled MKL
at the code path an AMD processor supports (it otherwise runs its generic, several times slower
kernels there) and makes glibc keep freed memory (see mkl_cpu_type, keep_freed_memory; measured:
experiments/perf/amd-zen5/README.md).
Importing convitlab does none of this: the entry points that run Paddle (src/train.py, eval.py,
bench.py, convert.py, maps.py, export.py, predict.py) call setup() before anything imports Paddle, and so must a notebook.
Paddle is imported inside the functions here: setup() must run before it loads.
"""
import ctypes
import logging
import os
import sys
import warnings

from convitlab.core.errors import UserError

log = logging.getLogger(__name__)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


CPUINFO = "/proc/cpuinfo"


def cpu_info() -> dict:
    """vendor, family, model, model_name and the set of ISA flags of the first processor in
    CPUINFO; empty values off Linux."""
    info = {"vendor": "", "family": "", "model": "", "model_name": "", "flags": set()}
    fields = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "model name": "model_name"}
    try:
        with open(CPUINFO) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in fields:
                    info[fields[key]] = value.strip()
                elif key == "flags":
                    info["flags"] = set(value.split())
                    break
    except OSError:
        pass
    return info


_AVX512_SKX = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
# What decides which kernels MKL, oneDNN and torch can use; recorded with every benchmark row.
ISA_FLAGS = ["avx2", "fma", *sorted(_AVX512_SKX), "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8"]
_AMD_CORES = {23: "Zen 1/2", 25: "Zen 3", 26: "Zen 5"}  # cpu family -> microarchitecture


def cpu_kind(info=None) -> str:
    """A label for the kind of processor, to keep figures from different kinds apart:
    "AMD family 26 (Zen 5)", "Intel family 6 model 143"."""
    info = info or cpu_info()
    vendor = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}.get(info["vendor"], info["vendor"] or "unknown")
    if vendor == "AMD" and info["family"].isdigit() and int(info["family"]) in _AMD_CORES:
        core = _AMD_CORES[int(info["family"])]
        if core == "Zen 3" and "avx512f" in info["flags"]:  # family 25 also holds Zen 4, which added AVX-512
            core = "Zen 4"
        return f"AMD family {info['family']} ({core})"
    return f"{vendor} family {info['family'] or '?'} model {info['model'] or '?'}"


# The MKL version the MKL_DEBUG_CPU_TYPE values below were measured with (Paddle 3.3.1 bundles it).
MKL_MEASURED = "2019.0.5"


def paddle_mkl():
    """(version, code path) of the MKL that Paddle bundles, as MKL itself reports them, e.g.
    ("2019.0.5", "Intel(R) Advanced Vector Extensions 512 (Intel(R) AVX-512) enabled processors"):
    the code path is the one MKL dispatches to (MKL_DEBUG_CPU_TYPE changes it). None without
    that library (a Paddle built without MKL, or not on Linux)."""
    import paddle

    class Version(ctypes.Structure):  # MKLVersion of mkl_types.h
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("update", ctypes.c_int),
                    ("status", ctypes.c_char_p), ("build", ctypes.c_char_p), ("processor", ctypes.c_char_p),
                    ("platform", ctypes.c_char_p)]
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(paddle.__file__), "libs", "libmklml_intel.so"))
        version = Version()
        lib.MKL_Get_Version(ctypes.byref(version))
    except (OSError, AttributeError):
        return None
    return f"{version.major}.{version.minor}.{version.update}", version.processor.decode()


def machine_record() -> dict:
    """What a speed figure depends on besides the code: the processor (vendor, family, model,
    the ISA flags in ISA_FLAGS, cpu_kind), the cores this process may use, Paddle's version and
    its MKL's version and code path."""
    import paddle
    info = cpu_info()
    mkl = paddle_mkl()
    return {"cpu_kind": cpu_kind(info), "cpu_vendor": info["vendor"], "cpu_family": info["family"],
            "cpu_model": info["model"], "cpu_model_name": info["model_name"],
            "cpu_isa": " ".join(flag for flag in ISA_FLAGS if flag in info["flags"]),
            "cores": available_cores(), "paddle_version": paddle.__version__,
            "paddle_mkl": mkl[0] if mkl else "", "paddle_mkl_path": mkl[1] if mkl else ""}


def mkl_cpu_type():
    """The MKL_DEBUG_CPU_TYPE that makes Paddle's bundled MKL (2019.0.5) use the code path this
    AMD processor supports, or None (Intel processors, or no AVX2).

    That MKL runs its generic ("def") kernels on non-Intel processors. Its undocumented switch
    chooses instead (sgemm kernels seen with `perf`): 0-1 def, 2 mc, 3 mc3, 4 avx, 5 avx2,
    6 avx512_mic (Xeon Phi, whose AVX-512ER instructions AMD processors lack), 7 avx512
    (Skylake-X: F/CD/BW/DQ/VL). AVX-512 is chosen where the processor has all of F/CD/BW/DQ/VL,
    else AVX2: each path runs the products several times faster than the generic one (measured:
    experiments/perf/amd-zen5/README.md, experiments/perf/amd-family25-model1/README.md). On a
    Zen 3 MKL names its path "Intel(R) Architecture processors" whichever it runs
    (tests/test_hardware_switches.py tells the kernels apart by their rounding).
    """
    info = cpu_info()
    if info["vendor"] != "AuthenticAMD":
        return None
    if _AVX512_SKX <= info["flags"]:
        return "7"
    return "5" if "avx2" in info["flags"] else None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep large freed blocks instead of returning them to the kernel.

    Paddle's CPU allocator hands every tensor to malloc; glibc serves blocks over its mmap
    threshold (128 KiB to 32 MiB, adaptive) with fresh mmaps and unmaps them on free, so each
    new activation of a few MiB page-faults in zeroed pages, which can cost an elementwise op
    most of its time (measured: experiments/perf/amd-zen5/README.md). The price: the process
    keeps its peak heap (RSS does not shrink after the peak). Skipped if the user set glibc's
    own variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) or CONVITLAB_MALLOC_DEFAULTS.
    """
    if not sys.platform.startswith("linux") or any(
            name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                            "CONVITLAB_MALLOC_DEFAULTS")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):  # not glibc
        return False


def setup() -> None:
    """Import Paddle with every available core, unless the user chose a thread count, with
    MKL's fast code path and glibc keeping freed memory (see mkl_cpu_type, keep_freed_memory).
    Call it before anything imports Paddle; once Paddle is loaded it does nothing.

    CONVITLAB_PADDLE_DEFAULTS=1 imports Paddle as it comes instead (one thread, MKL's own
    dispatch, stride kernels, glibc's defaults): what the seed notebook ran with.
    """
    if "paddle" in sys.modules:
        return
    _user_env.update({name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_DEBUG_CPU_TYPE")})
    if os.environ.get("CONVITLAB_PADDLE_DEFAULTS", "0") not in ("", "0"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import paddle  # noqa: F401
        return
    keep_freed_memory()
    cpu_type = mkl_cpu_type()  # MKL otherwise takes its generic (slow) code path on AMD processors
    if cpu_type:
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", cpu_type)
    # paddle.distributed.launch hands every rank the OMP_NUM_THREADS=1 that importing Paddle set
    # in the launcher: not the user's choice, so the ranks of a node share its cores instead.
    ranks_here = int(os.environ.get("PADDLE_LOCAL_SIZE", "1"))
    launched_one = "PADDLE_LOCAL_SIZE" in os.environ and os.environ.get("OMP_NUM_THREADS") == "1"
    user_choice = "OMP_NUM_THREADS" in os.environ and not launched_one
    with warnings.catch_warnings():  # Paddle warns about a missing ccache at import
        warnings.simplefilter("ignore")
        import paddle
    if not user_choice:  # set after import: setting the variable first makes Paddle print a warning
        set_cpu_threads(max(1, available_cores() // max(1, ranks_here)))
    flags = {name: value for name, value in CPU_FLAGS.items() if name not in os.environ}
    if flags and not paddle.is_compiled_with_cuda():
        paddle.set_flags(flags)


# Paddle flags set on a CPU build, unless the user set them (FLAGS_* variables):
# - FLAGS_use_stride_kernel: views (transpose, slice, unbind) otherwise become strided tensors
#   that the next op copies with a slow generic CPU kernel, which makes a head transpose many
#   times slower (measured: experiments/perf/amd-zen5/README.md).
# - FLAGS_new_executor_serial_run: paddle.jit.to_static programs otherwise run on a pool of
#   executor threads that fight the math threads for the cores, so to_static training would run
#   at a fraction of eager speed (measured: experiments/perf/amd-zen5/README.md).
CPU_FLAGS = {"FLAGS_use_stride_kernel": False, "FLAGS_new_executor_serial_run": True}


_user_env = {}  # the user's values (None: unset) of the variables set here or by importing Paddle


def user_environment() -> dict:
    """os.environ as the user had it, for child processes that are not Paddle (e.g. PyTorch):
    without the OMP_NUM_THREADS=1 that importing Paddle sets, which would pin them to one thread,
    and without the MKL_DEBUG_CPU_TYPE chosen here."""
    env = dict(os.environ)
    for name, value in _user_env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


_cpu_threads = None  # what set_cpu_threads last gave Paddle; OMP_NUM_THREADS then says 1


def set_cpu_threads(count: int) -> None:
    """Change Paddle's CPU thread count after import (e.g. parallel jobs sharing the cores)."""
    global _cpu_threads
    from paddle.base import core
    _cpu_threads = max(1, int(count))
    core.set_num_threads(_cpu_threads)  # private API: paddle.base.core.set_num_threads


def cpu_threads() -> int:
    """The CPU threads Paddle uses: ours if we set them, else the user's OMP_NUM_THREADS."""
    return _cpu_threads or int(os.environ.get("OMP_NUM_THREADS", "1"))


def select_device(requested: str) -> str:
    """'auto' takes the GPU when Paddle has one, else the CPU (said once)."""
    import paddle
    has_gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if requested == "gpu" and not has_gpu:
        raise UserError("trainer.device='gpu' is not available: this Paddle has no usable GPU "
                        "(install paddlepaddle-gpu, or use trainer.device=auto|cpu)")
    device = "gpu" if requested == "gpu" or (requested == "auto" and has_gpu) else "cpu"
    if requested == "auto" and device == "cpu":
        log.info("no GPU found: running on the CPU with %s threads", cpu_threads())
    if device == "gpu":
        rank_device = int(os.environ.get("FLAGS_selected_gpus", "0").split(",")[0])
        paddle.set_device(f"gpu:{rank_device}")
    else:
        paddle.set_device("cpu")
    return device
