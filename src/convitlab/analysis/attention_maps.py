"""Attention maps of one image and one query patch, per head: positional, content, combined."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import paddle  # noqa: E402

from convitlab.analysis.locality import attention_maps_per_block  # noqa: E402
from convitlab.core.files import atomic_path  # noqa: E402
from convitlab.core.errors import check  # noqa: E402


def query_attention(model, image, layer: int, query=None):
    """{kind: [heads, gh, gw]} attention of patch `query` (row, col; default the centre) in `layer`:
    rows of the maps the block's forward applies (GPSA/MHSA.attention_maps on its real input)."""
    check(0 <= layer < len(model.blocks), "layer", layer, f"0..{len(model.blocks) - 1}")
    gh, gw = model.grid_size
    row, col = query if query is not None else (gh // 2, gw // 2)
    check(0 <= row < gh and 0 <= col < gw, "query", query, f"a patch (row, col) inside the {gh}x{gw} grid")
    batch = paddle.to_tensor(np.asarray(image, dtype="float32")[None])
    maps = attention_maps_per_block(model, batch)[layer]
    index = row * gw + col
    out = {}
    for kind, value in maps.items():
        if value is None:
            continue
        value = value.numpy()
        rows = value[:, index] if value.ndim == 3 else value[0, :, index]  # positional has no batch axis
        out[kind] = rows.reshape(-1, gh, gw)
    return out


def plot_attention_maps(model, image, layer: int, path, query=None, mean=None, std=None):
    """Save a PNG grid: the image, then one row per head with positional, content and combined maps."""
    maps = query_attention(model, image, layer, query)
    gh, gw = model.grid_size
    row, col = query if query is not None else (gh // 2, gw // 2)
    kinds = [k for k in ("positional", "content", "combined") if k in maps]
    heads = maps["combined"].shape[0]
    fig, axes = plt.subplots(heads, len(kinds) + 1, figsize=(2.2 * (len(kinds) + 1), 2.2 * heads), squeeze=False)
    picture = np.asarray(image, dtype="float32")
    if mean is not None and std is not None:
        picture = picture * np.asarray(std).reshape(-1, 1, 1) + np.asarray(mean).reshape(-1, 1, 1)
    picture = np.clip(picture.transpose(1, 2, 0), 0, 1)
    for h in range(heads):
        ax = axes[h, 0]
        if h == 0:
            ax.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray")
            patch = model.patch_embed.patch_size
            ax.add_patch(plt.Rectangle((col * patch - 0.5, row * patch - 0.5), patch, patch, fill=False, color="red"))
            ax.set_title("image, query")
        ax.axis("off")
        for j, kind in enumerate(kinds, start=1):
            ax = axes[h, j]
            ax.imshow(maps[kind][h], cmap="viridis")
            ax.plot(col, row, "r+")
            ax.set_xticks([])
            ax.set_yticks([])
            if h == 0:
                ax.set_title(kind)
            if j == 1:
                ax.set_ylabel(f"head {h}")
    fig.suptitle(f"layer {layer}, query patch ({row}, {col})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
