"""The GPU path of the attention (content attention by F.scaled_dot_product_attention, token-
major layout) computes what the explicit CPU path computes. Forced on the CPU, where Paddle runs
the same function as plain math, so it is checked without a GPU."""
import numpy as np
import paddle
import pytest

from convitlab.models import attention, create_model


def _run(model, x, train):
    model.train(train)
    model.clear_gradients()
    out = model(x)
    grads = {}
    if train:
        out.sum().backward()
        grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    return out.numpy(), grads


@pytest.mark.parametrize("name, local_up_to_layer", [("convit_micro", None), ("convit_micro", 0)])
@pytest.mark.parametrize("train", [False, True])
def test_fused_path_matches_explicit_path(monkeypatch, name, local_up_to_layer, train):
    paddle.seed(0)
    kwargs = {} if local_up_to_layer is None else {"local_up_to_layer": local_up_to_layer}
    model = create_model(name, **kwargs)
    x = paddle.randn([3, 1, 8, 8])
    explicit = _run(model, x, train)
    monkeypatch.setattr(attention, "fused_attention_wanted", lambda qkv: True)
    fused = _run(model, x, train)
    np.testing.assert_allclose(fused[0], explicit[0], rtol=1e-5, atol=1e-5)
    assert fused[1].keys() == explicit[1].keys()
    for key in explicit[1]:
        np.testing.assert_allclose(fused[1][key], explicit[1][key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_cpu_and_float32_keep_the_explicit_path():
    assert not attention.fused_attention_wanted(paddle.zeros([1, 4, 12]))
