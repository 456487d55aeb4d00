"""convitlab's ConViT against an independent NumPy forward pass of the reference semantics.

The reference below is written from /work/shared/convit-facts.md (and timm's `convit.py`
conventions it describes), not from convitlab's model code: patch embedding conv, absolute
`pos_embed`, pre-norm blocks, GPSA in the first `local_up_to_layer` blocks (patches only), the
class token put in front just before block `local_up_to_layer`, ordinary MHSA after, final
LayerNorm and a head on the class token. It runs in float64, so it is the "exact" answer that
convitlab's float32 logits must match to 1e-5 relative error.

convitlab is only touched through its public API: `create_model`, `load_reference_state_dict`,
`load_pretrained`, `model.state_dict()` (for names and Paddle shapes) and `src/convert.py`.
"""
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from helpers import run
from safetensors.numpy import save_file
from scipy.special import erf

from convitlab.models import create_model
from convitlab.weights import load_pretrained, load_reference_state_dict

ROOT = Path(__file__).resolve().parents[1]
CONVERT = [sys.executable, str(ROOT / "src" / "convert.py")]
LN_EPS = 1e-6  # every LayerNorm of the reference (norm1, norm2, final norm) uses eps 1e-6
MLP_RATIO = 4


# --------------------------------------------------------------------------------------------
# The reference layout, from the facts file's checkpoint listing (Linear weights [out, in]).
# --------------------------------------------------------------------------------------------
def reference_layout(*, num_heads, embed_dim, depth, local_up_to_layer, in_chans, num_classes,
                     grid, patch):
    """{name: shape} of a reference (timm/official) ConViT checkpoint. `embed_dim` is per head."""
    d, h = embed_dim * num_heads, num_heads
    hidden = MLP_RATIO * d
    layout = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, grid[0] * grid[1], d),
        "patch_embed.proj.weight": (d, in_chans, patch, patch),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        layout.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,)})
        if i < local_up_to_layer:
            layout.update({
                p + "attn.gating_param": (h,),
                p + "attn.qk.weight": (2 * d, d),
                p + "attn.v.weight": (d, d),
                p + "attn.pos_proj.weight": (h, 3),
                p + "attn.pos_proj.bias": (h,),
            })
        else:
            layout[p + "attn.qkv.weight"] = (3 * d, d)
        layout.update({
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (hidden, d), p + "mlp.fc1.bias": (hidden,),
            p + "mlp.fc2.weight": (d, hidden), p + "mlp.fc2.bias": (d,),
        })
    layout.update({"norm.weight": (d,), "norm.bias": (d,),
                   "head.weight": (num_classes, d), "head.bias": (num_classes,)})
    return layout


def random_reference_state(layout, seed):
    """Random float32 weights in the reference layout that keep activations O(1).

    Linear/conv weights ~ N(0, 1/fan_in) (so q.k logits are O(1) and attention is far from
    uniform), LayerNorm gains 1 + N(0, 0.1^2), biases N(0, 0.1^2), gating λ ~ N(0, 1.5^2) so
    σ(λ) differs clearly per head, pos_proj weights and bias random (not the local init).
    """
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in layout.items():
        if name.endswith("gating_param"):
            value = rng.normal(0.0, 1.5, shape)
        elif name.endswith("pos_proj.weight"):
            value = rng.normal(0.0, 0.5, shape)
        elif name.endswith("pos_proj.bias"):
            value = rng.normal(0.0, 0.5, shape)
        elif name in ("cls_token", "pos_embed"):
            value = rng.normal(0.0, 0.5, shape)
        elif "norm" in name and name.endswith(".weight"):
            value = 1.0 + rng.normal(0.0, 0.1, shape)
        elif name.endswith(".bias"):
            value = rng.normal(0.0, 0.1, shape)
        else:  # Linear [out, in] or conv [out, in, k, k]
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        state[name] = value.astype(np.float32)
    return state


# --------------------------------------------------------------------------------------------
# The NumPy reference forward pass (float64).
# --------------------------------------------------------------------------------------------
def linear(x, state, name, bias=True):
    y = x @ state[name + ".weight"].astype(np.float64).T  # PyTorch layout: [out, in]
    if bias:
        y = y + state[name + ".bias"]
    return y


def layer_norm(x, state, name):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)  # biased variance, as LayerNorm
    return (x - mean) / np.sqrt(var + LN_EPS) * state[name + ".weight"] + state[name + ".bias"]


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))  # exact (erf) GELU


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def relative_features(rows, cols):
    """[N, N, 3]: for query patch i, key patch j (row-major), δ = pos(j) − pos(i) = (dx, dy)."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    dx = c[None, :] - c[:, None]  # column difference
    dy = r[None, :] - r[:, None]  # row difference
    return np.stack([dx, dy, dx ** 2 + dy ** 2], axis=-1).astype(np.float64)


def patch_embed(images, weight, bias, patch):
    """Conv with kernel = stride = patch, then flatten the grid row-major: [B, N, D]."""
    b, c, height, width = images.shape
    gh, gw = height // patch, width // patch
    tiles = images[:, :, :gh * patch, :gw * patch].reshape(b, c, gh, patch, gw, patch)
    tiles = tiles.transpose(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * patch * patch)
    return tiles @ weight.reshape(weight.shape[0], -1).astype(np.float64).T + bias


def gpsa(x, state, p, num_heads, rel):
    b, n, d = x.shape
    hd = d // num_heads
    qk = linear(x, state, p + "qk", bias=False).reshape(b, n, 2, num_heads, hd)
    q, k = qk[:, :, 0].transpose(0, 2, 1, 3), qk[:, :, 1].transpose(0, 2, 1, 3)  # [B, H, N, hd]
    v = linear(x, state, p + "v", bias=False).reshape(b, n, num_heads, hd).transpose(0, 2, 1, 3)
    patch_score = softmax(q @ k.transpose(0, 1, 3, 2) * hd ** -0.5)  # [B, H, N, N]
    pos_score = softmax(linear(rel, state, p + "pos_proj").transpose(2, 0, 1))  # [H, N, N]
    gate = 1.0 / (1.0 + np.exp(-state[p + "gating_param"].astype(np.float64)))[:, None, None]
    attn = (1.0 - gate) * patch_score + gate * pos_score[None]
    attn = attn / attn.sum(-1, keepdims=True)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    return linear(out, state, p + "proj")


def mhsa(x, state, p, num_heads):
    b, n, d = x.shape
    hd = d // num_heads
    qkv = linear(x, state, p + "qkv", bias=False).reshape(b, n, 3, num_heads, hd)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    attn = softmax(q @ k.transpose(0, 1, 3, 2) * hd ** -0.5)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    return linear(out, state, p + "proj")


def reference_logits(images, state, *, num_heads, depth, local_up_to_layer, patch):
    images = images.astype(np.float64)
    grid = (images.shape[2] // patch, images.shape[3] // patch)
    rel = relative_features(*grid)
    x = patch_embed(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], patch)
    x = x + state["pos_embed"]  # no slot for the class token
    cls = np.broadcast_to(state["cls_token"].astype(np.float64), (x.shape[0], 1, x.shape[2]))
    for i in range(depth):
        if i == local_up_to_layer:  # class token goes in front just before the first MHSA block
            x = np.concatenate([cls, x], axis=1)
        p = f"blocks.{i}."
        h = layer_norm(x, state, p + "norm1")
        if i < local_up_to_layer:
            x = x + gpsa(h, state, p + "attn.", num_heads, rel)
        else:
            x = x + mhsa(h, state, p + "attn.", num_heads)
        h = layer_norm(x, state, p + "norm2")
        x = x + linear(gelu(linear(h, state, p + "mlp.fc1")), state, p + "mlp.fc2")
    if local_up_to_layer == depth:
        # Not reference semantics: the reference never inserts the class token here and feeds
        # patch 0 to the head (a bug, convit-facts.md). convitlab documents its handling instead
        # (ConViT docstring): class token = cls_token + mean of the patch tokens after the last block.
        x = np.concatenate([cls + x.mean(1, keepdims=True), x], axis=1)
    x = layer_norm(x, state, "norm")
    return linear(x[:, 0], state, "head")


# --------------------------------------------------------------------------------------------
# The comparison.
# --------------------------------------------------------------------------------------------
SMALL = dict(patch_size=4, in_chans=3, num_classes=7, embed_dim=8, depth=3)


def paddle_logits(model, images):
    model.eval()
    with paddle.no_grad():
        out = model(paddle.to_tensor(images.astype(np.float32)))
    return np.asarray(out.numpy(), dtype=np.float64)


def assert_logits_close(actual, expected):
    # rtol 1e-5 is the promise. The atol of 1e-6 x the largest |logit| only covers logits that
    # happen to lie near 0, where float32 rounding of O(1) activations (~6e-8 x scale per op)
    # is not small *relative* to the logit itself.
    scale = float(np.abs(expected).max())
    assert scale > 0.1, "degenerate test: logits are all near zero"
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * scale)


def as_size(img_size):
    return img_size if isinstance(img_size, tuple) else (img_size, img_size)


@pytest.mark.parametrize("local_up_to_layer", [2, 0], ids=["convit", "deit"])
@pytest.mark.parametrize("img_size", [16, (8, 16)], ids=["square4x4", "grid2x4"])
@pytest.mark.parametrize("num_heads", [4, 9])
def test_logits_match_numpy_reference(num_heads, img_size, local_up_to_layer):
    cfg = dict(SMALL, num_heads=num_heads, local_up_to_layer=local_up_to_layer, img_size=img_size)
    height, width = as_size(img_size)
    grid = (height // cfg["patch_size"], width // cfg["patch_size"])
    layout = reference_layout(num_heads=num_heads, embed_dim=cfg["embed_dim"], depth=cfg["depth"],
                              local_up_to_layer=local_up_to_layer, in_chans=cfg["in_chans"],
                              num_classes=cfg["num_classes"], grid=grid, patch=cfg["patch_size"])
    state = random_reference_state(layout, seed=num_heads * 100 + grid[0] * 10 + local_up_to_layer)

    model = create_model("convit_tiny", **cfg)
    load_reference_state_dict(model, state)
    images = np.random.default_rng(7).normal(size=(3, cfg["in_chans"], height, width)).astype(np.float32)

    expected = reference_logits(images, state, num_heads=num_heads, depth=cfg["depth"],
                                local_up_to_layer=local_up_to_layer, patch=cfg["patch_size"])
    actual = paddle_logits(model, images)
    assert actual.shape == (3, cfg["num_classes"])
    assert_logits_close(actual, expected)
    # The check has teeth: images differ, so their logits must too.
    assert np.abs(expected[0] - expected[1]).max() > 1e-2


def test_all_gpsa_model_follows_its_documented_class_token_rule():
    """local_up_to_layer == depth: the reference's patch-0 bug must not be reproduced; convitlab's
    documented rule (class token = cls_token + patch mean after the last block) must hold."""
    layout = reference_layout(num_heads=4, embed_dim=8, depth=3, local_up_to_layer=3, in_chans=3,
                              num_classes=7, grid=(2, 4), patch=4)
    state = random_reference_state(layout, seed=5)
    model = create_model("convit_tiny", **dict(SMALL, num_heads=4, local_up_to_layer=3, img_size=(8, 16)))
    load_reference_state_dict(model, state)
    images = np.random.default_rng(4).normal(size=(2, 3, 8, 16)).astype(np.float32)
    actual = paddle_logits(model, images)
    assert_logits_close(actual, reference_logits(images, state, num_heads=4, depth=3,
                                                 local_up_to_layer=3, patch=4))
    # what the buggy reference would give: run the same blocks, then patch 0 to the head
    x = patch_embed(images.astype(np.float64), state["patch_embed.proj.weight"],
                    state["patch_embed.proj.bias"], 4) + state["pos_embed"]
    for i in range(3):
        p = f"blocks.{i}."
        x = x + gpsa(layer_norm(x, state, p + "norm1"), state, p + "attn.", 4, relative_features(2, 4))
        x = x + linear(gelu(linear(layer_norm(x, state, p + "norm2"), state, p + "mlp.fc1")),
                       state, p + "mlp.fc2")
    patch0 = linear(layer_norm(x, state, "norm")[:, 0], state, "head")
    assert np.abs(actual - patch0).max() > 1e-2


def test_reference_is_sensitive_to_what_it_checks():
    """Guard against a vacuous reference: flipping the GPSA gating or the relative-position
    features must move the logits far beyond the comparison tolerance."""
    cfg = dict(num_heads=4, depth=3, local_up_to_layer=2, patch=4)
    layout = reference_layout(num_heads=4, embed_dim=8, depth=3, local_up_to_layer=2, in_chans=3,
                              num_classes=7, grid=(2, 4), patch=4)
    state = random_reference_state(layout, seed=1)
    images = np.random.default_rng(2).normal(size=(2, 3, 8, 16))
    base = reference_logits(images, state, **cfg)
    flipped = dict(state)
    for i in range(2):
        flipped[f"blocks.{i}.attn.gating_param"] = -state[f"blocks.{i}.attn.gating_param"]
    assert np.abs(reference_logits(images, flipped, **cfg) - base).max() > 1e-3
    # dx/dy swapped (the transposed-grid mistake) must be detectable on a non-square grid
    swapped = dict(state)
    for i in range(2):
        w = state[f"blocks.{i}.attn.pos_proj.weight"]
        swapped[f"blocks.{i}.attn.pos_proj.weight"] = w[:, [1, 0, 2]]
    assert np.abs(reference_logits(images, swapped, **cfg) - base).max() > 1e-3


def test_relative_features_on_a_non_square_grid():
    rel = relative_features(2, 3)  # patches 0 1 2 / 3 4 5
    assert rel.shape == (6, 6, 3)
    np.testing.assert_array_equal(rel[0, 5], [2, 1, 5])    # from (row 0, col 0) to (row 1, col 2)
    np.testing.assert_array_equal(rel[5, 0], [-2, -1, 5])
    np.testing.assert_array_equal(rel[1, 3], [-1, 1, 2])
    assert (np.diagonal(rel, axis1=0, axis2=1) == 0).all()


# --------------------------------------------------------------------------------------------
# The checkpoint layout of convit_tiny (facts file) and the conversion entry point.
# --------------------------------------------------------------------------------------------
def to_reference_layout(model):
    """{name: shape} of `model.state_dict()` with 2-D (Linear) weights transposed to [out, in]."""
    shapes = {}
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        shapes[name] = shape[::-1] if name.endswith(".weight") and len(shape) == 2 else shape
    return shapes


def test_convit_tiny_parameters_match_the_reference_checkpoint_layout():
    model = create_model("convit_tiny", img_size=224, patch_size=16, num_classes=1000)
    got = to_reference_layout(model)
    assert len(got) == 180
    assert not any("rel" in name for name in got), "rel_indices/relative positions must not persist"
    expected = reference_layout(num_heads=4, embed_dim=48, depth=12, local_up_to_layer=10,
                                in_chans=3, num_classes=1000, grid=(14, 14), patch=16)
    assert len(expected) == 180
    assert got == expected
    # Spot-check the shapes as the facts file spells them out.
    facts = {"cls_token": (1, 1, 192), "pos_embed": (1, 196, 192),
             "patch_embed.proj.weight": (192, 3, 16, 16), "blocks.0.attn.gating_param": (4,),
             "blocks.9.attn.qk.weight": (384, 192), "blocks.9.attn.v.weight": (192, 192),
             "blocks.9.attn.pos_proj.weight": (4, 3), "blocks.9.attn.pos_proj.bias": (4,),
             "blocks.0.mlp.fc1.weight": (768, 192), "blocks.10.attn.qkv.weight": (576, 192),
             "blocks.11.attn.qkv.weight": (576, 192), "head.weight": (1000, 192)}
    for name, shape in facts.items():
        assert got[name] == shape, name
    assert "blocks.10.attn.qk.weight" not in got and "blocks.9.attn.qkv.weight" not in got


CONVERT_OVERRIDES = ["data.img_size=16", "data.patch_size=4", "data.num_classes=7", "model.embed_dim=8",
                     "model.depth=3", "model.local_up_to_layer=2"]
CONVERT_MODEL = dict(img_size=16, patch_size=4, num_classes=7, embed_dim=8, depth=3, local_up_to_layer=2)


def test_convert_script_round_trip(tmp_path):
    """convert.py writes the target and nothing else (no outputs/, .hydra/ or log), and the
    .pdparams gives the logits of the file it came from and of the reference."""
    layout = reference_layout(num_heads=4, embed_dim=8, depth=3, local_up_to_layer=2, in_chans=3,
                              num_classes=7, grid=(4, 4), patch=4)
    state = random_reference_state(layout, seed=11)
    source, target = tmp_path / "ref.safetensors", tmp_path / "out.pdparams"
    save_file(state, str(source))
    proc = run([*CONVERT, "model=convit_tiny", f"source={source.name}", f"target={target.name}",
                           *CONVERT_OVERRIDES], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "wrote out.pdparams"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pdparams", "ref.safetensors"]

    images = np.random.default_rng(3).normal(size=(2, 3, 16, 16)).astype(np.float32)
    from_pdparams = load_pretrained(create_model("convit_tiny", **CONVERT_MODEL), str(target))
    from_safetensors = load_pretrained(create_model("convit_tiny", **CONVERT_MODEL), str(source))
    converted = paddle_logits(from_pdparams, images)
    np.testing.assert_array_equal(converted, paddle_logits(from_safetensors, images))
    # and both are the reference's answer for those weights
    assert_logits_close(converted, reference_logits(images, state, num_heads=4, depth=3,
                                                    local_up_to_layer=2, patch=4))


@pytest.mark.parametrize("args, expected", [
    (["source=ref.safetensors", "target=out.pdparams", "data.num_classes=7"],
     "error: model=<name> is required: one of "),
    (["model=convit_tiny", "source=ref.safetensors", "target=out.pt", *CONVERT_OVERRIDES],
     "error: target='out.pt' is not allowed: a path ending in .pdparams"),
    (["model=convit_tiny", "source=nowhere.safetensors", "target=out.pdparams", *CONVERT_OVERRIDES],
     "error: checkpoint 'nowhere.safetensors' does not exist"),
])
def test_convert_script_bad_input_is_a_one_line_error(tmp_path, args, expected):
    layout = reference_layout(num_heads=4, embed_dim=8, depth=3, local_up_to_layer=2, in_chans=3,
                              num_classes=7, grid=(4, 4), patch=4)
    save_file(random_reference_state(layout, seed=12), str(tmp_path / "ref.safetensors"))
    proc = run([*CONVERT, *args], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.safetensors"]
