"""Every registered model through the same checks, plus the ConViT-specific promises."""
import numpy as np
import paddle
import pytest

from convitlab.analysis.attention_maps import draw_attention_maps
from convitlab.analysis.locality import locality_rows, window_distance
from convitlab.analysis.summary import count_flops, count_parameters, summary
from convitlab.core.errors import UserError
from convitlab.models import create_model, list_models, model_defaults
from convitlab.models.attention import relative_positions
from convitlab.models.weights import load_pretrained, save_pdparams

# The reference implementation's counts at 224x224 and 1000 classes (convit-facts.md).
REFERENCE_PARAMS = {
    "convit_tiny": 5_710_512, "convit_small": 27_777_322, "convit_base": 86_540_040,
    "convit_tiny_plus": 9_972_912, "convit_small_plus": 48_979_882, "convit_base_plus": 153_134_856,
}
TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=7, embed_dim=8, depth=3)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count_equals_reference(name):
    assert count_parameters(create_model(name)) == REFERENCE_PARAMS[name]


def test_registry_lists_every_size_and_rejects_unknown_names():
    names = list_models()
    for expected in [*REFERENCE_PARAMS, "deit_tiny", "deit_small", "deit_base", "convit_micro", "deit_micro"]:
        assert expected in names
    with pytest.raises(UserError, match="known models are .*convit_tiny"):
        create_model("convit_huge")


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_backward_save_load(name, tmp_path):
    """The generic check of a registered size, shrunk to a tiny width so it runs in a second."""
    heads = model_defaults(name)["num_heads"]
    model = create_model(name, **TINY, num_heads=heads,
                         local_up_to_layer=min(model_defaults(name)["local_up_to_layer"], 2))
    x = paddle.randn([2, 3, 16, 16])
    logits = model(x)
    assert logits.shape == [2, 7]
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if not p.stop_gradient)
    model.eval()
    path = save_pdparams(model, tmp_path / "w.pdparams")
    again = create_model(name, **TINY, num_heads=heads,
                         local_up_to_layer=min(model_defaults(name)["local_up_to_layer"], 2))
    again.eval()
    load_pretrained(again, path)
    np.testing.assert_array_equal(model(x).numpy(), again(x).numpy())


def test_deit_and_convit_micro_differ_only_in_locality():
    convit, deit = model_defaults("convit_micro"), model_defaults("deit_micro")
    assert convit.pop("local_up_to_layer") > 0 and deit.pop("local_up_to_layer") == 0
    assert convit == deit


def test_relative_positions_on_a_two_by_three_grid():
    rel = relative_positions(2, 3).numpy()  # patches row-major: index = row * 3 + col
    assert rel.shape == (6, 6, 3)
    # query (0, 0) -> key (1, 2): dx = +2 columns, dy = +1 row
    np.testing.assert_array_equal(rel[0, 5], [2, 1, 5])
    np.testing.assert_array_equal(rel[5, 0], [-2, -1, 5])
    assert not any("rel" in k for k in create_model("convit_micro").state_dict())  # never in checkpoints


# pos_proj's weight columns (Paddle layout [3, H]: rows dx, dy, d²) after the local init at α = 1,
# written out from convit-facts.md: head h1 + k·h2 gets (2(h2 − c), 2(h1 − c), −1), k = int(√H),
# c = (k − 1)/2 for even k, k // 2 for odd k. Its window centre is Δ = (h2 − c, h1 − c).
LOCAL_INIT_COLUMNS = {
    4: [(-1, -1, -1), (-1, 1, -1), (1, -1, -1), (1, 1, -1)],                    # k = 2, c = 0.5
    9: [(-2, -2, -1), (-2, 0, -1), (-2, 2, -1), (0, -2, -1), (0, 0, -1), (0, 2, -1),
        (2, -2, -1), (2, 0, -1), (2, 2, -1)],                                     # k = 3, c = 1
}


def local_init_attention(heads, alpha):
    model = create_model("convit_tiny", img_size=28, patch_size=4, num_heads=heads, embed_dim=4,
                         depth=2, local_up_to_layer=1, locality_strength=alpha)
    return model.blocks[0].attn


@pytest.mark.parametrize("heads,alpha", [(4, 1.0), (4, 0.25), (9, 1.0), (9, 3.0)])
def test_local_init_sets_the_papers_pos_proj_columns(heads, alpha):
    attn = local_init_attention(heads, alpha)
    np.testing.assert_array_equal(attn.v.weight.numpy(), np.eye(heads * 4, dtype="float32"))
    np.testing.assert_array_equal(attn.gating_param.numpy(), np.ones(heads, dtype="float32"))
    weight = attn.pos_proj.weight.numpy()
    assert weight.shape == (3, heads)
    expected = alpha * np.array(LOCAL_INIT_COLUMNS[heads], dtype="float32").T  # [3, H]
    np.testing.assert_allclose(weight, expected, rtol=0, atol=1e-6)


def test_local_init_leaves_heads_beyond_the_square_alone():
    weight = local_init_attention(5, 2.0).pos_proj.weight.numpy()  # k = 2: heads 0..3 local, head 4 not
    np.testing.assert_allclose(weight[:, :4], 2.0 * np.array(LOCAL_INIT_COLUMNS[4], dtype="float32").T, atol=1e-6)
    assert np.abs(weight[:, 4]).max() < 0.2  # trunc-normal(0.02) init, times α


def test_local_init_windows_peak_at_their_offsets():
    """9 heads (odd kernel): each head's positional attention from the centre patch of the 7x7
    grid peaks at exactly one patch, (dx, dy) = Δ away (dx along a row, dy down the columns)."""
    positional = local_init_attention(9, 1.0).positional_attention().numpy()  # [H, N, N]
    centre = 3 * 7 + 3
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1)]  # head: (dx, dy)
    for head, (dx, dy) in enumerate(offsets):
        row = positional[head, centre]
        peak = (3 + dy) * 7 + (3 + dx)
        assert row.argmax() == peak
        assert row[peak] > np.sort(row)[-2] * 2  # a strict peak: e^1 over its neighbours


def test_locality_strength_sharpens_the_window():
    def peak(alpha):
        model = create_model("convit_micro", locality_strength=alpha)
        return model.blocks[0].attn.positional_attention().numpy().max(axis=-1).mean()
    assert peak(0.1) < peak(1.0) < peak(10.0)


def test_local_up_to_layer_bounds():
    with pytest.raises(UserError, match="local_up_to_layer=7"):
        create_model("convit_micro", local_up_to_layer=7)
    model = create_model("convit_micro", local_up_to_layer=6)  # all GPSA: still a class token
    model.eval()
    x = paddle.randn([3, 1, 8, 8])
    features = model.forward_features(x)
    assert features.shape == [3, 17, 64]  # class token + 16 patches
    logits = model(x).numpy()
    assert np.ptp(logits, axis=0).max() > 1e-4  # the head sees the image, not a constant


def test_non_square_grid_and_resolution_change(tmp_path):
    model = create_model("convit_micro", img_size=(8, 12), num_classes=5)
    assert model.grid_size == (4, 6)
    model.eval()
    x = paddle.randn([2, 1, 8, 12])
    assert model(x).shape == [2, 5]
    path = save_pdparams(create_model("convit_micro"), tmp_path / "w.pdparams")
    wide = create_model("convit_micro", img_size=(8, 12))
    load_pretrained(wide, path)  # 4x4 pos_embed interpolated to 4x6, relative positions rebuilt
    assert wide.pos_embed.shape == [1, 24, 64]
    assert wide.blocks[0].attn.rel_positions.shape == [24, 24, 3]
    same = create_model("convit_micro")
    load_pretrained(same, path)
    same.set_img_size(12)
    assert same.grid_size == (6, 6) and same(paddle.randn([1, 1, 12, 12])).shape == [1, 10]


def test_a_head_of_another_size_is_refused_and_wrong_shapes_are_listed(tmp_path):
    path = save_pdparams(create_model("convit_micro"), tmp_path / "w.pdparams")
    with pytest.raises(UserError, match=r"^checkpoint's head is for 10 classes .*the model's for 3 "
                                        r"\(data.num_classes\): use data.num_classes=10, .*model.pretrained=<file>$"):
        load_pretrained(create_model("convit_micro", num_classes=3), path)
    # Another width as well: the head is one of the mis-shaped tensors, not the reason given.
    with pytest.raises(UserError, match=r"^checkpoint does not fit the model \(mis-shaped: blocks\.0\."):
        load_pretrained(create_model("convit_micro", embed_dim=8, num_classes=3), path)
    with pytest.raises(UserError, match=r"^checkpoint does not fit the model \(missing: blocks\.6\..*mis-shaped: "
                                        r"head\.bias \[10\] vs model \[3\], head\.weight"):
        load_pretrained(create_model("convit_micro", depth=7, num_classes=3), path)
    with pytest.raises(UserError, match=r"mis-shaped: .*blocks\.0\.attn\.qk\.weight"):
        load_pretrained(create_model("convit_micro", embed_dim=8), path)
    with pytest.raises(UserError, match=r"missing: .*blocks\.6\..*"):
        load_pretrained(create_model("convit_micro", depth=7), path)
    with pytest.raises(UserError, match=r"missing: blocks\.0\.attn\.qkv\.weight.*unexpected: blocks\.0\.attn\.gating_param"):
        load_pretrained(create_model("convit_micro", local_up_to_layer=0), path)


def test_checkpoint_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained(create_model("convit_micro"), tmp_path / "none.pdparams")
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(UserError, match="torn.safetensors.*corrupt"):
        load_pretrained(create_model("convit_micro"), torn)
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(UserError, match="unknown format"):
        load_pretrained(create_model("convit_micro"), tmp_path / "w.ckpt")


def test_safetensors_in_the_reference_layout_loads(tmp_path):
    """timm's file: names as ours, Linear weights [out, in]."""
    from safetensors.numpy import save_file

    from convitlab.models.weights import linear_weight_names

    source = create_model("convit_micro")
    linear = linear_weight_names(source)
    state = {k: (v.numpy().T.copy() if k in linear else v.numpy()) for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "ref.safetensors"))
    target = create_model("convit_micro")
    load_pretrained(target, tmp_path / "ref.safetensors")
    source.eval(), target.eval()
    x = paddle.randn([2, 1, 8, 8])
    np.testing.assert_array_equal(source(x).numpy(), target(x).numpy())


def test_pth_without_torch_names_the_extra(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("no torch")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    (tmp_path / "w.pth").write_bytes(b"PK")
    with pytest.raises(UserError, match=r"needs PyTorch: pip install -e '\.\[torch\]'"):
        load_pretrained(create_model("convit_micro"), tmp_path / "w.pth")


def test_frozen_ablations_stop_the_right_gradients():
    model = create_model("convit_micro", train_gating=False)
    assert all(b.attn.gating_param.stop_gradient for b in model.gpsa_blocks())
    assert not model.blocks[0].attn.qk.weight.stop_gradient
    frozen = create_model("convit_micro", train_gpsa=False)
    assert all(p.stop_gradient for b in frozen.gpsa_blocks() for p in b.attn.parameters())
    assert not frozen.blocks[0].mlp.fc1.weight.stop_gradient
    assert count_parameters(frozen, trainable_only=True) < count_parameters(frozen)


def test_to_static_matches_eager():
    model = create_model("convit_micro")
    model.eval()
    x = paddle.randn([2, 1, 8, 8])
    eager = model(x).numpy()
    static = paddle.jit.to_static(model)
    np.testing.assert_allclose(static(x).numpy(), eager, rtol=1e-5, atol=1e-6)


def test_locality_measures_and_summary(tmp_path):
    model = create_model("convit_micro", locality_strength=5.0)
    rows = locality_rows(model, paddle.randn([4, 1, 8, 8]))
    assert len(rows) == 6 * 4
    gpsa = [r for r in rows if r["layer"] < 5]
    # A sharp window at offset (±0.5, ±0.5) looks at the 4 nearest patches: distance 1 or ~1.4.
    assert all(0.5 < r["nonlocality"] < 1.5 for r in gpsa)
    assert all(abs(r["gate"] - 1 / (1 + np.exp(-1))) < 1e-6 for r in gpsa)
    assert all(abs(r["window_distance"] - np.sqrt(0.5)) < 1e-5 for r in gpsa)
    assert all(np.isnan(r["gate"]) for r in rows if r["layer"] == 5)
    assert np.isnan(window_distance(np.array([[1.0], [1.0], [0.5]])))[0]  # no window: score grows outwards
    assert "301,038 parameters" in summary(model)
    assert count_flops(create_model("convit_tiny")) == pytest.approx(1.25e9, rel=0.02)  # the paper: ~1G
    drawn = draw_attention_maps(model, np.random.rand(1, 8, 8).astype("float32"), tmp_path / "maps.png", [0.5], [0.5])
    assert drawn.path.stat().st_size > 5000


def test_patch_embedding_init_is_the_references():
    """PyTorch's Conv2d default, which the reference keeps: uniform in ±1/√fan_in, bias too."""
    conv = create_model("convit_tiny").patch_embed.proj
    bound = (3 * 16 * 16) ** -0.5
    weight, bias = conv.weight.numpy(), conv.bias.numpy()
    assert np.abs(weight).max() <= bound and np.abs(bias).max() <= bound
    assert weight.std() == pytest.approx(bound / np.sqrt(3), rel=0.02)  # a uniform's std, not Paddle's normal
