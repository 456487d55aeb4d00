"""Attention maps of one image and one query patch, per GPSA layer and head: positional, content and
combined, drawn on one colour scale with a colour bar beside the image as the model sees it."""
from dataclasses import dataclass

import numpy as np
import paddle
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from convitlab.analysis.locality import attention_maps_per_block
from convitlab.core.errors import bad_value, check
from convitlab.core.files import atomic_path

KINDS = ("positional", "content", "combined")
CENTRE = "centre"


def query_patch(query, grid) -> tuple:
    """(row, col) of `query` in the (gh, gw) patch grid: None or "centre" (the centre patch), a patch
    index in row-major order, or [row, col]."""
    gh, gw = grid
    allowed = f"a patch index 0..{gh * gw - 1} of the {gh}x{gw} grid (row-major), [row, col], or {CENTRE}"
    if query is None or query == CENTRE:
        return gh // 2, gw // 2
    if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
        check(0 <= query < gh * gw, "query", query, allowed)
        return int(query) // gw, int(query) % gw
    try:
        row, col = (int(v) for v in query)
    except (TypeError, ValueError):
        raise bad_value("query", query, allowed) from None
    check(0 <= row < gh and 0 <= col < gw, "query", query, allowed)
    return row, col


def query_attention_per_layer(model, image, query=None) -> list:
    """Per block, {kind: [heads, gh, gw]}: the attention of patch `query` (query_patch's forms) on its real
    input, rows of the maps the block's forward applies (GPSA/MHSA.attention_maps); MHSA has no positional."""
    gh, gw = model.grid_size
    row, col = query_patch(query, (gh, gw))
    batch = paddle.to_tensor(np.asarray(image, dtype="float32")[None])
    index = row * gw + col
    per_layer = []
    for maps in attention_maps_per_block(model, batch):
        out = {}
        for kind, value in maps.items():
            if value is not None:
                value = value.numpy()
                rows = value[:, index] if value.ndim == 3 else value[0, :, index]  # positional has no batch axis
                out[kind] = rows.reshape(-1, gh, gw)
        per_layer.append(out)
    return per_layer


def query_attention(model, image, layer: int, query=None):
    """{kind: [heads, gh, gw]} of `layer` (query_attention_per_layer's)."""
    check(0 <= layer < len(model.blocks), "layer", layer, f"0..{len(model.blocks) - 1}")
    return query_attention_per_layer(model, image, query)[layer]


@dataclass
class PanelGrid:
    """Square panels of CELL inches in rows and columns, a wider gap before column 1 for the row labels,
    a colour bar on the right; boxes in figure fractions (laid out once: constrained layout took
    seconds a figure)."""
    rows: int
    columns: int
    CELL, GAP, LABEL, TOP, BAR = 1.25, 0.22, 0.45, 0.75, 1.1  # inches

    @property
    def size(self) -> tuple:
        return (self.GAP + self.LABEL + self.columns * (self.CELL + self.GAP) + self.BAR,
                self.TOP + self.rows * (self.CELL + self.GAP))

    def box(self, row: int, column: int) -> list:
        width, height = self.size
        x = self.GAP + column * (self.CELL + self.GAP) + (self.LABEL if column else 0)
        y = height - self.TOP - (row + 1) * (self.CELL + self.GAP) + self.GAP
        return [x / width, y / height, self.CELL / width, self.CELL / height]

    def colour_bar(self) -> list:
        width, height = self.size
        top = height - self.TOP
        span = min(top - self.GAP, 6 * (self.CELL + self.GAP))  # no taller than six rows
        return [(width - self.BAR + 0.1) / width, (top - span) / height, 0.15 / width, span / height]


@dataclass
class DrawnMaps:
    """What a figure shows, read back from its axes: maps[(layer, kind)] is [heads, gh, gw]."""
    path: object
    maps: dict
    gates: dict        # layer -> σ(λ) per head, the weight of the positional map in the combined one
    scales: set        # the (low, high) colour scales the map panels are drawn on: one


def as_seen(image, mean, std) -> np.ndarray:
    """The normalised [C, H, W] image back in [0, 1] as [H, W, C] (or [H, W] for one channel)."""
    picture = np.asarray(image, np.float32) * np.asarray(std, np.float32)[:, None, None] \
        + np.asarray(mean, np.float32)[:, None, None]
    picture = np.clip(picture.transpose(1, 2, 0), 0, 1)
    return picture[..., 0] if picture.shape[-1] == 1 else picture


def draw_attention_maps(model, image, path, mean, std, query=None, title="") -> DrawnMaps:
    """Save a PNG of the image (normalised [C, H, W], as the model takes it; shown de-normalised with
    the query patch framed) and, per GPSA layer, rows of positional, content and combined maps with
    a column per head, all on one colour scale from 0 to the largest weight, with its colour bar."""
    layers = [i for i, block in enumerate(model.blocks) if block.is_gpsa]
    check(bool(layers), "model.local_up_to_layer", 0, "at least 1: the maps are of GPSA heads, and this model "
          "has none (a DeiT)")
    gh, gw = model.grid_size
    row, col = query_patch(query, (gh, gw))
    per_layer = query_attention_per_layer(model, image, (row, col))
    heads = per_layer[layers[0]]["combined"].shape[0]
    gates = {layer: model.blocks[layer].attn.gate().numpy().ravel() for layer in layers}
    high = max(float(per_layer[layer][kind].max()) for layer in layers for kind in KINDS)
    scale = Normalize(0.0, high)

    picture = as_seen(image, mean, std)
    height, width = picture.shape[:2]
    ph, pw = height / gh, width / gw
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # maps over the image's pixels: patch (r, c) on its pixels
    rows = [(layer, kind) for layer in layers for kind in KINDS]
    grid = PanelGrid(len(rows), heads + 1)
    fig = Figure(figsize=grid.size)
    FigureCanvasAgg(fig)
    axes = np.array([[fig.add_axes(grid.box(r, c)) for c in range(heads + 1)] for r in range(len(rows))])
    for ax in axes.ravel():
        ax.set_axis_off()  # a frame, ticks and labels per panel: slow to lay out, and texts say it all
    axes[0, 0].imshow(picture, cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="nearest")
    axes[0, 0].set_title("as the model sees it", fontsize=8)
    for r, (layer, kind) in enumerate(rows):
        axes[r, 1].text(-0.08, 0.5, f"layer {layer}\n{kind}", transform=axes[r, 1].transAxes, rotation=90,
                        ha="right", va="center", fontsize=8)
        for head in range(heads):
            ax = axes[r, head + 1]
            ax.imshow(per_layer[layer][kind][head], cmap="viridis", norm=scale, extent=extent, interpolation="nearest")
            if r == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if kind == "combined":
                ax.text(0.5, -0.03, f"σ(λ)={gates[layer][head]:.2f}", transform=ax.transAxes, ha="center",
                        va="top", fontsize=7)
    for ax in axes[:, 1:].ravel().tolist() + [axes[0, 0]]:
        ax.add_patch(Rectangle((col * pw - 0.5, row * ph - 0.5), pw, ph, fill=False, color="red", lw=1))
    fig.colorbar(axes[0, 1].images[0], cax=fig.add_axes(grid.colour_bar()), label="attention weight")
    fig.suptitle(f"{title}\nquery patch ({row}, {col}) in red; combined = (1-σ(λ))·content + σ(λ)·positional; "
                 "one colour scale", fontsize=8, y=1 - 0.08 / grid.size[1])
    panels = [ax.images[0] for ax in axes[:, 1:].ravel()]  # what the axes hold, not what was handed to them
    drawn = DrawnMaps(path, {}, gates, {(panel.norm.vmin, panel.norm.vmax) for panel in panels})
    for r, key in enumerate(rows):
        drawn.maps[key] = np.stack([np.asarray(axes[r, h + 1].images[0].get_array()) for h in range(heads)])
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return drawn
