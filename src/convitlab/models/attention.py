"""The two attention kinds of ConViT: gated positional self-attention (GPSA) and plain MHSA."""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F


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

    Each head mixes content attention softmax(q kᵀ) with a learned, input-independent
    positional attention softmax(pos_proj(r)), weighted by σ(λ_h).
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
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
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
        return F.softmax(scores.transpose([2, 0, 1]), axis=-1)

    def _split_heads(self, x):
        q, k = self.qk(x).reshape([0, 0, 2, self.num_heads, self.head_dim]).transpose([2, 0, 3, 1, 4])
        v = self.v(x).reshape([0, 0, self.num_heads, self.head_dim]).transpose([0, 2, 1, 3])
        return q, k, v

    def attention_maps(self, x):
        """Content, positional and combined attention for normed patch tokens x [B, N, D]."""
        q, k, _ = self._split_heads(x)
        content = F.softmax(paddle.matmul(q, k, transpose_y=True) * self.scale, axis=-1)
        positional = self.positional_attention()
        gate = F.sigmoid(self.gating_param).reshape([-1, 1, 1])
        combined = (1.0 - gate) * content + gate * positional
        # The reference renormalises rows; they already sum to 1, so this only mirrors it.
        combined = combined / combined.sum(axis=-1, keepdim=True)
        return {"content": content, "positional": positional, "combined": combined}

    def forward(self, x):
        q, k, v = self._split_heads(x)
        content = F.softmax(paddle.matmul(q, k, transpose_y=True) * self.scale, axis=-1)
        gate = F.sigmoid(self.gating_param).reshape([-1, 1, 1])
        # Rows of a convex mix of two softmaxes sum to 1: the reference's renormalisation is
        # a no-op up to rounding and is skipped here.
        attn = (1.0 - gate) * content + gate * self.positional_attention()
        out = paddle.matmul(self.attn_drop(attn), v)
        out = out.transpose([0, 2, 1, 3]).flatten(2)
        return self.proj_drop(self.proj(out))


class MHSA(nn.Layer):
    """Plain multi-head self-attention (qkv without bias, as in ConViT)."""

    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias_attr=False)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def _split_heads(self, x):
        return self.qkv(x).reshape([0, 0, 3, self.num_heads, self.head_dim]).transpose([2, 0, 3, 1, 4])

    def attention_maps(self, x):
        q, k, _ = self._split_heads(x)
        content = F.softmax(paddle.matmul(q, k, transpose_y=True) * self.scale, axis=-1)
        return {"content": content, "positional": None, "combined": content}

    def forward(self, x):
        q, k, v = self._split_heads(x)
        attn = F.softmax(paddle.matmul(q, k, transpose_y=True) * self.scale, axis=-1)
        out = paddle.matmul(self.attn_drop(attn), v)
        out = out.transpose([0, 2, 1, 3]).flatten(2)
        return self.proj_drop(self.proj(out))
