"""How local each attention head is, measured on real activations flowing through the model."""
import math

import numpy as np
import paddle
import paddle.nn.functional as F

from convitlab.models.attention import relative_positions


def window_distance(pos_proj_weight: np.ndarray) -> np.ndarray:
    """Per head, distance from the query to where its positional score peaks.

    The score w_dx·dx + w_dy·dy + w_d·(dx² + dy²) peaks at −(w_dx, w_dy) / (2 w_d); a head
    with w_d ≥ 0 has no window (its score grows with distance) and gets NaN.
    """
    w_dx, w_dy, w_d = pos_proj_weight  # Paddle layout [3, heads]
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.hypot(w_dx, w_dy) / (2.0 * np.abs(w_d))
    return np.where(w_d < 0, dist, np.nan)


@paddle.no_grad()
def attention_maps_per_block(model, images):
    """For each block, its attention maps on its real input (patch queries and keys only)."""
    maps = []

    def record(index, block, tokens):
        result = block.attn.attention_maps(block.norm1(tokens))
        if not block.is_gpsa:  # drop the class token's row and column
            result = {k: (v[:, :, 1:, 1:] if v is not None else None) for k, v in result.items()}
        maps.append(result)

    was_training = model.training
    model.eval()
    try:
        model.forward_features(images, block_hook=record)
    finally:
        model.train(was_training)
    return maps


def locality_rows(model, images):
    """Rows (layer, head, nonlocality, gate, window_distance) for one batch of images.

    Nonlocality = Σ_j A_ij ‖δ_ij‖ averaged over query patches and images: the mean attention
    distance in patches. For MHSA layers the class token is left out and the rows of the
    patch-to-patch attention are renormalised, so layers are comparable.
    """
    distances = paddle.sqrt(relative_positions(*model.grid_size)[:, :, 2])  # [N, N] query to key, in patches
    rows = []
    for layer, (block, maps) in enumerate(zip(model.blocks, attention_maps_per_block(model, images))):
        attn = maps["combined"]
        attn = attn / attn.sum(axis=-1, keepdim=True)
        nonlocality = (attn * distances).sum(axis=-1).mean(axis=[0, 2]).numpy()
        if block.is_gpsa:
            gate = F.sigmoid(block.attn.gating_param).numpy()
            window = window_distance(block.attn.pos_proj.weight.numpy())
        else:
            gate = window = [math.nan] * len(nonlocality)
        for head, value in enumerate(nonlocality):
            rows.append({"layer": layer, "head": head, "nonlocality": float(value),
                         "gate": float(gate[head]), "window_distance": float(window[head])})
    return rows
