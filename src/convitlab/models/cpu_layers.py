"""Layers with hand-written backward passes where Paddle's stock CPU kernels are slow.

Same parameters, same forward results. Linear: the bias gradient, a column sum, takes 44 ms
for a [6272, 768] gradient (convit_tiny at 224, batch 32) with Paddle's CPU reduction, under
1 ms as a product with a ones vector; it was a fifth of a training step. (LayerNorm and GELU
backward passes written the same way were slower than the stock ones: Paddle's elementwise
CPU ops are single-threaded, so they stay stock.) On a GPU build the stock layers run.
"""

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

_CPU_BUILD = not paddle.is_compiled_with_cuda()


def _custom_backward_wanted():
    return _CPU_BUILD and paddle.is_grad_enabled()


def _rows(t):
    return t.reshape([-1, t.shape[-1]])


def _column_sum(rows):
    """Sum over rows of a [M, C] matrix as a product with a ones vector: [C]."""
    return paddle.matmul(paddle.ones([1, rows.shape[0]], dtype=rows.dtype), rows).reshape([-1])


def _needs_grad(*tensors):
    # Paddle wants None, not a gradient, for inputs that stop gradients (frozen layers).
    return [not t.stop_gradient for t in tensors]


class _LinearFunction(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.needs = _needs_grad(x, weight, bias)
        return paddle.matmul(x, weight) + bias

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
        if self.bias is not None and _custom_backward_wanted():
            return _LinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
