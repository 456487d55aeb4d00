"""convitlab's ConViT against an independent NumPy forward pass of the reference semantics
(tests/numpy_reference.py, written from the facts file, not from convitlab's model code). It runs
in float64, so it is the "exact" answer that convitlab's float32 logits must match to 1e-5
relative error.

convitlab is only touched through its public API: `create_model`, `load_state_dict` (layout "reference"),
`load_pretrained`, `model.state_dict()` (for names and Paddle shapes) and `src/convert.py`.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run
from numpy_reference import (
    SMALL,
    assert_logits_close,
    gelu,
    gpsa,
    layer_norm,
    linear,
    paddle_logits,
    patch_embed,
    random_reference_state,
    reference_layout,
    reference_logits,
    relative_features,
)
from safetensors.numpy import save_file

from convitlab.models import create_model
from convitlab.models.weights import load_pretrained, load_state_dict

ROOT = Path(__file__).resolve().parents[1]
CONVERT = [sys.executable, str(ROOT / "src" / "convert.py")]


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
    load_state_dict(model, state, "reference")
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
    load_state_dict(model, state, "reference")
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
