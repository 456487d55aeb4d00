"""Multi-threaded, vectorised float32 CPU kernels (cpu_kernels.cc): GELU, LayerNorm, softmax, and
attention's head re-layouts (q/k/v split, GPSA's values by head, the heads' merge with GPSA's
gated mix folded in), each forward and backward.

Paddle's CPU kernels for GELU, LayerNorm and softmax run on one thread, softmax as a scalar loop
(4.4 ms for convit_tiny's [64, 4, 65, 65] scores, this 1.0 ms: experiments/perf/*/kernel_ops.txt);
its transposes and broadcast products copy with generic strided loops. These run on the process's
threads (runtime.cpu_threads). The C++ source beside this file is compiled with the machine's C++
compiler ($CXX, else c++; $CXXFLAGS appended) on first use (20-30 s, once per cache key: source,
Paddle, Python ABI, compiler, flags, target, processor) into CACHE_ROOT, and loaded from there by
every later process. Without a compiler, or if the build fails, `available()` is False (said once
in the log) and their callers (cpu_layers, attention_ops) run Paddle's ops. Each kernel runs only
on the CPU kinds where it was measured faster than the Paddle op it replaces (`wanted`,
MEASURED_SPEEDUP); CONVITLAB_CPU_KERNELS=0 turns them all off, =all on, =gelu,softmax chooses.
Inputs they cannot take raise ValueError; they have no second derivative (nor have Paddle's gelu,
softmax and layer_norm): a second backward pass through them raises.
"""
import fcntl
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import paddle

from convitlab.core.errors import UserError
from convitlab.ops import runtime

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
NAME = "convitlab_cpu_kernels"
ENV_SWITCH = "CONVITLAB_CPU_KERNELS"
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "convitlab" / "cpu_kernels"
# -fno-math-errno lets the exp loops call glibc's vector version (libmvec). -fno-trapping-math:
# GCC 12 otherwise duplicates the arithmetic after GELU's clamps into branches (jump threading)
# and then may not merge them back into selects, since a floating-point operation might trap:
# "not vectorized: control flow in loop" on AVX2 (AVX-512's masked operations hid it). Neither
# changes a result: no rounding is altered, and Paddle never enables floating-point traps.
# What Paddle's own build of a custom op adds: C++17, the C++11 ABI of libpaddle.so, its
# custom-kernel headers.
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-std=c++17",
             "-D_GLIBCXX_USE_CXX11_ABI=1", "-DPADDLE_WITH_CUSTOM_KERNEL", "-w"]
LD_FLAGS = ["-liomp5", "-lmvec"]
# Without the processor's ISA flags (an unreadable /proc/cpuinfo) every such host would share one
# key: a -march=native build made on one could then run on another that lacks its instructions.
PORTABLE_X86 = ["-march=x86-64", "-mtune=generic"]
NATIVE_X86 = ["-march=native", "-mprefer-vector-width=512"]
STALE_BUILD_S = 24 * 3600  # a build folder of another host this old is a killed build's

_state = {"loaded": False, "failed": False}

# The kernels, each switched as one: what replaces one Paddle op (or, head_layouts, a group of
# transposes and products that only move data).
KERNELS = ("gelu", "layer_norm", "softmax", "head_layouts")
# Each kernel's slowest speed-up over the Paddle op it replaces, over the rows of
# experiments/perf/<folder>/kernel_ops*.txt (convit_tiny's shapes at 32/4 and 224/16, the demo's
# micro model), at 1 and 2 threads (Intel: 2 threads, convit_tiny's shapes, LayerNorm not timed).
# A kernel runs only where it was faster; on a CPU kind not measured every kernel runs (each was
# faster on every kind measured so far).
MEASURED_SPEEDUP = {
    "AMD family 25 (Zen 3)":  # amd-family25-model1/
        {"gelu": 1.22, "layer_norm": 1.01, "softmax": 1.01, "head_layouts": 1.06},
    "Intel family 6 model 167": {"gelu": 3.5, "softmax": 3.2, "head_layouts": 1.9},  # intel-family6-model167/
    "AMD family 26 (Zen 5)":  # amd-zen5/
        {"gelu": 1.79, "layer_norm": 1.51, "softmax": 1.57, "head_layouts": 1.29},
}
_chosen = {}  # CONVITLAB_CPU_KERNELS's value -> the kernels it selects


def _select(setting: str) -> tuple:
    if setting == "0":
        return ()
    if setting == "all":
        return KERNELS
    if setting in ("", "1"):
        measured = MEASURED_SPEEDUP.get(runtime.cpu_kind(), {})
        return tuple(k for k in KERNELS if measured.get(k, float("inf")) > 1.0)
    names = tuple(name.strip() for name in setting.split(","))
    unknown = sorted(set(names) - set(KERNELS))
    if unknown:
        raise UserError(f"{ENV_SWITCH}={setting!r} is not allowed: 0, 1 (the measured choice), all, or a "
                        f"comma list of {', '.join(KERNELS)} (unknown: {', '.join(unknown)})")
    return names


def wanted(kernel: str) -> bool:
    """Whether `kernel` (one of KERNELS) runs here, by CONVITLAB_CPU_KERNELS: 1 or unset, the kernels
    measured faster on this CPU kind (MEASURED_SPEEDUP); all; 0, none; or a comma list of them."""
    setting = os.environ.get(ENV_SWITCH, "1")
    if setting not in _chosen:
        _chosen[setting] = _select(setting)
    return kernel in _chosen[setting]


def enabled() -> bool:
    """Wanted here: a CPU build of Paddle, not switched off, in dynamic mode (the ops are called
    through Paddle's dynamic custom-op entry). A static-graph program (paddle.jit.to_static with
    full_graph=True) keeps Paddle's ops; under to_static's default bytecode translation (SOT) the
    kernels are called as in dynamic mode (tests/test_cpu_kernels.py checks its gradients)."""
    return (os.environ.get(ENV_SWITCH, "1") != "0" and not paddle.is_compiled_with_cuda()
            and paddle.in_dynamic_mode())


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def _output(command) -> str:
    """stdout of a compiler query; "" when it fails (the key then holds the flags as written)."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def target_flags(isa_flags) -> list:
    """-march for this processor (native) when its ISA flags are known, a portable x86-64 target
    when not; none off x86 (the compiler's default target)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    return NATIVE_X86 if isa_flags else PORTABLE_X86


def resolved_target(flags) -> str:
    """The -march the compiler resolves `flags` to (e.g. "znver3" for -march=native on a Zen 3);
    the flags as written where the compiler cannot say (not GCC)."""
    found = re.search(r"^\s*-march=\s+(\S+)", _output([compiler(), *flags, "-Q", "--help=target"]), re.M)
    return found.group(1) if found else " ".join(flag for flag in flags if flag.startswith("-march"))


def compile_flags() -> list:
    """The build's flags: ours, the target's, then the user's $CXXFLAGS (last, so they win)."""
    return [*CXX_FLAGS, *target_flags(runtime.cpu_info()["flags"]), *shlex.split(os.environ.get("CXXFLAGS", ""))]


def compile_command(output: Path, flags=None, link=True) -> list:
    """The compiler's command line for SOURCE: a shared library `output` (link=False: an object
    file, for reading the compiler's reports)."""
    with warnings.catch_warnings():  # Paddle warns about a missing ccache on this import
        warnings.simplefilter("ignore")
        from paddle.utils.cpp_extension import extension_utils as paddle_ext
    includes = [*paddle_ext.find_paddle_includes(False), *paddle_ext.find_python_includes()]
    command = [compiler(), *(flags if flags is not None else compile_flags()), *(f"-I{d}" for d in includes)]
    if not link:
        return [*command, "-c", str(SOURCE), "-o", str(output)]
    libraries = paddle_ext.find_paddle_libraries(False)
    return [*command, "-shared", str(SOURCE), "-o", str(output), *(f"-L{d}" for d in libraries),
            *(f"-Wl,-rpath,{d}" for d in libraries), *LD_FLAGS,
            "-Wl,--no-as-needed", f"-l:{paddle_ext._get_core_name()}", "-Wl,--as-needed"]


def _cache_key() -> str:
    """What the built library depends on: the source, Paddle's version, the Python ABI (the library
    calls Python's C API), the compiler and its version, every flag, the target the compiler
    resolves them to, and the processor's ISA flags."""
    flags = compile_flags()
    version = _output([compiler(), "--version"]).partition("\n")[0]
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (paddle.__version__, sysconfig.get_config_var("EXT_SUFFIX") or "", compiler(), version,
                 " ".join(flags + LD_FLAGS), resolved_target(flags), " ".join(sorted(runtime.cpu_info()["flags"]))):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _remove_leftovers(root: Path) -> None:
    """Build folders of killed builds: this host's whose process is gone, other hosts' after a day
    (a build in progress elsewhere, where flock does not reach, is left alone until then)."""
    host = socket.gethostname()
    for folder in root.glob("build-*"):
        _, _, rest = folder.name.partition("-")
        owner, _, pid = rest.rpartition("-")[0].rpartition("-")
        if owner == host and pid.isdigit():
            gone = not Path(f"/proc/{pid}").exists() if Path("/proc/self").exists() else False
        else:
            try:
                gone = time.time() - folder.stat().st_mtime > STALE_BUILD_S
            except OSError:
                continue
        if gone:
            shutil.rmtree(folder, ignore_errors=True)


def _compile(output: Path) -> None:
    out = subprocess.run(compile_command(output), capture_output=True, text=True)
    if out.returncode != 0:
        lines = [line for line in out.stderr.splitlines() if "error" in line] or out.stderr.splitlines() or [""]
        raise RuntimeError(f"{compiler()} failed: {lines[0].strip()}")


def _build(target: Path) -> None:
    """Compile into a private folder, then move it to `target` in one rename, under a file lock
    so that parallel jobs (a sweep's joblib workers) compile once and never see half a build.
    Where the lock does not reach (flock across the nodes of some network file systems) two
    builds may race: the one renamed first is kept and the other process loads it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    so_file = target / (NAME + ".so")
    with open(target.parent / (target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if so_file.exists():
            return  # another process built it while this one waited
        _remove_leftovers(target.parent)
        log.info("compiling convitlab's CPU kernels (once for this processor, compiler, Python and Paddle) "
                 "into %s", target)
        scratch = Path(tempfile.mkdtemp(prefix=f"build-{socket.gethostname()}-{os.getpid()}-", dir=target.parent))
        try:
            (scratch / NAME).mkdir()
            _compile(scratch / NAME / (NAME + ".so"))
            try:
                os.rename(scratch / NAME, target)
            except OSError:
                if not so_file.exists():
                    raise
                log.info("another process built %s first: loading its library", target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def available() -> bool:
    """The kernels are wanted (see `enabled`) and loaded (compiled first if need be)."""
    if not enabled() or _state["failed"]:
        return False
    if not _state["loaded"]:
        try:
            with warnings.catch_warnings():  # Paddle warns about a missing ccache on this import
                warnings.simplefilter("ignore")
                from paddle.utils.cpp_extension.extension_utils import load_op_meta_info_and_register_op
            target = CACHE_ROOT / _cache_key()
            so_file = target / (NAME + ".so")
            if not so_file.exists():
                _build(target)
            load_op_meta_info_and_register_op(str(so_file))
            _state["loaded"] = True
        except Exception as error:  # no compiler, a failed build, a Paddle without custom ops
            _state["failed"] = True
            lines = str(error).strip().splitlines()
            log.warning("convitlab's CPU kernels are not available (%s: %s); Paddle's own ops run instead",
                        type(error).__name__, lines[-1] if lines else "")
            return False
    return True


def _threads() -> int:
    return runtime.cpu_threads()


calls = 0  # kernel calls made by this process: what src/bench.py reads to say whether they ran


def _run(name, *inputs_and_attrs):
    """The op's outputs; an input it refuses (the kernels check shapes, dtypes and head counts
    before any division) raises ValueError with the kernel's reason in one line."""
    global calls
    calls += 1
    try:
        return paddle._C_ops._run_custom_op(name, *inputs_and_attrs, _threads())  # private API: paddle._C_ops._run_custom_op
    except (OSError, ValueError, RuntimeError) as error:  # Paddle adds the C++ source line below the reason
        lines = str(error).strip().splitlines()
        raise ValueError(f"{name}: {lines[0] if lines else type(error).__name__}") from None


def gelu(x):
    """Exact (erf) GELU of a float32 CPU tensor; call only when `available()`."""
    return _run("convitlab_gelu", x)[0]


def layer_norm(x, weight, bias, epsilon):
    """LayerNorm of a float32 CPU tensor over its last axis with gain and bias; only when `available()`."""
    return _run("convitlab_layer_norm", x, weight, bias, float(epsilon))[0]


def softmax(x, scale):
    """softmax(scale * x) over the last axis of a float32 CPU tensor; only when `available()`."""
    return _run("convitlab_softmax", x, float(scale))[0]


def split_heads(qkv, num_heads):
    """[B, N, 3 * H * d] -> q, k, v, each [B, H, N, d]; only when `available()`."""
    return tuple(_run("convitlab_split_heads", qkv, int(num_heads)))


def values_by_head(v):
    """[B, H, N, d] -> [H, N, B * d]; only when `available()`."""
    return _run("convitlab_values_by_head", v)[0]


def gated_merge(content, positional, gate):
    """(1 - gate[h]) content [B, H, N, d] + positional [H, N, B * d] as tokens [B, N, H * d];
    only when `available()`."""
    return _run("convitlab_gated_merge", content, positional, gate)[0]


def merge_heads(x):
    """[B, H, N, d] -> [B, N, H * d]; only when `available()`."""
    return _run("convitlab_merge_heads", x, int(x.shape[1]))[0]
