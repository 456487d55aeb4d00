"""Which backend runs an op: the two switches every op of ops/ asks.

- use_cpu_kernel(x, kernel): convitlab's compiled CPU kernel (cpu_kernels) or Paddle's op.
- use_fused_attention(qkv, head_dim): Paddle's flash attention or the explicit softmax(q kᵀ) v.

CPU_BACKEND switches all of convitlab's CPU passes (the kernels and cpu_layers' hand-written
passes) at once: False runs Paddle's stock ops, as a GPU build does.
"""
import paddle

from convitlab.ops import cpu_kernels

CPU_BACKEND = not paddle.is_compiled_with_cuda()
FUSED_ATTENTION = True  # False: always the explicit softmax(q kᵀ) v
_CUDA_BUILD = paddle.is_compiled_with_cuda()
FLASH_MIN_CAPABILITY = (8, 0)  # FlashAttention-2, Paddle's flash kernel: Ampere (A100, RTX 30xx) or newer
FLASH_MAX_HEAD_DIM = 256


def use_cpu_kernel(x, kernel) -> bool:
    """convitlab's CPU kernel `kernel` (cpu_kernels.KERNELS) runs here (cpu_kernels.wanted) and can
    take x: a non-empty float32 tensor with at least one axis, on the CPU of a CPU build (not a GPU
    or another accelerator's), kernels loaded."""
    # `0 not in x.shape`, not `x.size > 0`: Tensor.size costs 8 µs, half of this whole test (Zen 3),
    # and the micro models call it 37 times per forward pass.
    return (CPU_BACKEND and x.dtype == paddle.float32 and cpu_kernels.available()  # dynamic mode: x has a place
            and cpu_kernels.wanted(kernel) and x.ndim > 0 and 0 not in x.shape and x.place.is_cpu_place())


def major_minor(version: str):
    """(major, minor) of a Paddle version string; a development build ("0.0.0") counts as newest."""
    parts = []
    for piece in str(version).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        parts.append(int(digits) if digits else 0)
    major, minor = (parts + [0, 0])[:2]
    return (99, 99) if (major, minor) == (0, 0) else (major, minor)


def fused_attention_call(paddle_version: str, device: str, capability, dtype: str, head_dim: int) -> bool:
    """Whether F.scaled_dot_product_attention runs its flash kernel here (pure: the caller gives
    Paddle's version, the device "cpu"/"gpu:N", its compute capability, the dtype, the head size).

    The call never passes `scale` (Paddle 3.0-3.2 have no such argument; 3.3 refuses its flash
    kernel whenever it is given and falls back to one that stores the full map): the default,
    1/sqrt(head_dim), is the models' scale. Without a mask, Paddle 3.0-3.2 send every GPU call to
    the flash kernel, which needs compute capability >= 8.0 and fails below; 3.3 checks that,
    the head size (a multiple of 8, at most 256) and the dtype itself. Elsewhere (the CPU, where
    Paddle runs it as the same products 20% slower than ours; float32; older GPUs; odd head
    sizes) the explicit path runs.
    """
    return (major_minor(paddle_version) >= (3, 0) and device.startswith("gpu")
            and dtype in ("float16", "bfloat16") and tuple(capability)[:2] >= FLASH_MIN_CAPABILITY
            and head_dim % 8 == 0 and head_dim <= FLASH_MAX_HEAD_DIM)


_fused_decisions = {}  # (device, dtype, head_dim) -> bool, decided once


def use_fused_attention(qkv, head_dim: int) -> bool:
    """Whether this forward pass computes its content attention with the flash kernel
    (fused_attention_call on this process's device; float16/bfloat16 come from trainer.amp)."""
    if not (FUSED_ATTENTION and _CUDA_BUILD) or qkv.dtype not in (paddle.float16, paddle.bfloat16):
        return False
    device = paddle.device.get_device()
    dtype = "float16" if qkv.dtype == paddle.float16 else "bfloat16"
    key = (device, dtype, head_dim)
    if key not in _fused_decisions:
        capability = (0, 0)
        if device.startswith("gpu"):
            capability = paddle.device.cuda.get_device_capability(int(device.partition(":")[2] or 0))
        _fused_decisions[key] = fused_attention_call(paddle.__version__, device, capability, dtype, head_dim)
    return _fused_decisions[key]
