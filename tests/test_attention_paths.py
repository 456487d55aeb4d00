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
    monkeypatch.setattr(attention, "fused_attention_wanted", lambda qkv, head_dim: True)
    fused = _run(model, x, train)
    np.testing.assert_allclose(fused[0], explicit[0], rtol=1e-5, atol=1e-5)
    assert fused[1].keys() == explicit[1].keys()
    for key in explicit[1]:
        np.testing.assert_allclose(fused[1][key], explicit[1][key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_cpu_and_float32_keep_the_explicit_path():
    previous = paddle.device.get_device()
    paddle.set_device("cpu")  # also on a GPU machine
    try:
        assert not attention.fused_attention_wanted(paddle.zeros([1, 4, 12]), 2)
        assert not attention.fused_attention_wanted(paddle.zeros([1, 4, 48], dtype="float16"), 16)
    finally:
        paddle.set_device(previous)


# (Paddle version, device, compute capability, dtype, head size) -> the flash kernel?
FUSED_CALLS = [
    ("3.3.1", "gpu:0", (8, 0), "float16", 48, True),      # A100
    ("3.0.0", "gpu:0", (8, 6), "bfloat16", 64, True),     # RTX 30xx on 3.0: no `scale` passed, so it runs
    ("3.2.0", "gpu:1", (9, 0), "float16", 16, True),      # H100
    ("3.3.1", "gpu:0", (7, 0), "float16", 48, False),     # V100: no flash kernel (3.0-3.2 would fail in it)
    ("3.1.0", "gpu:0", (7, 5), "float16", 48, False),     # T4
    ("3.3.1", "gpu:0", (8, 0), "float32", 48, False),     # float32: no flash kernel
    ("3.3.1", "cpu", (0, 0), "float16", 48, False),       # the CPU: ours is faster
    ("3.3.1", "gpu:0", (8, 0), "float16", 12, False),     # head size not a multiple of 8
    ("3.3.1", "gpu:0", (8, 0), "float16", 320, False),    # head size over 256
    ("2.6.2", "gpu:0", (8, 0), "float16", 48, False),     # before 3.0: not supported
    ("0.0.0", "gpu:0", (8, 0), "float16", 48, True),      # a development build counts as newest
]


@pytest.mark.parametrize("version, device, capability, dtype, head_dim, expected", FUSED_CALLS)
def test_which_devices_take_the_flash_kernel(version, device, capability, dtype, head_dim, expected):
    assert attention.fused_attention_call(version, device, capability, dtype, head_dim) is expected


def _sdpa_of_paddle_3_0(calls):
    """F.scaled_dot_product_attention as Paddle 3.0-3.2 define it: no `scale` argument (a
    TypeError if given), and without a mask the flash path drops out whenever dropout_p > 0,
    `training` or not. Computed explicitly in token-major layout."""
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, training=True, name=None):
        calls.append({"dropout_p": dropout_p, "training": training})
        q, k, v = (t.transpose([0, 2, 1, 3]) for t in (query, key, value))
        attn = paddle.nn.functional.softmax(paddle.matmul(q, k, transpose_y=True) * q.shape[-1] ** -0.5, axis=-1)
        if dropout_p > 0:  # the no-mask flash path of 3.0-3.2 ignores `training`
            attn = paddle.nn.functional.dropout(attn, dropout_p, training=True)
        return paddle.matmul(attn, v).transpose([0, 2, 1, 3])
    return sdpa


@pytest.mark.parametrize("local_up_to_layer", [0, 3])
def test_the_fused_call_fits_paddle_3_0_and_drops_nothing_in_eval(monkeypatch, local_up_to_layer):
    """With attention dropout on, evaluation through the fused call of Paddle 3.0's signature and
    semantics gives what the explicit path gives: no `scale` argument, dropout_p 0 outside training."""
    paddle.seed(0)
    model = create_model("convit_micro", local_up_to_layer=local_up_to_layer, attn_drop_rate=0.5)
    model.eval()
    x = paddle.randn([2, 1, 8, 8])
    explicit = model(x).numpy()
    calls = []
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", _sdpa_of_paddle_3_0(calls))
    monkeypatch.setattr(attention, "fused_attention_wanted", lambda qkv, head_dim: True)
    fused = model(x).numpy()
    np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-5)
    assert len(calls) == 6 and all(c == {"dropout_p": 0.0, "training": False} for c in calls)
    model.train()  # in training, MHSA blocks ask for their dropout; GPSA with dropout keeps the explicit path
    calls.clear()
    model(x)
    assert [c["dropout_p"] for c in calls] == [0.5] * (6 - local_up_to_layer)
