"""The formulations of the attention compute one function: the GPU path (content attention by
F.scaled_dot_product_attention, token-major layout) what the explicit CPU path computes (forced on
the CPU, where Paddle runs the same function as plain math, so it is checked without a GPU); the
fast GPSA what the documented reference formulation computes; and the attention maps analysis
plots are the ones forward applies."""
import numpy as np
import paddle
import pytest

from convitlab.analysis.attention_maps import query_attention
from convitlab.models import GPSA, ReferenceGPSA, create_model
from convitlab.ops import backend


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
    monkeypatch.setattr(backend, "use_fused_attention", lambda qkv, head_dim: True)
    fused = _run(model, x, train)
    np.testing.assert_allclose(fused[0], explicit[0], rtol=1e-5, atol=1e-5)
    assert fused[1].keys() == explicit[1].keys()
    for key in explicit[1]:
        np.testing.assert_allclose(fused[1][key], explicit[1][key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_cpu_and_float32_keep_the_explicit_path():
    previous = paddle.device.get_device()
    paddle.set_device("cpu")  # also on a GPU machine
    try:
        assert not backend.use_fused_attention(paddle.zeros([1, 4, 12]), 2)
        assert not backend.use_fused_attention(paddle.zeros([1, 4, 48], dtype="float16"), 16)
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
    assert backend.fused_attention_call(version, device, capability, dtype, head_dim) is expected


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
    monkeypatch.setattr(paddle.nn.functional, "scaled_dot_product_attention", _sdpa_of_paddle_3_0(calls))
    monkeypatch.setattr(backend, "use_fused_attention", lambda qkv, head_dim: True)
    fused = model(x).numpy()
    np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-5)
    assert len(calls) == 6 and all(c == {"dropout_p": 0.0, "training": False} for c in calls)
    model.train()  # in training, MHSA blocks ask for their dropout; GPSA with dropout keeps the explicit path
    calls.clear()
    model(x)
    assert [c["dropout_p"] for c in calls] == [0.5] * (6 - local_up_to_layer)


@pytest.mark.parametrize("train", [False, True])
def test_the_fast_gpsa_is_the_reference_formulation(train):
    """Random (not local-init) weights, distinct gates, a non-square grid; outputs and gradients."""
    paddle.seed(1)
    fast, reference = GPSA(16, 4, (3, 4)), ReferenceGPSA(16, 4, (3, 4))
    fast.gating_param.set_value(paddle.to_tensor([-2.0, -0.5, 0.5, 2.0]))
    reference.set_state_dict(fast.state_dict())
    x = paddle.randn([2, 12, 16])
    results = []
    for layer in (fast, reference):
        layer.train(train)
        out = layer(x)
        out.square().sum().backward()
        results.append((out.numpy(), {n: p.grad.numpy() for n, p in layer.named_parameters()}))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    # pos_proj.bias's gradient is zero in exact arithmetic (a softmax ignores a shift of its row):
    # only rounding is left of it, small against the layer's largest gradient in both formulations.
    scale = max(float(np.abs(grad).max()) for grad in results[1][1].values())
    for name, grad in results[1][1].items():
        if name == "pos_proj.bias":
            for formulation in results:
                assert np.abs(formulation[1][name]).max() < 1e-6 * scale
        else:
            np.testing.assert_allclose(results[0][1][name], grad, rtol=1e-4, atol=1e-6, err_msg=name)


def test_the_plotted_attention_maps_are_the_ones_forward_applies():
    """For every block (5 GPSA, 1 MHSA): the combined map times v is the block's attention output
    before the projection, as forward computed it; the maps query_attention plots are rows of it."""
    paddle.seed(2)
    model = create_model("convit_micro")
    for block in model.gpsa_blocks():  # distinct gates: the mix matters
        block.attn.gating_param.set_value(paddle.randn([4]))
    model.eval()
    image = np.random.default_rng(0).normal(size=(1, 8, 8)).astype("float32")
    seen, hooks = {}, []

    def keep(key):  # a pre-hook that keeps the layer's input
        return lambda layer, args: seen.__setitem__(key, args[0])

    for i, block in enumerate(model.blocks):
        hooks += [block.attn.register_forward_pre_hook(keep(("in", i))),
                  block.attn.proj.register_forward_pre_hook(keep(("proj", i)))]
    with paddle.no_grad():
        model(paddle.to_tensor(image[None]))
    for hook in hooks:
        hook.remove()
    gh, gw = model.grid_size
    query = (gh // 2) * gw + gw // 2  # query_attention's default: the centre patch
    for i, block in enumerate(model.blocks):
        attn, x = block.attn, seen[("in", i)]
        maps = attn.attention_maps(x)
        heads, dim = attn.num_heads, x.shape[-1]
        v_weight = attn.v.weight if block.is_gpsa else attn.qkv.weight[:, 2 * dim:]
        v = paddle.matmul(x, v_weight).reshape([0, 0, heads, -1]).transpose([0, 2, 1, 3])  # [B, H, N, d]
        applied = paddle.matmul(maps["combined"], v).transpose([0, 2, 1, 3]).flatten(2)
        np.testing.assert_allclose(applied.numpy(), seen[("proj", i)].numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=f"block {i}")
        plotted = query_attention(model, image, i)
        combined = maps["combined"].numpy()[0]
        row = combined[:, query] if block.is_gpsa else combined[:, 1 + query, 1:]  # MHSA: class token first
        np.testing.assert_allclose(plotted["combined"].reshape(heads, -1), row, rtol=1e-5, atol=1e-7,
                                   err_msg=f"block {i}")
        if block.is_gpsa:
            gate = 1 / (1 + np.exp(-attn.gating_param.numpy()))[:, None, None]
            np.testing.assert_allclose((1 - gate) * plotted["content"] + gate * plotted["positional"],
                                       plotted["combined"], rtol=1e-5, atol=1e-7)
