"""nn.Linear with a cheaper bias gradient on the CPU (same parameters, same results)."""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer


class _LinearCPU(PyLayer):
    """x @ W + b whose backward sums the bias gradient with a matrix product.

    Paddle's CPU column-sum (the stock bias gradient) runs 44 ms for a [6272, 768] gradient,
    a ones-vector product under 1 ms: on convit_tiny that was a fifth of a training step.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        # Paddle wants None, not a gradient, for inputs that stop gradients (frozen layers).
        ctx.needs_grad = [not t.stop_gradient for t in (x, weight, bias)]
        return paddle.matmul(x, weight) + bias

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensor()
        need_x, need_weight, need_bias = ctx.needs_grad
        rows = grad.reshape([-1, grad.shape[-1]])
        grad_x = paddle.matmul(grad, weight, transpose_y=True) if need_x else None
        grad_weight = (paddle.matmul(x.reshape([-1, x.shape[-1]]), rows, transpose_x=True)
                       if need_weight else None)
        grad_bias = (paddle.matmul(paddle.ones([1, rows.shape[0]], dtype=grad.dtype), rows).reshape([-1])
                     if need_bias else None)
        return grad_x, grad_weight, grad_bias


# CPU builds only: on a GPU the stock reduction is fast and AMP keeps its own rules.
_CPU_BUILD = not paddle.is_compiled_with_cuda()


class Linear(nn.Linear):
    def forward(self, x):
        if _CPU_BUILD and self.bias is not None and paddle.is_grad_enabled():
            return _LinearCPU.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
