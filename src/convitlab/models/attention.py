"""The two attention kinds of ConViT: gated positional self-attention (GPSA) and plain MHSA.

ReferenceGPSA is GPSA as the paper and the reference code write it: the documented formulation.
GPSA, which the models use, computes the same function (tests/test_attention_paths.py) with the
mixed map never formed. attention_maps returns the maps that forward applies, from the same op
(ops.content_attention), checked against forward's output in the same test file. Which backend
runs each op (compiled CPU kernels, flash attention, Paddle's ops) is decided in ops/.
"""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from convitlab.ops import attention_ops as ops
from convitlab.ops.cpu_layers import Linear


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
    """Gated positional self-attention on patch tokens (no class token).

    Each head h mixes content attention C_h = softmax(q_h k_hᵀ / √d) with a learned,
    input-independent positional attention P_h = softmax(pos_proj(r))_h, weighted by the gate
    σ(λ_h): A_h = (1 - σ(λ_h)) C_h + σ(λ_h) P_h, out = proj(concat_h A_h v_h) (ReferenceGPSA
    spells it out as the reference code computes it).
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
        return ops.softmax(scores.transpose([2, 0, 1]))

    def gate(self):
        """σ(λ_h) per head, [H, 1, 1]: the weight of positional attention."""
        return F.sigmoid(self.gating_param).reshape([-1, 1, 1])

    def _qkv(self, x):
        """[B, N, 3D]: qk and v stay separate parameters (the checkpoint layout) but run as one
        product."""
        return paddle.matmul(x, paddle.concat([self.qk.weight, self.v.weight], axis=1))

    def attention_maps(self, x):
        """Content, positional and combined attention for normed patch tokens x [B, N, D]: the
        combined map is what forward applies to v (rows sum to 1: the reference's renormalisation
        is left out, as in forward)."""
        content, _ = ops.content_attention(self._qkv(x), self.num_heads, self.scale)
        positional = self.positional_attention()
        gate = self.gate()
        return {"content": content, "positional": positional, "combined": (1.0 - gate) * content + gate * positional}

    def forward(self, x):
        qkv = self._qkv(x)
        gate = self.gate()
        positional = gate * self.positional_attention()  # [H, N, N], small
        # Rows of a convex mix of two softmaxes sum to 1: the reference's renormalisation is
        # a no-op up to rounding and is skipped here.
        if self.training and self.attn_drop.p > 0:  # dropout must see the mixed map
            content, v = ops.content_attention(qkv, self.num_heads, self.scale)
            out = ops.merge_heads(paddle.matmul(self.attn_drop((1.0 - gate) * content + positional), v))
        else:  # A v = (1 - g) (C v) + (g P) v: the mixed [B, H, N, N] map is never formed
            out = ops.gated_attention(qkv, positional, gate, self.num_heads, self.scale, self.training)
        return self.proj_drop(self.proj(out))


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
        content, _ = ops.content_attention(paddle.matmul(x, self.qkv.weight), self.num_heads, self.scale)
        return {"content": content, "positional": None, "combined": content}

    def forward(self, x):
        qkv = paddle.matmul(x, self.qkv.weight)
        out = ops.attention(qkv, self.num_heads, self.scale, self.attn_drop, self.training)
        return self.proj_drop(self.proj(out))
