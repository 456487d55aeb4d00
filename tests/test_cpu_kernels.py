"""convitlab's compiled CPU kernels (cpu_kernels: GELU, LayerNorm, softmax, attention's head
re-layouts) give the outputs and gradients of the Paddle ops they replace, and the layers fall back
to Paddle's ops when the kernels are off, cannot be built or cannot take the input."""
import logging
import math

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from convitlab.models import attention, create_model
from convitlab.ops import attention_ops, cpu_kernels, cpu_layers

# The model's shapes (convit_tiny at 32/4 batch 64 and 224/16, hidden width 768, a small batch)
# and odd sizes; the large ones run on several threads.
SHAPES = [[64, 65, 192], [2, 197, 768], [3, 7, 37], [1, 5]]


def _close(got, want):
    """Equal to 1e-5 relative to the tensor's scale (elementwise relative error is meaningless
    where GELU's derivative crosses zero or a sum over rows cancels)."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def _forward_backward(fn, tensors):
    for t in tensors:
        t.clear_gradient()
    out = fn()
    (out * _weights(out)).sum().backward()
    return [out.numpy()] + [t.grad.numpy() for t in tensors]


def _weights(out):
    return paddle.to_tensor(np.random.default_rng(1).standard_normal(out.shape).astype("float32"))


@pytest.fixture
def kernels(monkeypatch):
    """Every kernel on (whatever the measured choice of this CPU kind), built and loaded. Chosen
    without setting CONVITLAB_CPU_KERNELS: with it set, Paddle 3.3's to_static (SOT) fails."""
    monkeypatch.setitem(cpu_kernels._chosen, "1", cpu_kernels.KERNELS)
    assert cpu_kernels.available(), "the kernels should build on this machine (g++ present)"


@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_matches_stock(kernels, shape):
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal(shape).astype("float32") * 3)
    x.stop_gradient = False
    got = _forward_backward(lambda: cpu_layers.GELU()(x), [x])
    want = _forward_backward(lambda: F.gelu(x), [x])
    for g, w in zip(got, want):
        _close(g, w)


def test_gelu_is_exact_gelu_to_float32_rounding(kernels):
    """Against erf in float64 over the whole range, the saturated tails included (the kernel's own
    erf, fitted by experiments/perf/fit_erf.py, is within 4e-7 of erf)."""
    values = np.linspace(-12, 12, 48001)
    x = paddle.to_tensor(values.astype("float32"))
    x.stop_gradient = False
    out = cpu_layers.GELU()(x)
    out.sum().backward()
    exact = np.array([v * (1 + math.erf(v / math.sqrt(2))) / 2 for v in x.numpy().astype(np.float64)])
    slope = np.array([(1 + math.erf(v / math.sqrt(2))) / 2 + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
                      for v in x.numpy().astype(np.float64)])
    np.testing.assert_allclose(out.numpy(), exact, rtol=0, atol=1.5e-6)  # Paddle's own F.gelu: 7e-7
    np.testing.assert_allclose(x.grad.numpy(), slope, rtol=0, atol=1.5e-6)  # Paddle's own F.gelu: 7e-7


@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_matches_stock(kernels, shape):
    rng = np.random.default_rng(0)
    layer = cpu_layers.LayerNorm(shape[-1], epsilon=1e-6)
    layer.weight.set_value(rng.standard_normal(shape[-1]).astype("float32"))
    layer.bias.set_value(rng.standard_normal(shape[-1]).astype("float32"))
    x = paddle.to_tensor(rng.standard_normal(shape).astype("float32") * 3 + 2)
    x.stop_gradient = False
    tensors = [x, layer.weight, layer.bias]
    got = _forward_backward(lambda: layer(x), tensors)
    want = _forward_backward(lambda: F.layer_norm(x, shape[-1:], layer.weight, layer.bias, 1e-6), tensors)
    for g, w in zip(got, want):
        _close(g, w)
    with paddle.no_grad():
        _close(layer(x).numpy(), want[0])


@pytest.mark.parametrize("shape", SHAPES + [[64, 4, 65, 65]])
@pytest.mark.parametrize("scale", [1.0, 48 ** -0.5])
def test_softmax_matches_stock(kernels, shape, scale):
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal(shape).astype("float32") * 4)
    x.stop_gradient = False
    got = _forward_backward(lambda: cpu_kernels.softmax(x, scale), [x])
    want = _forward_backward(lambda: F.softmax(x * scale, axis=-1), [x])
    for g, w in zip(got, want):
        _close(g, w)
    np.testing.assert_allclose(got[0].sum(axis=-1), 1.0, rtol=1e-6)
    # a shift of a row changes nothing: its gradient sums to zero (to rounding of its entries' size)
    row_sums = np.abs(got[1].sum(axis=-1)).max()
    assert row_sums < 1e-6 * np.abs(got[1]).max() * shape[-1] ** 0.5


def test_no_subnormal_numbers_come_out_of_exp(kernels):
    """Subnormal operands slow the products that follow many times over (GPSA's positional maps at
    local init hold e^-338 at 224/16): softmax clips its shifted scores at -64 as Paddle's does,
    GELU's backward writes a subnormal density as 0."""
    scores = paddle.to_tensor([[0.0, -63.0, -64.0, -70.0, -90.0, -95.0, -400.0]])  # e^-90: subnormal
    np.testing.assert_allclose(cpu_kernels.softmax(scores, 1.0).numpy(), F.softmax(scores, axis=-1).numpy(),
                               rtol=1e-6)
    tiny = np.finfo(np.float32).tiny
    gate_times_map = 0.01 * cpu_kernels.softmax(scores, 1.0).numpy()  # gated, as GPSA mixes it
    assert not np.any((gate_times_map != 0) & (np.abs(gate_times_map) < tiny))
    # GPSA at 224/16 (a 14 x 14 grid) at local init: its gated positional map, what the product reads
    gpsa = attention.GPSA(192, 4, (14, 14))
    gpsa.local_init()
    gated = (F.sigmoid(gpsa.gating_param).reshape([-1, 1, 1]) * gpsa.positional_attention()).numpy()
    assert gated.min() == 0 or gated[gated > 0].min() >= tiny
    assert not np.any((gated != 0) & (np.abs(gated) < tiny))
    x = paddle.to_tensor(np.linspace(-20, -12, 801).astype("float32"))
    x.stop_gradient = False
    cpu_layers.GELU()(x).sum().backward()
    grad = x.grad.numpy()
    assert not np.any((grad != 0) & (np.abs(grad) < tiny))
    assert np.abs(grad).max() < 1e-30  # what is left of the density there is (nearly) nothing


@pytest.mark.parametrize("shape,heads", [([64, 65, 576], 4), ([2, 197, 2304], 12), ([3, 5, 6], 2)])
def test_split_heads_is_the_transpose(kernels, shape, heads):
    qkv = paddle.to_tensor(np.random.default_rng(0).standard_normal(shape).astype("float32"))
    qkv.stop_gradient = False
    stock = paddle.unbind(qkv.reshape([0, 0, 3, heads, -1]).transpose([2, 0, 3, 1, 4]), axis=0)
    ours = cpu_kernels.split_heads(qkv, heads)
    for a, b in zip(ours, stock):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    weights = [_weights(part) * (i + 1) for i, part in enumerate(stock)]

    def gradient(parts, used):
        qkv.clear_gradient()
        sum((parts[i] * weights[i]).sum() for i in used).backward()
        return qkv.grad.numpy()

    for used in ([0, 1, 2], [0], [1, 2]):  # a part the loss does not use gets a zero gradient
        ours = cpu_kernels.split_heads(qkv, heads)
        stock = paddle.unbind(qkv.reshape([0, 0, 3, heads, -1]).transpose([2, 0, 3, 1, 4]), axis=0)
        np.testing.assert_array_equal(gradient(ours, used), gradient(stock, used))


@pytest.mark.parametrize("shape", [[64, 4, 64, 48], [2, 9, 196, 48], [3, 2, 5, 7]])
def test_head_layouts_match_transposes(kernels, shape):
    """values_by_head, merge_heads and gated_merge against the transposes and products they replace,
    outputs and gradients (the gate's included)."""
    rng = np.random.default_rng(0)
    batch, heads, tokens, dim = shape
    content, v = (paddle.to_tensor(rng.standard_normal(shape).astype("float32")) for _ in range(2))
    shared = paddle.to_tensor(rng.standard_normal([heads, tokens, batch * dim]).astype("float32"))
    gate = paddle.to_tensor(rng.uniform(0.1, 0.9, [heads]).astype("float32"))
    tensors = [content, v, shared, gate]
    for t in tensors:
        t.stop_gradient = False

    def stock_shared(values):
        return values.transpose([1, 2, 0, 3]).reshape([heads, tokens, batch * dim])

    def stock_merge(x):
        return x.transpose([0, 2, 1, 3]).flatten(2)

    def stock_gated():
        positional = shared.reshape([heads, tokens, batch, dim]).transpose([2, 0, 1, 3])
        return stock_merge((1.0 - gate.reshape([-1, 1, 1])) * content + positional)

    cases = [(lambda: cpu_kernels.values_by_head(v), lambda: stock_shared(v), [v]),
             (lambda: cpu_kernels.merge_heads(content), lambda: stock_merge(content), [content]),
             (lambda: cpu_kernels.gated_merge(content, shared, gate), stock_gated, [content, shared, gate])]
    for ours, stock, inputs in cases:
        got, want = _forward_backward(ours, inputs), _forward_backward(stock, inputs)
        for g, w in zip(got, want):
            _close(g, w)


def test_attention_layers_call_the_kernels_unless_switched_off(kernels, monkeypatch):
    names = ["split_heads", "softmax", "values_by_head", "gated_merge", "merge_heads"]
    calls = []
    for name in names:
        kernel = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    paddle.seed(0)
    gpsa, mhsa = attention.GPSA(48, 4, (4, 4)), attention.MHSA(48, 4)
    x = paddle.randn([2, 16, 48])
    outputs = [gpsa(x).numpy(), mhsa(x).numpy()]
    assert set(calls) == set(names)
    calls.clear()
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    for layer, want in zip((gpsa, mhsa), outputs):
        _close(layer(x).numpy(), want)
    assert calls == []


def test_inputs_the_kernels_cannot_take_go_to_paddle(kernels):
    """Empty tensors and 0-d tensors take Paddle's ops (the kernels work on rows of a last axis)."""
    calls = cpu_kernels.calls
    for shape in ([3, 0], [0, 5], []):
        x = paddle.zeros(shape)
        assert attention_ops.softmax(x).shape == shape and cpu_layers.GELU()(x).shape == shape
    assert cpu_kernels.calls == calls
    with pytest.raises(Exception, match="last axis must exist"):  # the kernel itself refuses, no crash
        cpu_kernels.softmax(paddle.zeros([3, 0]), 1.0)


def test_to_static_gradients_match_eager_with_the_kernels(kernels):
    """Under to_static's default translation (SOT) the kernels are called as in dynamic mode; the
    gradients are the eager ones."""
    paddle.seed(0)
    model = create_model("convit_micro")
    x = paddle.randn([3, 1, 8, 8])

    def grads(forward):
        model.clear_gradients()
        forward(x).sum().backward()
        return {n: p.grad.numpy() for n, p in model.named_parameters()}

    eager = grads(model)
    calls = cpu_kernels.calls
    static = grads(paddle.jit.to_static(model))
    assert cpu_kernels.calls > calls
    for name in eager:
        np.testing.assert_allclose(static[name], eager[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_layers_use_the_kernels_and_the_switch_turns_them_off(kernels, monkeypatch):
    x = paddle.randn([64, 65, 192])
    x.stop_gradient = False
    assert "convitlab_gelu" in cpu_layers.GELU()(x).grad_fn.name()
    assert "convitlab_layer_norm" in cpu_layers.LayerNorm(192)(x).grad_fn.name()
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert "convitlab" not in cpu_layers.GELU()(x).grad_fn.name()
    assert "LayerNormFunction" in cpu_layers.LayerNorm(192)(x).grad_fn.name()  # cpu_layers' own backward


def test_frozen_norm_gets_no_weight_gradient(kernels):
    norm = cpu_layers.LayerNorm(16)
    norm.weight.stop_gradient = True
    x = paddle.randn([4, 16])
    x.stop_gradient = False
    norm(x).sum().backward()
    assert norm.weight.grad is None and norm.bias.grad is not None and x.grad is not None


def test_model_gradients_match_without_the_kernels(kernels, monkeypatch):
    paddle.seed(0)
    model = create_model("convit_micro")
    x = paddle.randn([3, 1, 8, 8])

    def outputs_and_grads():
        model.clear_gradients()
        out = model(x)
        out.sum().backward()
        return {"logits": out.numpy(), **{n: p.grad.numpy() for n, p in model.named_parameters()}}

    with_kernels = outputs_and_grads()
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    without = outputs_and_grads()
    assert with_kernels.keys() == without.keys()
    for name in without:
        np.testing.assert_allclose(with_kernels[name], without[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_failed_build_falls_back_with_one_log_line(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "broken.cc"
    broken.write_text("#error this source does not compile\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setattr(cpu_kernels, "CACHE_ROOT", tmp_path / "cache")
    monkeypatch.setitem(cpu_kernels._state, "loaded", False)
    monkeypatch.setitem(cpu_kernels._state, "failed", False)
    x = paddle.randn([4, 16])
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        gelu = cpu_layers.GELU()(x)
        norm = cpu_layers.LayerNorm(16)(x)
    assert not cpu_kernels.available()
    warnings = [r for r in caplog.records if r.name == cpu_kernels.__name__ and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not available" in warnings[0].getMessage()
    np.testing.assert_array_equal(gelu.numpy(), F.gelu(x).numpy())
    np.testing.assert_array_equal(norm.numpy(), F.layer_norm(x, [16], None, None, 1e-5).numpy())
    assert not list((tmp_path / "cache").glob("*/*.so"))


@pytest.mark.parametrize("call, reason", [
    (lambda: cpu_kernels.split_heads(paddle.zeros([2, 3, 12]), 0), "num_heads must be positive, got 0"),
    (lambda: cpu_kernels.split_heads(paddle.zeros([2, 3, 12]), -2), "num_heads must be positive, got -2"),
    (lambda: cpu_kernels.split_heads(paddle.zeros([2, 3, 12]), 5), "not a multiple of num_heads 5"),
    (lambda: cpu_kernels.split_heads(paddle.zeros([3, 12]), 2), r"qkv must be \[batch, tokens, 3 \* width\]"),
    (lambda: cpu_kernels._run("convitlab_merge_heads", paddle.zeros([2, 3, 4, 5]), 0), "num_heads 0 is not"),
    (lambda: cpu_kernels.merge_heads(paddle.zeros([2, 3, 4])), "expected \\[batch, heads, tokens, head_dim\\]"),
    (lambda: cpu_kernels.values_by_head(paddle.zeros([2, 3, 4])), "expected \\[batch, heads, tokens, head_dim\\]"),
    (lambda: cpu_kernels.gated_merge(paddle.zeros([2, 3, 4, 5]), paddle.zeros([3, 4, 9]), paddle.zeros([3])),
     "positional must be"),
    (lambda: cpu_kernels.layer_norm(paddle.zeros([2, 8]), paddle.ones([7]), paddle.zeros([8]), 1e-5),
     "weight and bias must have the last axis' size"),
    (lambda: cpu_kernels.softmax(paddle.zeros([]), 1.0), "last axis must exist"),
    (lambda: cpu_kernels.gelu(paddle.zeros([4], dtype="float64")), "x must be float32"),
])
def test_bad_shapes_raise_one_line(kernels, call, reason):
    """A shape, dtype or head count the kernels cannot take raises (num_heads=0 used to end the
    process with SIGFPE at a division), with the kernel's reason in one line."""
    with pytest.raises(ValueError, match=reason) as raised:
        call()
    assert len(str(raised.value).splitlines()) == 1 and str(raised.value).startswith("convitlab_")


def _gelu(x):
    return cpu_kernels.gelu(x)


def _softmax(x):
    return cpu_kernels.softmax(x, 0.5)


def _layer_norm(x):
    weight, bias = paddle.full([x.shape[-1]], 1.5), paddle.zeros([x.shape[-1]])
    return cpu_kernels.layer_norm(x, weight, bias, 1e-5)


def _heads(x):
    qkv = paddle.concat([x, x * 2, x * 3], axis=-1).reshape([1, 4, 24])
    q, k, v = cpu_kernels.split_heads(qkv, 2)
    shared = cpu_kernels.values_by_head(v)
    return cpu_kernels.gated_merge(q * k, shared, paddle.full([2], 0.25))


@pytest.mark.parametrize("ours, stock", [(_gelu, F.gelu), (_softmax, lambda x: F.softmax(x * 0.5)),
                                         (_layer_norm, lambda x: F.layer_norm(x, x.shape[-1:])), (_heads, None)])
def test_second_derivatives_raise(kernels, ours, stock):
    """A second derivative through a kernel raises, as through Paddle's gelu, softmax and
    layer_norm (which refuse already at paddle.grad(create_graph=True)); it never comes out as a
    gradient silently cut from the graph."""
    def first_gradient(fn):
        x = paddle.to_tensor(np.random.default_rng(0).standard_normal([4, 8]).astype("float32"))
        x.stop_gradient = False
        y = fn(x)
        return x, paddle.grad((y * y).sum(), x, create_graph=True)[0]

    if stock is not None:
        with pytest.raises(Exception, match="doesn't have any grad op"):
            first_gradient(stock)
    for second in (lambda x, g: (g * g).sum().backward(), lambda x, g: paddle.grad((g * g).sum(), x)):
        x, gradient = first_gradient(ours)  # a failed backward pass leaves its graph half freed
        assert not gradient.stop_gradient
        with pytest.raises(OSError, match="have no second derivative"):
            second(x, gradient)
    # the first derivative alone is unaffected
    y = ours(x)
    (plain,) = paddle.grad((y * y).sum(), x)
    np.testing.assert_array_equal(plain.numpy(), gradient.numpy())


def test_each_kernel_runs_where_it_was_measured_faster(kernels, monkeypatch):
    """CONVITLAB_CPU_KERNELS=1 (the default) takes the kernels measured faster than Paddle's op on
    this CPU kind (cpu_kernels.MEASURED_SPEEDUP); a kind not measured takes them all; a list chooses."""
    from convitlab.core.errors import UserError
    from convitlab.ops import runtime

    x = paddle.randn([8, 16, 64])
    x.stop_gradient = False

    def used():
        return {"gelu": "convitlab" in cpu_layers.GELU()(x).grad_fn.name(),
                "layer_norm": "convitlab" in cpu_layers.LayerNorm(64)(x).grad_fn.name(),
                "softmax": "convitlab" in attention_ops.softmax(x).grad_fn.name(),
                "head_layouts": "convitlab" in attention_ops.merge_heads(x.reshape([8, 4, 16, 16])).grad_fn.name()}

    monkeypatch.setattr(cpu_kernels, "_chosen", {})
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    monkeypatch.setitem(cpu_kernels.MEASURED_SPEEDUP, runtime.cpu_kind(),
                        {"gelu": 0.8, "layer_norm": 1.2, "softmax": 3.0, "head_layouts": 1.1})
    assert used() == {"gelu": False, "layer_norm": True, "softmax": True, "head_layouts": True}
    monkeypatch.setattr(cpu_kernels, "_chosen", {})
    monkeypatch.setattr(runtime, "cpu_kind", lambda info=None: "a processor nobody measured")
    assert all(used().values())
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "gelu,softmax")
    assert used() == {"gelu": True, "layer_norm": False, "softmax": True, "head_layouts": False}
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not any(used().values())
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "gelu,erf")
    with pytest.raises(UserError, match="CONVITLAB_CPU_KERNELS='gelu,erf' is not allowed: .*unknown: erf"):
        used()

