"""Attention maps: the figure shows query_attention's numbers on one colour scale; maps.py writes one
PNG per chosen image (files, a folder, validation indices) from a run's best weights; bad input is
one line and writes nothing. The tiny trained run of conftest.py, the real entry point."""
import sys

import numpy as np
import pytest
from helpers import ROOT, compose_train, run
from PIL import Image
from sklearn.datasets import load_digits

from convitlab.analysis.attention_maps import KINDS, draw_attention_maps, query_attention
from convitlab.data import build_eval_dataset
from convitlab.models import create_model
from convitlab.models.weights import load_pretrained

MAPS = [sys.executable, str(ROOT / "src" / "maps.py")]
DIGITS = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10)  # conf/data/digits.yaml's image


def maps(*arguments, cwd):
    return run(MAPS + list(arguments), cwd=cwd)


def write_digit_pngs(folder):
    """Two digits as 8-bit grey PNGs at their 8x8, one in a sub-folder, and one as RGB at 24x24."""
    (folder / "more").mkdir(parents=True)
    pixels = [np.rint(image * 255 / 16).astype(np.uint8) for image in load_digits().images[:3]]
    Image.fromarray(pixels[0], "L").save(folder / "zero.png")
    Image.fromarray(pixels[1], "L").save(folder / "more" / "one.png")
    Image.fromarray(np.stack([pixels[2]] * 3, axis=-1), "RGB").resize((24, 24)).save(folder / "two.png")
    return folder


def test_the_figure_shows_query_attention_on_one_scale(tiny_run, tmp_path):
    """Every panel holds the rows query_attention gives (each a distribution over the keys), the
    combined ones (1-σ(λ))·content + σ(λ)·positional, all on one scale from 0 to the largest weight."""
    model = load_pretrained(create_model("convit_micro", **DIGITS), str(tiny_run / "checkpoints" / "best.pdparams"))
    model.eval()
    val, _, _ = build_eval_dataset(compose_train().data)
    image, _ = val[3]
    query = 6  # patch (1, 2) of the 4x4 grid
    drawn = draw_attention_maps(model, image, tmp_path / "maps.png", [0.5], [0.5], query=query)

    assert drawn.path.stat().st_size > 10_000
    gpsa = [i for i, block in enumerate(model.blocks) if block.is_gpsa]
    assert gpsa == [0, 1, 2, 3, 4]
    assert sorted(drawn.maps) == sorted((layer, kind) for layer in gpsa for kind in KINDS)
    largest = max(float(m.max()) for m in drawn.maps.values())
    (low, high), = drawn.scales  # one scale for every panel
    assert (low, high) == (0.0, pytest.approx(largest))
    for layer in gpsa:
        want = query_attention(model, image, layer, query=(1, 2))
        for kind in KINDS:
            assert drawn.maps[(layer, kind)].shape == (4, 4, 4)  # heads, grid rows, grid columns
            np.testing.assert_array_equal(drawn.maps[(layer, kind)], want[kind])
            np.testing.assert_allclose(drawn.maps[(layer, kind)].sum(axis=(1, 2)), 1.0, rtol=1e-5)
        gate = 1 / (1 + np.exp(-model.blocks[layer].attn.gating_param.numpy().astype(np.float64)))
        np.testing.assert_allclose(drawn.gates[layer], gate, rtol=1e-6)
        mixed = ((1 - gate)[:, None, None] * drawn.maps[(layer, "content")]
                 + gate[:, None, None] * drawn.maps[(layer, "positional")])
        np.testing.assert_allclose(drawn.maps[(layer, "combined")], mixed, atol=1e-6)


@pytest.mark.slow
def test_maps_writes_one_png_per_image_of_a_folder_and_of_validation_indices(tiny_run, tmp_path):
    folder = write_digit_pngs(tmp_path / "digits")
    proc = maps(f"run={tiny_run}", f"images={folder}", "out=figures", "query=[0,3]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert written == ["more_one.png", "two.png", "zero.png"]
    assert "3 attention map figure(s) in figures" in proc.stdout
    for name in written:
        with Image.open(tmp_path / "figures" / name) as png:
            assert png.format == "PNG" and png.size[1] > png.size[0] > 500  # 5 GPSA layers x 3 rows, 4 heads

    proc = maps(f"run={tiny_run}", "images=val:0-1", "out=val", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["val_0.png", "val_1.png"]
    proc = maps(f"run={tiny_run}", f"images={folder / 'zero.png'}", "out=one", "query=5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["zero.png"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no such image", "unreadable image", "validation index", "query", "no best", "a DeiT"])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_run, tmp_path):
    folder = write_digit_pngs(tmp_path / "digits")
    arguments, expected = {
        "no such image": ([f"images={tmp_path / 'nowhere.png'}"],
                          f"images='{tmp_path / 'nowhere.png'}' is not allowed: an image file or a folder of "
                          "them; it is not found"),
        "unreadable image": ([f"images={folder}"], f"cannot read image {folder / 'zz_broken.png'}: "),
        "validation index": (["images=val:358-360"], "images='val:358-360' is not allowed: val:<indices> of "
                             "the 360 validation images: each 0..359"),
        "query": ([f"images={folder}", "query=16"], "query=16 is not allowed: a patch index 0..15 of the "
                  "4x4 grid (row-major), [row, col], or centre"),
        "no best": ([f"images={folder}"], f"run='{tiny_run}' has no checkpoints/best.pdparams"),
        "a DeiT": ([f"images={folder}", "model.local_up_to_layer=0"], "model.local_up_to_layer=0 is not allowed: "
                   "at least 1: the maps are of GPSA heads, and this convit_micro has none (a DeiT-style model)"),
    }[case]
    if case == "unreadable image":
        (folder / "zz_broken.png").write_bytes(b"not a png")  # read last: the good ones before it are not drawn
    if case == "no best":
        (tiny_run / "checkpoints" / "best.pdparams").unlink()
    proc = maps(f"run={tiny_run}", *arguments, "out=figures", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {expected}"), proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "figures").exists()
