"""Layers with hand-written passes where Paddle's stock CPU kernels are slow.

Same parameters, same results (to float32 rounding); the measurements behind each choice are in
experiments/perf/amd-zen5/README.md ("Hand-written layer passes").
- Linear: the bias gradient, a column sum, is a product with a ones vector (Paddle's CPU
  reduction is slow there), and the forward adds the bias inside the matrix product (addmm):
  Paddle's broadcasting add is a scalar loop, same-shape adds run in MKL's vectorised kernels.
- LayerNorm: the backward recomputes the statistics with matrix-vector products and same-shape
  elementwise ops; the forward stays the stock kernel. Below LAYER_NORM_MIN_ELEMENTS (e.g. the
  demo's micro models, [544, 64]) the stock backward runs: there the ~20 small ops of the
  hand-written one cost more than it.
- GELU has no hand-written pass here: its backward needs an exp, which Paddle runs as a scalar loop.
GELU and LayerNorm run in convitlab's compiled kernels (cpu_kernels) when those are available
(backend.use_cpu_kernel, the switch attention_ops asks too); LayerNorm's passes here are the
fallback. On a GPU build, or with backend.CPU_BACKEND off, the stock layers run.
"""

import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from convitlab.ops import backend, cpu_kernels


def _custom_backward_wanted():
    return backend.CPU_BACKEND and paddle.is_grad_enabled()


def _rows(t):
    return t.reshape([-1, t.shape[-1]])


def _column_sum(rows):
    """Sum over rows of a [M, C] matrix as a product with a ones vector: [C]."""
    return paddle.matmul(paddle.ones([1, rows.shape[0]], dtype=rows.dtype), rows).reshape([-1])


def _needs_grad(*tensors):
    # Paddle wants None, not a gradient, for inputs that stop gradients (frozen layers).
    return [not t.stop_gradient for t in tensors]


def _affine(x, weight, bias):
    """x @ weight + bias with the bias added by the product (addmm), any leading dims."""
    out = paddle.addmm(bias.unsqueeze(0), _rows(x), weight)
    return out.reshape(list(x.shape[:-1]) + [weight.shape[1]])


class _LinearFunction(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.needs = _needs_grad(x, weight, bias)
        return _affine(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensor()
        need_x, need_weight, need_bias = ctx.needs
        rows = _rows(grad)
        return (paddle.matmul(grad, weight, transpose_y=True) if need_x else None,
                paddle.matmul(_rows(x), rows, transpose_x=True) if need_weight else None,
                _column_sum(rows) if need_bias else None)


class Linear(nn.Linear):
    def forward(self, x):
        if self.bias is None or not backend.CPU_BACKEND:
            return F.linear(x, self.weight, self.bias)
        if paddle.is_grad_enabled():
            return _LinearFunction.apply(x, self.weight, self.bias)
        return _affine(x, self.weight, self.bias)


class _LayerNormFunction(PyLayer):
    """Stock forward; backward from statistics recomputed with row products (no broadcasts
    over the big tensor except by [M, 1] columns and the [C] gain)."""

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon):
        ctx.save_for_backward(x, weight)
        ctx.epsilon = epsilon
        ctx.needs = _needs_grad(x, weight, bias)
        return F.layer_norm(x, x.shape[-1:], weight, bias, epsilon)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensor()
        need_x, need_weight, need_bias = ctx.needs
        rows, grad_rows = _rows(x), _rows(grad)
        mean_of = paddle.full([rows.shape[1], 1], 1.0 / rows.shape[1], dtype=rows.dtype)  # row means
        centred = rows - paddle.matmul(rows, mean_of)
        inv_std = paddle.rsqrt(paddle.matmul(centred * centred, mean_of) + ctx.epsilon)  # [M, 1]
        normed = centred * inv_std
        grad_x = None
        if need_x:
            g = grad_rows * weight
            grad_x = (g - paddle.matmul(g, mean_of) - normed * paddle.matmul(g * normed, mean_of)) * inv_std
            grad_x = grad_x.reshape(x.shape)
        return (grad_x,
                _column_sum(grad_rows * normed) if need_weight else None,
                _column_sum(grad_rows) if need_bias else None)


LAYER_NORM_MIN_ELEMENTS = 1 << 19  # the hand-written backward from this input size on (docstring above)


def _large(x, elements):
    """At least `elements` elements; a dimension unknown when tracing (-1) counts as large."""
    return any(d < 0 for d in x.shape) or math.prod(x.shape) >= elements


class GELU(nn.GELU):
    """Exact GELU; on the CPU through cpu_kernels when they are available."""

    def forward(self, x):
        if not self._approximate and backend.use_cpu_kernel(x, "gelu"):
            return cpu_kernels.gelu(x)
        return super().forward(x)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last axis with gain and bias (as ConViT uses it)."""

    def forward(self, x):
        affine_last_axis = self.weight is not None and self.bias is not None and len(self._normalized_shape) == 1
        if affine_last_axis and backend.use_cpu_kernel(x, "layer_norm"):
            return cpu_kernels.layer_norm(x, self.weight, self.bias, self._epsilon)
        if affine_last_axis and _custom_backward_wanted() and _large(x, LAYER_NORM_MIN_ELEMENTS):
            return _LayerNormFunction.apply(x, self.weight, self.bias, self._epsilon)
        return super().forward(x)
