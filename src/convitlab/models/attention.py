"""The two attention kinds of ConViT: gated positional self-attention (GPSA) and plain MHSA.

ReferenceGPSA is GPSA as the paper and the reference code write it: the documented formulation.
GPSA, which the models use, is its fast path: the same function (tests/test_attention_paths.py),
the mixed map never formed. attention_maps returns the maps that forward applies, from the same
code (content_attention), checked against forward's output in the same test file.
"""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from convitlab.ops import cpu_kernels
from convitlab.ops.cpu_layers import Linear, kernel_fits


def relative_positions(grid_h: int, grid_w: int) -> paddle.Tensor:
    """[N, N, 3] features (dx, dy, dx² + dy²) of key j relative to query i, patches row-major."""
    rows = paddle.arange(grid_h, dtype="float32").unsqueeze(1).expand([grid_h, grid_w]).flatten()
    cols = paddle.arange(grid_w, dtype="float32").unsqueeze(0).expand([grid_h, grid_w]).flatten()
    dx = cols.unsqueeze(0) - cols.unsqueeze(1)  # [query, key]
    dy = rows.unsqueeze(0) - rows.unsqueeze(1)
    return paddle.stack([dx, dy, dx * dx + dy * dy], axis=-1)


def local_window_offsets(num_heads: int):
    """The (dx, dy) window centre the local init gives each head; None for heads beyond k²."""
    k = int(math.isqrt(num_heads))
    centre = (k - 1) / 2 if k % 2 == 0 else k // 2
    offsets = [None] * num_heads
    for h1 in range(k):
        for h2 in range(k):
            offsets[h1 + k * h2] = (h2 - centre, h1 - centre)
    return offsets


class GPSA(nn.Layer):
    """Gated positional self-attention on patch tokens (no class token), the fast path.

    Each head mixes content attention softmax(q kᵀ) with a learned, input-independent
    positional attention softmax(pos_proj(r)), weighted by σ(λ_h) (ReferenceGPSA spells it out).
    """

    def __init__(self, dim, num_heads, grid_size, attn_drop=0.0, proj_drop=0.0,
                 locality_strength=1.0, use_local_init=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.locality_strength = locality_strength
        self.use_local_init = use_local_init
        self.qk = nn.Linear(dim, dim * 2, bias_attr=False)
        self.v = nn.Linear(dim, dim, bias_attr=False)
        self.proj = Linear(dim, dim)
        self.pos_proj = Linear(3, num_heads)
        self.gating_param = self.create_parameter(
            [num_heads], default_initializer=nn.initializer.Constant(1.0))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.set_grid(grid_size)

    def set_grid(self, grid_size):
        # Depends only on the grid: built once, never saved in a checkpoint.
        self.register_buffer("rel_positions", relative_positions(*grid_size), persistable=False)

    def local_init(self):
        """Make each of the first k² heads a Gaussian window around its own offset (a conv)."""
        dim = self.v.weight.shape[0]
        self.v.weight.set_value(paddle.eye(dim, dtype=self.v.weight.dtype))
        weight = self.pos_proj.weight.numpy()  # [3 (dx, dy, d²), heads]
        for head, offset in enumerate(local_window_offsets(self.num_heads)):
            if offset is not None:
                weight[:, head] = (2 * offset[0], 2 * offset[1], -1.0)
        self.pos_proj.weight.set_value(weight * self.locality_strength)

    def positional_attention(self):
        """[H, N, N]: the same for every image, so computed once per forward pass."""
        scores = self.pos_proj(self.rel_positions)  # [N, N, H]
        return softmax(scores.transpose([2, 0, 1]))

    def _qkv(self, x):
        """[B, N, 3D]: qk and v stay separate parameters (the checkpoint layout) but run as one
        product."""
        return paddle.matmul(x, paddle.concat([self.qk.weight, self.v.weight], axis=1))

    def attention_maps(self, x):
        """Content, positional and combined attention for normed patch tokens x [B, N, D]: the
        combined map is what forward applies to v (rows sum to 1: the reference's renormalisation
        is left out, as in forward)."""
        content, _ = content_attention(self._qkv(x), self.num_heads, self.scale)
        positional = self.positional_attention()
        gate = F.sigmoid(self.gating_param).reshape([-1, 1, 1])
        return {"content": content, "positional": positional, "combined": (1.0 - gate) * content + gate * positional}

    def forward(self, x):
        qkv = self._qkv(x)
        gate = F.sigmoid(self.gating_param).reshape([-1, 1, 1])
        positional = gate * self.positional_attention()  # [H, N, N], small
        if fused_attention_wanted(qkv, self.head_dim) and not (self.training and self.attn_drop.p > 0):
            # (1 - g) softmax(q kᵀ) v is plain attention: one fused kernel, the [B, H, N, N] map
            # never stored; the positional part stays one shared product. Token-major throughout.
            # No dropout here, and the default scale 1/sqrt(d) is self.scale (see fused_attention_call).
            q, k, v = split_tokens(qkv, self.num_heads)
            content = F.scaled_dot_product_attention(q, k, v, training=self.training)
            out = (1.0 - gate.reshape([-1, 1])) * content + batch_shared_matmul(positional, v, layout="token_major")
            return self.proj_drop(self.proj(out.flatten(2)))
        content, v = content_attention(qkv, self.num_heads, self.scale)
        # Rows of a convex mix of two softmaxes sum to 1: the reference's renormalisation is
        # a no-op up to rounding and is skipped here.
        if self.training and self.attn_drop.p > 0:  # dropout must see the mixed map
            out = paddle.matmul(self.attn_drop((1.0 - gate) * content + positional), v)
            return self.proj_drop(self.proj(merge_heads(out)))
        # A v = (1 - g) (C v) + (g P) v: the mixed [B, H, N, N] map is never formed, and
        # the positional product is one matrix product per head for the whole batch.
        return self.proj_drop(self.proj(gated_heads(paddle.matmul(content, v), positional, v, gate)))


class ReferenceGPSA(GPSA):
    """GPSA as the paper (d'Ascoli et al. 2021, eq. 5) and the reference code formulate it; the
    same parameters and function as GPSA, slower (src/bench.py's "baseline" times it):

        A_h = normalise((1 - σ(λ_h)) softmax(q_h k_hᵀ / √d) + σ(λ_h) softmax(v_pos,h · r)),
        out = proj(concat_h(A_h v_h)),

    r the relative positions (dx, dy, dx² + dy²) of key to query, expanded over the batch and
    projected per image as the reference does (batch_positions); rows are renormalised as it does.
    """

    def forward(self, x):
        batch, tokens, dim = x.shape
        positions = self.batch_positions(batch, tokens)  # [B, N, N, 3]
        pos_scores = self.pos_proj(positions).transpose([0, 3, 1, 2])  # [B, H, N, N]
        qk = self.qk(x).reshape([batch, tokens, 2, self.num_heads, self.head_dim]).transpose([2, 0, 3, 1, 4])
        q, k = qk[0], qk[1]
        v = self.v(x).reshape([batch, tokens, self.num_heads, self.head_dim]).transpose([0, 2, 1, 3])
        content = F.softmax(paddle.matmul(q, k.transpose([0, 1, 3, 2])) * self.scale, axis=-1)
        positional = F.softmax(pos_scores, axis=-1)
        gate = F.sigmoid(self.gating_param).reshape([1, -1, 1, 1])
        attn = (1.0 - gate) * content + gate * positional
        attn = self.attn_drop(attn / attn.sum(axis=-1).unsqueeze(-1))
        out = paddle.matmul(attn, v).transpose([0, 2, 1, 3]).reshape([batch, tokens, dim])
        return self.proj_drop(self.proj(out))

    def batch_positions(self, batch, tokens):
        return self.rel_positions.unsqueeze(0).expand([batch, tokens, tokens, 3])


class MHSA(nn.Layer):
    """Plain multi-head self-attention (qkv without bias, as in ConViT)."""

    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias_attr=False)
        self.proj = Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention_maps(self, x):
        """The attention forward applies to v, for normed tokens x [B, N, D]."""
        content, _ = content_attention(paddle.matmul(x, self.qkv.weight), self.num_heads, self.scale)
        return {"content": content, "positional": None, "combined": content}

    def forward(self, x):
        qkv = paddle.matmul(x, self.qkv.weight)
        if fused_attention_wanted(qkv, self.head_dim):
            q, k, v = split_tokens(qkv, self.num_heads)
            # Paddle 3.0-3.2 ignore `training` without a mask: dropout_p itself is 0 outside training.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                                 training=self.training)
            return self.proj_drop(self.proj(out.flatten(2)))
        attn, v = content_attention(qkv, self.num_heads, self.scale)
        out = paddle.matmul(self.attn_drop(attn), v)
        return self.proj_drop(self.proj(merge_heads(out)))


FUSED_ATTENTION = True  # False: always the explicit softmax(q kᵀ) v
_CUDA_BUILD = paddle.is_compiled_with_cuda()
FLASH_MIN_CAPABILITY = (8, 0)  # FlashAttention-2, Paddle's flash kernel: Ampere (A100, RTX 30xx) or newer
FLASH_MAX_HEAD_DIM = 256


def version_tuple(version: str):
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
    return (version_tuple(paddle_version) >= (3, 0) and device.startswith("gpu")
            and dtype in ("float16", "bfloat16") and tuple(capability)[:2] >= FLASH_MIN_CAPABILITY
            and head_dim % 8 == 0 and head_dim <= FLASH_MAX_HEAD_DIM)


_fused_decisions = {}  # (device, dtype, head_dim) -> bool, decided once


def fused_attention_wanted(qkv, head_dim: int) -> bool:
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


def split_heads(qkv, num_heads):
    """[B, N, 3D] (q | k | v columns) -> q, k, v, each [B, H, N, d] (head-major, for matmul).

    On the CPU one compiled pass (cpu_kernels); else the heads of all three split off by a single
    transpose: a split into q, k, v and three head transposes cost 3.2 ms per block (convit_tiny
    at 224, batch 32), this 1.8 ms.
    """
    if kernel_fits(qkv, "head_layouts"):
        return cpu_kernels.split_heads(qkv, num_heads)
    return paddle.unbind(qkv.reshape([0, 0, 3, num_heads, -1]).transpose([2, 0, 3, 1, 4]), axis=0)


def softmax(x):
    """Softmax over the last axis; on the CPU one compiled pass (cpu_kernels: Paddle's CPU softmax
    is a scalar loop: 4.4 ms for convit_tiny's [64, 4, 65, 65] scores, this 1.0 ms; experiments/perf)."""
    return cpu_kernels.softmax(x, 1.0) if kernel_fits(x, "softmax") else F.softmax(x, axis=-1)


def content_attention(qkv, num_heads, scale):
    """softmax(q kᵀ · scale) [B, H, N, N] and v [B, H, N, d] from qkv [B, N, 3D]: the explicit
    path of forward and attention_maps alike. The compiled softmax takes the scale itself;
    without it, q is scaled before the product ([B, H, N, d] is 4x smaller than the scores at 224)."""
    q, k, v = split_heads(qkv, num_heads)
    if kernel_fits(qkv, "softmax"):
        return cpu_kernels.softmax(paddle.matmul(q, k, transpose_y=True), scale), v
    return F.softmax(paddle.matmul(q * scale, k, transpose_y=True), axis=-1), v


def split_tokens(qkv, num_heads):
    """[B, N, 3D] -> q, k, v, each [B, N, H, d] (token-major: scaled_dot_product_attention's
    layout; no transpose at all)."""
    return paddle.unbind(qkv.reshape([0, 0, 3, num_heads, -1]), axis=2)


def merge_heads(x):
    """[B, H, N, d] -> [B, N, H*d]."""
    if kernel_fits(x, "head_layouts"):
        return cpu_kernels.merge_heads(x)
    return x.transpose([0, 2, 1, 3]).flatten(2)


def gated_heads(content_values, positional, v, gate):
    """GPSA's output tokens [B, N, H*d]: (1 - g_h) (C v)_h + (g P)_h v for content_values = C v and
    v [B, H, N, d], positional = g P [H, N, N], gate g [H, 1, 1].

    On the CPU, compiled re-layouts (cpu_kernels) put v beside the batch for the positional
    product and mix the two results while merging the heads: one pass each instead of two
    transposes, a broadcast product, an add and the heads' transpose (with their backward passes,
    ~3 ms per block at convit_tiny 32/4 batch 64).
    """
    if kernel_fits(v, "head_layouts"):
        shared = paddle.matmul(positional, cpu_kernels.values_by_head(v))  # [H, N, B*d]
        return cpu_kernels.gated_merge(content_values, shared, gate.reshape([-1]))
    return merge_heads((1.0 - gate) * content_values + batch_shared_matmul(positional, v))


# values layout -> the permutation that brings it to [H, N, B, d], and back
_TO_HEADS_TOKENS = {"head_major": ([1, 2, 0, 3], [2, 0, 1, 3]),   # [B, H, N, d]
                    "token_major": ([2, 1, 0, 3], [2, 1, 0, 3])}  # [B, N, H, d]


def batch_shared_matmul(maps, values, layout="head_major"):
    """maps [H, N, N] (the same for every image) times values ([B, H, N, d], or [B, N, H, d]
    with layout="token_major"), in the values' layout.

    Broadcasting maps over the batch would make the backward pass reduce a [B, H, N, N]
    gradient; laying the batch beside d makes it one [N, N] x [N, B*d] product per head.
    """
    forward, back = _TO_HEADS_TOKENS[layout]
    heads, tokens, batch, dim = (values.shape[axis] for axis in forward)
    stacked = values.transpose(forward).reshape([heads, tokens, batch * dim])
    out = paddle.matmul(maps, stacked).reshape([heads, tokens, batch, dim])
    return out.transpose(back)
