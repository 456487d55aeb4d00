"""The training recipe: parameter groups, optimisers, learning-rate schedule, EMA and the metrics."""
import math

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from omegaconf import OmegaConf

from convitlab.config import OptimizerConfig, ScheduleConfig
from convitlab.data.mixing import smoothed_one_hot
from convitlab.engine.ema import ModelEMA
from convitlab.engine.metrics import correct_top_k, soft_target_cross_entropy
from convitlab.engine.optim import base_learning_rate, build_optimizer, learning_rate_at, parameter_groups
from convitlab.models import create_model


def tiny_convit(**overrides):
    """One GPSA block and one MHSA block, 4 heads of 8: every kind of parameter, in a few ms."""
    paddle.seed(0)
    kwargs = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=8, num_heads=4, depth=2,
                  local_up_to_layer=1)
    return create_model("convit_tiny", **{**kwargs, **overrides})


def optimizer_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(OptimizerConfig), values)


def schedule_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(ScheduleConfig), values)


def group_names(model, groups):
    """[(set of parameter names, weight decay)] of parameter_groups' groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [({names[id(p)] for p in g["params"]}, g["weight_decay"]) for g in groups]


def matrix_weights(model):
    """Names of every Linear and Conv weight: the parameters the reference decays."""
    return {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, (nn.Linear, nn.Conv2D))}


# --- parameter groups ---------------------------------------------------------------------------

def test_groups_decay_matrices_only():
    model = tiny_convit()
    (decay, decay_wd), (no_decay, no_decay_wd) = group_names(model, parameter_groups(model, 0.05))
    assert (decay_wd, no_decay_wd) == (0.05, 0.0)
    everything = {n for n, _ in model.named_parameters()}
    assert decay | no_decay == everything and not decay & no_decay
    assert decay == matrix_weights(model)
    assert {"patch_embed.proj.weight", "blocks.0.attn.qk.weight", "blocks.0.attn.v.weight",
            "blocks.0.attn.pos_proj.weight", "blocks.1.attn.qkv.weight", "blocks.1.mlp.fc1.weight",
            "head.weight"} <= decay
    # pos_embed and cls_token are 3-D: out by name; gating, biases and norm weights are 1-D
    assert {"pos_embed", "cls_token", "blocks.0.attn.gating_param", "blocks.0.norm1.weight",
            "blocks.1.norm2.weight", "norm.weight", "head.bias", "patch_embed.proj.bias",
            "blocks.0.attn.pos_proj.bias"} <= no_decay
    norm_weights = {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.LayerNorm)}
    biases = {n for n in everything if n.endswith(".bias")}
    assert no_decay == {"pos_embed", "cls_token", "blocks.0.attn.gating_param"} | norm_weights | biases
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert all(len(shapes[n]) == 1 for n in no_decay - {"pos_embed", "cls_token"})
    assert all(len(shapes[n]) >= 2 for n in decay)


def test_frozen_parameters_are_left_out():
    model = tiny_convit(train_gpsa=False)
    names = set().union(*(n for n, _ in group_names(model, parameter_groups(model, 0.05))))
    gpsa = {n for n, _ in model.named_parameters() if n.startswith("blocks.0.attn.")}
    assert gpsa and not names & gpsa
    assert names == {n for n, _ in model.named_parameters()} - gpsa
    model = tiny_convit(train_gating=False)
    names = set().union(*(n for n, _ in group_names(model, parameter_groups(model, 0.05))))
    assert "blocks.0.attn.gating_param" not in names and "blocks.0.attn.qk.weight" in names


def test_without_no_decay_on_1d_everything_is_one_decayed_group():
    model = tiny_convit()
    groups = group_names(model, parameter_groups(model, 0.05, no_decay_on_1d=False))
    assert groups == [({n for n, _ in model.named_parameters()}, 0.05)]


# --- optimisers ---------------------------------------------------------------------------------

def step_with_zero_gradients(model, optimizer):
    """One step whose gradients are all zero: whatever moves, moves by weight decay alone."""
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    (model(paddle.randn([2, 3, 16, 16])) * 0).sum().backward()
    optimizer.step()
    return before, {n: p.numpy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,cls", [("adamw", paddle.optimizer.AdamW), ("adam", paddle.optimizer.Adam),
                                      ("sgd", paddle.optimizer.Momentum)])
def test_build_optimizer_class_and_weight_decay_per_group(name, cls):
    model = tiny_convit()
    lr, wd = 0.1, 0.5
    optimizer = build_optimizer(model, optimizer_cfg(name=name, lr=lr, weight_decay=wd, momentum=0.0))
    assert type(optimizer) is cls
    before, after = step_with_zero_gradients(model, optimizer)
    decayed = matrix_weights(model)
    for n in before:
        if n not in decayed:  # no decay: a zero gradient leaves it where it was
            np.testing.assert_array_equal(after[n], before[n], err_msg=n)
        elif name == "adam":  # L2 in the gradient, g = wd·p, then Adam's first step: lr·g / (|g| + eps)
            g = wd * before[n]
            np.testing.assert_allclose(after[n], before[n] - lr * g / (np.abs(g) + 1e-8), atol=1e-6, err_msg=n)
        else:  # decoupled (AdamW) or L2 with plain SGD: p·(1 − lr·wd)
            np.testing.assert_allclose(after[n], before[n] * (1 - lr * wd), rtol=1e-5, atol=1e-8, err_msg=n)


# The norm of every gradient together, as the reference's clip_grad_norm_ (not each group's).
@pytest.mark.parametrize("clip,one_group", [(None, False), (0.5, True), (0.5, False)])
def test_build_optimizer_clips_the_global_gradient_norm(clip, one_group):
    model = tiny_convit()
    cfg = optimizer_cfg(name="sgd", lr=1.0, weight_decay=0.0, momentum=0.0, no_decay_on_1d=not one_group)
    optimizer = build_optimizer(model, cfg, clip)
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    sum(p.sum() for p in model.parameters()).backward()  # every gradient 1: global norm √(count)
    optimizer.step()
    moved = math.sqrt(sum(float(((p.numpy() - before[n]) ** 2).sum()) for n, p in model.named_parameters()))
    count = sum(int(np.prod(p.shape)) for p in model.parameters())
    assert moved == pytest.approx(clip if clip else math.sqrt(count), rel=1e-4)


def test_base_learning_rate_scales_by_global_batch_only_when_asked():
    assert base_learning_rate(optimizer_cfg(lr=5e-4, scale_lr=True), 1024) == pytest.approx(1e-3)
    assert base_learning_rate(optimizer_cfg(lr=5e-4, scale_lr=True), 128) == pytest.approx(1.25e-4)
    assert base_learning_rate(optimizer_cfg(lr=5e-4, scale_lr=False), 1024) == 5e-4


# --- learning-rate schedule ---------------------------------------------------------------------

STEPS, EPOCHS, BASE = 10, 5, 1e-3


def warmup(cfg):
    return round(cfg.warmup_epochs * STEPS)


def test_warmup_then_cosine_to_min_lr():
    cfg = schedule_cfg(name="cosine", warmup_epochs=1, warmup_lr=1e-6, min_lr=1e-5)
    lr = [learning_rate_at(s, STEPS * EPOCHS, warmup(cfg), BASE, cfg) for s in range(STEPS * EPOCHS + 1)]
    assert lr[0] == pytest.approx(1e-6)  # warm-up starts at warmup_lr
    assert lr[5] == pytest.approx(1e-6 + (BASE - 1e-6) / 2)  # linearly
    assert all(a < b for a, b in zip(lr[:STEPS], lr[1:STEPS + 1]))
    assert lr[STEPS] == pytest.approx(BASE)  # the end of warm-up: base lr
    assert lr[STEPS * EPOCHS] == pytest.approx(1e-5)  # progress 1: min_lr
    assert all(a >= b for a, b in zip(lr[STEPS:], lr[STEPS + 1:]))  # monotone after warm-up
    assert min(lr[STEPS:]) >= 1e-5 and max(lr) == pytest.approx(BASE)
    middle = STEPS + (STEPS * EPOCHS - STEPS) // 2  # half-way through the cosine: the mean of base and min
    assert lr[middle] == pytest.approx((BASE + 1e-5) / 2)
    assert learning_rate_at(STEPS * EPOCHS + 7, STEPS * EPOCHS, warmup(cfg), BASE, cfg) == pytest.approx(1e-5)  # stays there


def test_cosine_without_warmup_starts_at_base_lr():
    cfg = schedule_cfg(name="cosine", warmup_epochs=0, min_lr=0.0)
    assert learning_rate_at(0, STEPS * EPOCHS, 0, BASE, cfg) == pytest.approx(BASE)
    assert learning_rate_at(STEPS * EPOCHS, STEPS * EPOCHS, 0, BASE, cfg) == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_holds_base_lr_after_warmup():
    cfg = schedule_cfg(name="constant", warmup_epochs=0.5, warmup_lr=1e-6)
    lr = [learning_rate_at(s, STEPS * EPOCHS, warmup(cfg), BASE, cfg) for s in range(STEPS * EPOCHS + 1)]
    assert lr[0] == pytest.approx(1e-6) and all(a < b for a, b in zip(lr[:5], lr[1:6]))
    assert lr[5:] == [BASE] * (len(lr) - 5)


# --- EMA ----------------------------------------------------------------------------------------

def weights(state):
    return {k: np.array(v.numpy() if hasattr(v, "numpy") else v) for k, v in state.items()}


def test_ema_is_the_decay_weighted_average_and_swaps_back():
    paddle.seed(0)
    model = nn.Linear(3, 2)
    w0 = weights(model.state_dict())
    ema = ModelEMA(model, decay=0.9)
    steps = [{k: np.full_like(v, fill) for k, v in w0.items()} for fill in (1.0, -2.0, 0.5)]
    expected = w0
    for i, new in enumerate(steps):
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in new.items()})
        if i == 0:  # the shadow is a copy, not the model's own tensors
            for k, v in weights(ema.state_dict()).items():
                np.testing.assert_array_equal(v, w0[k])
        ema.update(model)
        expected = {k: 0.9 * expected[k] + 0.1 * new[k] for k in new}
        for k, v in weights(ema.state_dict()).items():
            np.testing.assert_allclose(v, expected[k], rtol=1e-6, atol=1e-7, err_msg=f"{k} after update {i + 1}")
    # by hand: 0.9·(0.9·(0.9·w0 + 0.1·1) + 0.1·(−2)) + 0.1·0.5
    np.testing.assert_allclose(weights(ema.state_dict())["bias"], 0.729 * w0["bias"] + 0.081 - 0.18 + 0.05,
                               rtol=1e-6, atol=1e-7)

    raw = weights(model.state_dict())
    x = paddle.to_tensor(np.array([[1.0, 2.0, 3.0]], dtype="float32"))
    with ema.swapped_into(model) as swapped:
        inside = weights(swapped.state_dict())
        out = model(x).numpy()
    for k, v in inside.items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out, x.numpy() @ expected["weight"] + expected["bias"], rtol=1e-5)
    for k, v in weights(model.state_dict()).items():  # the raw weights are back
        np.testing.assert_array_equal(v, raw[k])


def test_ema_state_round_trips_into_a_fresh_ema():
    paddle.seed(1)
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.5)
    model.set_state_dict({k: v + 1.0 for k, v in model.state_dict().items()})
    ema.update(model)
    saved = weights(ema.state_dict())
    other = ModelEMA(nn.Linear(3, 2), decay=0.5)
    other.set_state_dict({k: paddle.to_tensor(v) for k, v in saved.items()})
    for k, v in weights(other.state_dict()).items():
        np.testing.assert_array_equal(v, saved[k])


# --- metrics ------------------------------------------------------------------------------------

def test_smoothed_one_hot_values():
    targets = smoothed_one_hot(paddle.to_tensor([2, 0, 4]), 5, 0.1).numpy()
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    on, off = 1 - 0.1 + 0.1 / 5, 0.1 / 5
    expected = np.full((3, 5), off, dtype="float32")
    expected[[0, 1, 2], [2, 0, 4]] = on
    np.testing.assert_allclose(targets, expected, rtol=1e-6)
    np.testing.assert_array_equal(smoothed_one_hot(paddle.to_tensor([1]), 3, 0.0).numpy(), [[0, 1, 0]])


def test_correct_top_k_counts():
    logits = paddle.to_tensor(np.array([[0.1, 0.5, 0.2, 0.9],    # order 3, 1, 2, 0; label 1: top-2
                                        [0.8, 0.1, 0.05, 0.05],  # label 0: top-1
                                        [0.3, 0.2, 0.4, 0.1],    # order 2, 0, 1, 3; label 3: top-4 only
                                        [0.1, 0.2, 0.6, 0.1]], dtype="float32"))  # label 2: top-1
    labels = paddle.to_tensor([1, 0, 3, 2])
    counts = [float(correct_top_k(logits, labels, k)) for k in (1, 2, 3, 4, 5)]
    assert counts == [2.0, 3.0, 3.0, 4.0, 4.0]  # k beyond the class count: every sample


def test_soft_target_cross_entropy_equals_the_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 6)).astype("float32")
    targets = rng.dirichlet(np.ones(6), size=4).astype("float32")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    expected = -(targets * log_p).sum(axis=1).mean()
    got = float(soft_target_cross_entropy(paddle.to_tensor(logits), paddle.to_tensor(targets)))
    assert got == pytest.approx(float(expected), rel=1e-5)
    # with one-hot targets it is the ordinary cross entropy
    one_hot = np.eye(6, dtype="float32")[[0, 3, 5, 1]]
    plain = float(paddle.nn.functional.cross_entropy(paddle.to_tensor(logits), paddle.to_tensor([0, 3, 5, 1])))
    assert float(soft_target_cross_entropy(paddle.to_tensor(logits), paddle.to_tensor(one_hot))) == \
        pytest.approx(plain, rel=1e-5)
