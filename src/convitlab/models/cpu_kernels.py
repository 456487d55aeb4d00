"""Multi-threaded, vectorised float32 CPU kernels (cpu_kernels.cc): GELU, LayerNorm, softmax, and
attention's head re-layouts (q/k/v split, GPSA's values by head, the heads' merge with GPSA's
gated mix folded in), each forward and backward.

Paddle's CPU kernels for GELU, LayerNorm and softmax run on one thread, softmax as a scalar loop
(4.4 ms for convit_tiny's [64, 4, 65, 65] scores, this 1.0 ms: experiments/perf/*/kernel_ops.txt);
its transposes and broadcast products copy with generic strided loops. These run on the process's threads
(runtime.cpu_threads). The C++ source beside this file is compiled with the machine's C++
compiler on first use (paddle.utils.cpp_extension, 20-30 s, once per source / Paddle version /
processor) into CACHE_ROOT, and loaded from there by every later process. Without a compiler, or
if the build fails, `available()` is False (said once in the log) and the layers (cpu_layers,
attention) keep Paddle's ops. CONVITLAB_CPU_KERNELS=0 turns them off. Inputs they cannot take
raise ValueError; they have no second derivative (nor have Paddle's gelu, softmax and layer_norm):
a second backward pass through them raises.
"""
import contextlib
import fcntl
import hashlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import paddle

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
NAME = "convitlab_cpu_kernels"
ENV_SWITCH = "CONVITLAB_CPU_KERNELS"
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "convitlab" / "cpu_kernels"
# -march=native: the build is tied to this processor, so the cache key holds its ISA flags.
# -fno-math-errno lets the exp loops call glibc's vector version (libmvec).
CXX_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fopenmp"]
LD_FLAGS = ["-liomp5", "-lmvec"]

_state = {"loaded": False, "failed": False}


def enabled() -> bool:
    """Wanted here: a CPU build of Paddle, not switched off, in dynamic mode (the ops are called
    through Paddle's dynamic custom-op entry). A static-graph program (paddle.jit.to_static with
    full_graph=True) keeps Paddle's ops; under to_static's default bytecode translation (SOT) the
    kernels are called as in dynamic mode (tests/test_cpu_kernels.py checks its gradients)."""
    return (os.environ.get(ENV_SWITCH, "1") != "0" and not paddle.is_compiled_with_cuda()
            and paddle.in_dynamic_mode())


def _cache_key() -> str:
    from convitlab.runtime import _cpu_info
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (paddle.__version__, " ".join(CXX_FLAGS + LD_FLAGS), " ".join(sorted(_cpu_info()["flags"]))):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _build(target: Path) -> bool:
    """Compile into a private directory, then move it to `target` in one rename, under a file
    lock so that parallel jobs (a sweep's joblib workers) compile once and never see half a build.
    True when this process compiled it (then the ops are registered already)."""
    with warnings.catch_warnings():  # Paddle warns about a missing ccache on this import
        warnings.simplefilter("ignore")
        from paddle.utils.cpp_extension import load

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / (target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / (NAME + ".so")).exists():
            return False  # another process built it while this one waited
        log.info("compiling convitlab's CPU kernels (once for this processor and Paddle) into %s", target)
        scratch = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
        try:
            # load() prints a progress line and its compiler's output: keep them out of the run's output
            with contextlib.redirect_stdout(io.StringIO()):
                load(name=NAME, sources=[str(SOURCE)], extra_cxx_cflags=CXX_FLAGS, extra_ldflags=LD_FLAGS,
                     build_directory=str(scratch))
            os.rename(scratch / NAME, target)
            return True
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
            if so_file.exists() or not _build(target):
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
    from convitlab.runtime import cpu_threads
    return cpu_threads()


calls = 0  # kernel calls made by this process: what src/bench.py reads to say whether they ran


def _run(name, *inputs_and_attrs):
    """The op's outputs; an input it refuses (the kernels check shapes, dtypes and head counts
    before any division) raises ValueError with the kernel's reason in one line."""
    global calls
    calls += 1
    try:
        return paddle._C_ops._run_custom_op(name, *inputs_and_attrs, _threads())
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
