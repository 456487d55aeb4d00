"""Attention's ops, each choosing its backend inside (backend.py): convitlab's compiled CPU kernels,
Paddle's flash attention (a recent GPU, float16/bfloat16), else Paddle's own ops. Same function on
every backend; models/attention.py makes one call per op.

Layouts: qkv [B, N, 3D] holds the q | k | v columns; head-major is [B, H, N, d] (for matmul),
token-major [B, N, H, d] (scaled_dot_product_attention's).
"""
import paddle
import paddle.nn.functional as F

from convitlab.ops import backend, cpu_kernels


def softmax(x):
    """Softmax over the last axis; on the CPU one compiled pass (Paddle's CPU softmax is a scalar
    loop: experiments/perf/*/kernel_ops.txt)."""
    return cpu_kernels.softmax(x, 1.0) if backend.use_cpu_kernel(x, "softmax") else F.softmax(x, axis=-1)


def split_heads(qkv, num_heads):
    """qkv [B, N, 3D] -> q, k, v, each [B, H, N, d].

    On the CPU one compiled pass (cpu_kernels); else the heads of all three split off by one
    transpose, which copies less than a split into q, k, v and a transpose each
    (experiments/perf/amd-zen5/README.md).
    """
    if backend.use_cpu_kernel(qkv, "head_layouts"):
        return cpu_kernels.split_heads(qkv, num_heads)
    return paddle.unbind(qkv.reshape([0, 0, 3, num_heads, -1]).transpose([2, 0, 3, 1, 4]), axis=0)


def split_tokens(qkv, num_heads):
    """qkv [B, N, 3D] -> q, k, v, each [B, N, H, d] (token-major: no transpose at all)."""
    return paddle.unbind(qkv.reshape([0, 0, 3, num_heads, -1]), axis=2)


def merge_heads(x):
    """[B, H, N, d] -> [B, N, H*d]."""
    if backend.use_cpu_kernel(x, "head_layouts"):
        return cpu_kernels.merge_heads(x)
    return x.transpose([0, 2, 1, 3]).flatten(2)


def content_attention(qkv, num_heads, scale):
    """softmax(q kᵀ · scale) [B, H, N, N] and v [B, H, N, d] from qkv [B, N, 3D], explicitly.

    The compiled softmax takes the scale itself; without it, q is scaled before the product
    ([B, H, N, d] is 4x smaller than the scores at 224)."""
    q, k, v = split_heads(qkv, num_heads)
    if backend.use_cpu_kernel(qkv, "softmax"):
        return cpu_kernels.softmax(paddle.matmul(q, k, transpose_y=True), scale), v
    return F.softmax(paddle.matmul(q * scale, k, transpose_y=True), axis=-1), v


def _head_dim(qkv, num_heads):
    return qkv.shape[-1] // (3 * num_heads)


def attention(qkv, num_heads, scale, attn_drop, training):
    """Multi-head attention's output tokens [B, N, H*d]: concat_h attn_drop(softmax(q_h k_hᵀ · scale)) v_h.

    The flash kernel (backend.use_fused_attention) never stores the [B, H, N, N] map. It is not
    given `scale`: its default 1/sqrt(d) is the models' (backend.fused_attention_call).
    """
    if backend.use_fused_attention(qkv, _head_dim(qkv, num_heads)):
        q, k, v = split_tokens(qkv, num_heads)
        # Paddle 3.0-3.2 ignore `training` without a mask: dropout_p itself is 0 outside training.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop.p if training else 0.0, training=training)
        return out.flatten(2)
    attn, v = content_attention(qkv, num_heads, scale)
    return merge_heads(paddle.matmul(attn_drop(attn), v))


def gated_attention(qkv, positional, gate, num_heads, scale, training):
    """Gated positional attention's output tokens [B, N, H*d] without attention dropout:
    (1 - g_h) softmax(q_h k_hᵀ · scale) v_h + (g P)_h v_h, for positional = g P [H, N, N] (the same
    for every image) and the gate g [H, 1, 1]. The mixed [B, H, N, N] map is never formed.
    """
    if backend.use_fused_attention(qkv, _head_dim(qkv, num_heads)):
        # (1 - g) softmax(q kᵀ) v is plain attention: one fused kernel (its default scale, as in
        # `attention`); the positional part stays one shared product. Token-major throughout.
        q, k, v = split_tokens(qkv, num_heads)
        content = F.scaled_dot_product_attention(q, k, v, training=training)
        out = (1.0 - gate.reshape([-1, 1])) * content + batch_shared_matmul(positional, v, layout="token_major")
        return out.flatten(2)
    content, v = content_attention(qkv, num_heads, scale)
    return gated_heads(paddle.matmul(content, v), positional, v, gate)


def gated_heads(content_values, positional, v, gate):
    """(1 - g_h) (C v)_h + (g P)_h v_h as tokens [B, N, H*d], for content_values = C v and
    v [B, H, N, d], positional = g P [H, N, N], gate g [H, 1, 1].

    On the CPU, compiled re-layouts (cpu_kernels) put v beside the batch for the positional
    product and mix the two results while merging the heads: one pass each instead of two
    transposes, a broadcast product, an add and the heads' transpose, forward and backward
    (experiments/perf/*/kernel_ops.txt, "GPSA's output").
    """
    if backend.use_cpu_kernel(v, "head_layouts"):
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
