"""Values, not shapes: where pos_embed values go when the model changes resolution, the model
against the NumPy reference after such a change on a non-square grid, and the pixels the
evaluation resize and centre crop keep."""
import numpy as np
import paddle
import pytest
from helpers import compose_train
from numpy_reference import (
    SMALL,
    assert_logits_close,
    paddle_logits,
    random_reference_state,
    reference_layout,
    reference_logits,
)
from PIL import Image

from convitlab.data.transforms import build_transforms
from convitlab.models import create_model
from convitlab.models.weights import load_state_dict

CUBIC_A = -0.75  # the bicubic kernel of PyTorch's and Paddle's interpolate (timm resizes pos_embed with it)


def cubic(x):
    x = abs(x)
    if x <= 1:
        return (CUBIC_A + 2) * x ** 3 - (CUBIC_A + 3) * x ** 2 + 1
    if x < 2:
        return CUBIC_A * (x ** 3 - 5 * x ** 2 + 8 * x - 4)
    return 0.0


def bicubic_matrix(n, m):
    """[m, n]: 1-D bicubic resize from n to m samples (half-pixel centres, edge samples repeated)."""
    matrix = np.zeros((m, n))
    for i in range(m):
        source = (i + 0.5) * n / m - 0.5
        first = int(np.floor(source)) - 1
        for k in range(first, first + 4):
            matrix[i, min(max(k, 0), n - 1)] += cubic(source - k)
    return matrix


def resized_grid(grid_values, new_grid):
    """[rows, cols, D] resized to new_grid, one axis after the other (bicubic is separable)."""
    rows, cols = grid_values.shape[:2]
    return np.einsum("ik,jl,klc->ijc", bicubic_matrix(rows, new_grid[0]), bicubic_matrix(cols, new_grid[1]),
                     grid_values)


def model_on_grid(grid, patch=2):
    return create_model("convit_micro", img_size=(grid[0] * patch, grid[1] * patch), patch_size=patch, in_chans=1,
                        num_classes=3)


def set_pos_embed(model, grid_values):
    rows, cols, dim = grid_values.shape
    full = np.zeros((1, rows * cols, model.pos_embed.shape[-1]), np.float32)
    full[0, :, :dim] = grid_values.reshape(rows * cols, dim)  # row-major, as the patches
    model.pos_embed.set_value(paddle.to_tensor(full))


def pos_embed_grid(model, dim):
    rows, cols = model.grid_size
    return model.pos_embed.numpy()[0, :, :dim].reshape(rows, cols, dim)


@pytest.mark.parametrize("new_grid", [(8, 12), (2, 3), (6, 4)], ids=["up", "down", "transposed"])
def test_a_constant_pos_embed_stays_constant(new_grid):
    model = model_on_grid((4, 6))
    constants = np.array([0.5, -2.0, 3.25], np.float32)
    set_pos_embed(model, np.broadcast_to(constants, (4, 6, 3)).copy())
    model.set_img_size((new_grid[0] * 2, new_grid[1] * 2))
    assert model.grid_size == new_grid
    np.testing.assert_allclose(pos_embed_grid(model, 3), np.broadcast_to(constants, (*new_grid, 3)), atol=1e-6)


@pytest.mark.parametrize("new_grid", [(8, 12), (2, 3), (6, 4), (3, 5)])
def test_pos_embed_values_land_at_their_rows_and_columns(new_grid):
    """pos_embed channel 0 holds the patch's row, channel 1 its column (4x6 grid): after the resize,
    channel 0 varies down the rows only and channel 1 across the columns only, with the values of
    a 1-D bicubic resize of 0..3 and 0..5; a grid read as 6x4, or transposed, breaks both."""
    rows, cols = np.meshgrid(np.arange(4.0), np.arange(6.0), indexing="ij")
    grid_values = np.stack([rows, cols, 10 * rows + cols], axis=-1)
    model = model_on_grid((4, 6))
    set_pos_embed(model, grid_values.astype(np.float32))
    model.set_img_size((new_grid[0] * 2, new_grid[1] * 2))
    actual = pos_embed_grid(model, 3)

    row_values = bicubic_matrix(4, new_grid[0]) @ np.arange(4.0)
    col_values = bicubic_matrix(6, new_grid[1]) @ np.arange(6.0)
    np.testing.assert_allclose(actual[..., 0], np.repeat(row_values[:, None], new_grid[1], 1), atol=1e-5)
    np.testing.assert_allclose(actual[..., 1], np.repeat(col_values[None, :], new_grid[0], 0), atol=1e-5)
    np.testing.assert_allclose(actual[..., 2], 10 * actual[..., 0] + actual[..., 1], atol=1e-4)
    assert (np.diff(row_values) > 0).all() and (np.diff(col_values) > 0).all()  # ordered: not flipped
    np.testing.assert_allclose(actual, resized_grid(grid_values, new_grid), atol=1e-5)


def test_model_matches_the_numpy_reference_after_a_resolution_change_to_a_non_square_grid():
    """A model built on a 4x4 grid, moved by set_img_size to 3x5: its logits are the reference's
    on a 3x5 grid whose pos_embed is the 4x4 one resized (NumPy bicubic, above) and whose relative
    positions are the 3x5 grid's."""
    cfg = dict(SMALL, num_heads=4, local_up_to_layer=2)
    layout = reference_layout(num_heads=4, embed_dim=cfg["embed_dim"], depth=cfg["depth"], local_up_to_layer=2,
                              in_chans=cfg["in_chans"], num_classes=cfg["num_classes"], grid=(4, 4),
                              patch=cfg["patch_size"])
    state = random_reference_state(layout, seed=11)
    model = create_model("convit_tiny", **cfg, img_size=16)
    load_state_dict(model, state, "reference")
    model.set_img_size((12, 20))
    assert model.grid_size == (3, 5)

    dim = state["pos_embed"].shape[-1]
    moved = dict(state, pos_embed=resized_grid(state["pos_embed"].reshape(4, 4, dim).astype(np.float64),
                                               (3, 5)).reshape(1, 15, dim))
    images = np.random.default_rng(3).normal(size=(2, 3, 12, 20)).astype(np.float32)
    expected = reference_logits(images, moved, num_heads=4, depth=cfg["depth"], local_up_to_layer=2,
                                patch=cfg["patch_size"])
    assert_logits_close(paddle_logits(model, images), expected)
    # Teeth: pos_embed resized to 5x3 and read as 3x5 (height and width swapped) gives other logits.
    swapped = dict(state, pos_embed=resized_grid(state["pos_embed"].reshape(4, 4, dim).astype(np.float64),
                                                 (5, 3)).reshape(1, 15, dim))
    wrong = reference_logits(images, swapped, num_heads=4, depth=cfg["depth"], local_up_to_layer=2,
                             patch=cfg["patch_size"])
    assert np.abs(wrong - expected).max() > 1e-3


def eval_transform(img_size):
    """The evaluation transform of an image folder (resize and centre crop), pixels kept as 0..255."""
    cfg = compose_train("data=imagefolder", "data.root=/nowhere", f"data.img_size={img_size}", "data.in_chans=1",
                        "data.mean=[0]", "data.std=[0.00392156862745098]")  # std 1/255: the array is the pixels
    return build_transforms(cfg.data, centre_crop=True)[1]


def coordinates(height, width):
    """A grey image whose pixel (r, c) holds 10 r + c: every crop position is readable."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return (10 * rows + cols).astype(np.uint8)


@pytest.mark.parametrize("img_size, shape, rows, cols", [
    # square: the short side to int(16 / 0.875) = 18, the centre 16 from offset round(1.0) = 1
    ("16", (18, 18), slice(1, 17), slice(1, 17)),
    # landscape 25x18 (W x H), already at short side 18: left round(4.5) = 4 (half to even), top 1
    ("16", (18, 25), slice(1, 17), slice(4, 20)),
    # portrait 18x25: top round(4.5) = 4, left 1
    ("16", (25, 18), slice(4, 20), slice(1, 17)),
    # [H, W] = [8, 16]: the image to (W, H) = (int(16 / 0.875), int(8 / 0.875)) = (18, 9); left 1, top round(0.5) = 0
    ("[8,16]", (9, 18), slice(0, 8), slice(1, 17)),
])
def test_the_centre_crop_keeps_the_centre_pixels(img_size, shape, rows, cols):
    """Images already at the resized size (the resize changes nothing): the crop's pixels by hand."""
    pixels = coordinates(*shape)
    out = eval_transform(img_size)(Image.fromarray(pixels))
    np.testing.assert_allclose(out[0], pixels[rows, cols], atol=1e-3)


def test_the_resize_before_the_crop_keeps_far_pixels_and_crops_the_centre():
    """A portrait 72x144 (W x H), top half 0 and bottom half 200, evaluated at 8: resized to 9x18
    (8 input pixels per output pixel; bicubic reaches 2 output pixels, 16 input pixels, away),
    then rows 5..12 kept (top round(5.0) = 5). Output rows 0-1 (resized rows 5-6, centres 44 and
    52) see the top half only, rows 6-7 (resized 11-12, centres 92 and 100) the bottom half only;
    without the crop's offset they would be resized rows 6-7, top half and the blurred boundary."""
    pixels = np.zeros((144, 72), np.uint8)
    pixels[72:] = 200
    out = eval_transform("8")(Image.fromarray(pixels))[0]
    assert out.shape == (8, 8)
    np.testing.assert_allclose(out[:2], 0, atol=1e-3)
    np.testing.assert_allclose(out[6:], 200, atol=1e-3)
    assert 0 < out[3, 0] < out[4, 0] < 200  # the boundary (input row 72, resized row 9) in between
