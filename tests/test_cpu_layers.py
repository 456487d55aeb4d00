"""The hand-written CPU passes (cpu_layers) give the stock layers' outputs and gradients."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from convitlab.models import create_model
from convitlab.ops import backend, cpu_kernels, cpu_layers


@pytest.fixture(autouse=True)
def without_compiled_kernels(monkeypatch):
    """cpu_layers' own passes: what runs when the compiled kernels (test_cpu_kernels) are off."""
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")


def _grads(fn, *tensors):
    for t in tensors:
        t.clear_gradient()
    out = fn()
    (out * paddle.linspace(-1, 1, out.size).reshape(out.shape)).sum().backward()
    return out.numpy(), [t.grad.numpy() for t in tensors]


@pytest.mark.parametrize("shape", [[3, 5, 16], [7, 16]])
def test_linear_matches_stock(shape):
    paddle.seed(0)
    layer = cpu_layers.Linear(16, 24)
    layer.bias.set_value(paddle.randn([24]))
    x = paddle.randn(shape)
    x.stop_gradient = False
    tensors = (x, layer.weight, layer.bias)
    out, grads = _grads(lambda: layer(x), *tensors)
    ref_out, ref_grads = _grads(lambda: F.linear(x, layer.weight, layer.bias), *tensors)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with paddle.no_grad():
        np.testing.assert_allclose(layer(x).numpy(), ref_out, rtol=1e-5, atol=1e-6)


def test_layer_norm_matches_stock(monkeypatch):
    monkeypatch.setattr(cpu_layers, "LAYER_NORM_MIN_ELEMENTS", 0)  # the hand-written backward at this size
    paddle.seed(0)
    layer = cpu_layers.LayerNorm(32, epsilon=1e-6)
    layer.weight.set_value(paddle.randn([32]))
    layer.bias.set_value(paddle.randn([32]))
    x = paddle.randn([4, 9, 32]) * 3 + 2
    x.stop_gradient = False
    tensors = (x, layer.weight, layer.bias)
    out, grads = _grads(lambda: layer(x), *tensors)
    ref_out, ref_grads = _grads(lambda: F.layer_norm(x, [32], layer.weight, layer.bias, 1e-6), *tensors)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_frozen_parameters_get_no_gradient():
    layer, norm = cpu_layers.Linear(8, 8), cpu_layers.LayerNorm(8)
    for p in (layer.weight, norm.weight):
        p.stop_gradient = True
    x = paddle.randn([2, 8])
    x.stop_gradient = False
    norm(layer(x)).sum().backward()
    assert layer.weight.grad is None and norm.weight.grad is None
    assert layer.bias.grad is not None and norm.bias.grad is not None and x.grad is not None


def test_model_gradients_match_the_stock_layers(monkeypatch):
    monkeypatch.setattr(cpu_layers, "LAYER_NORM_MIN_ELEMENTS", 0)
    paddle.seed(0)
    model = create_model("convit_micro")
    x = paddle.randn([3, 1, 8, 8])

    def grads():
        model.clear_gradients()
        model(x).sum().backward()
        return {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}

    custom = grads()
    monkeypatch.setattr(backend, "CPU_BACKEND", False)  # what a GPU build runs
    stock = grads()
    assert custom.keys() == stock.keys()
    for name in stock:
        np.testing.assert_allclose(custom[name], stock[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("shape, hand_written", [
    ([32, 17, 64], False),   # the demo's micro models: batch 32, 16 patches + class token, width 64
    ([64, 65, 192], True),   # convit_tiny at 32/4, batch 64
    ([32, 197, 192], True),  # convit_tiny at 224/16, batch 32
])
def test_layer_norm_backward_by_size(shape, hand_written):
    """Small inputs take the stock backward (one kernel beats ~20 small ops there), large ones ours."""
    x = paddle.randn(shape)
    x.stop_gradient = False
    node = cpu_layers.LayerNorm(shape[-1])(x).grad_fn.name()
    assert ("LayerNormFunction" in node) == hand_written, node
