"""The ConViT backbone: patch embedding, GPSA blocks, then MHSA blocks with a class token."""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from convitlab.core.errors import check
from convitlab.models.attention import GPSA, MHSA
from convitlab.ops.cpu_layers import GELU, LayerNorm, Linear

_trunc_normal = nn.initializer.TruncatedNormal(std=0.02)
_zeros = nn.initializer.Constant(0.0)


class PatchEmbed(nn.Layer):
    """Non-overlapping patches (a conv with kernel = stride = patch) flattened to tokens."""

    def __init__(self, img_size, patch_size, in_chans, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2D(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.set_img_size(img_size)

    def set_img_size(self, img_size):
        h, w = (img_size, img_size) if isinstance(img_size, int) else (int(v) for v in img_size)
        check(h % self.patch_size == 0 and w % self.patch_size == 0, "img_size", (h, w),
              f"sides divisible by patch_size={self.patch_size}")
        self.grid_size = (h // self.patch_size, w // self.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose([0, 2, 1])  # [B, N, D]


class Mlp(nn.Layer):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = GELU()
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Layer):
    """Stochastic depth: drop a residual branch per sample, rescale the kept ones."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = paddle.floor(keep + paddle.rand([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype))
        return x * mask / keep


class Block(nn.Layer):
    """Pre-norm transformer block; `attn` is a GPSA or an MHSA."""

    def __init__(self, dim, num_heads, mlp_ratio, attn, drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, epsilon=1e-6)
        self.attn = attn
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm(dim, epsilon=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    @property
    def is_gpsa(self):
        return isinstance(self.attn, GPSA)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConViT(nn.Layer):
    """ConViT (d'Ascoli et al. 2021). `embed_dim` is per head, as in the reference.

    The first `local_up_to_layer` blocks are GPSA on patch tokens; the class token joins in
    front just before the first MHSA block. With `local_up_to_layer == depth` no MHSA block
    follows, so the class token is formed after the last block as cls_token + the mean of
    the patch tokens (the reference silently fed patch 0 to the head instead).
    `local_up_to_layer == 0` is a DeiT-style ViT. Every knob is required: the named sizes
    (models/sizes.py, built by `create_model`) hold their values.
    """

    def __init__(self, *, img_size, patch_size, in_chans, num_classes, embed_dim, num_heads, depth, mlp_ratio,
                 local_up_to_layer, locality_strength, use_local_init, train_gating, train_gpsa, use_pos_embed,
                 drop_rate, attn_drop_rate, drop_path_rate):
        super().__init__()
        check(0 <= local_up_to_layer <= depth, "local_up_to_layer", local_up_to_layer, f"0..depth={depth}")
        dim = embed_dim * num_heads
        self.embed_dim = dim
        self.num_heads = num_heads
        self.local_up_to_layer = local_up_to_layer
        self.use_pos_embed = use_pos_embed
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = self.create_parameter([1, 1, dim], default_initializer=_trunc_normal)
        if use_pos_embed:
            self.pos_embed = self.create_parameter([1, num_patches, dim], default_initializer=_trunc_normal)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [float(r) for r in paddle.linspace(0, drop_path_rate, depth).numpy()] if depth > 1 else [drop_path_rate]
        blocks = []
        for i in range(depth):
            if i < local_up_to_layer:
                attn = GPSA(dim, num_heads, self.grid_size, attn_drop_rate, drop_rate,
                            locality_strength, use_local_init)
            else:
                attn = MHSA(dim, num_heads, attn_drop_rate, drop_rate)
            blocks.append(Block(dim, num_heads, mlp_ratio, attn, drop_rate, rates[i]))
        self.blocks = nn.LayerList(blocks)
        self.norm = LayerNorm(dim, epsilon=1e-6)
        self.head = Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()
        for block in self.gpsa_blocks():
            block.attn.gating_param.stop_gradient = not train_gating
            if not train_gpsa:  # the paper's "frozen GPSA" ablation: attention fixed at init
                for p in block.attn.parameters():
                    p.stop_gradient = True

    @property
    def grid_size(self):
        return self.patch_embed.grid_size

    def gpsa_blocks(self):
        return [b for b in self.blocks if b.is_gpsa]

    def init_weights(self):
        """As the reference: the patch conv uniform in ±1/√fan_in (PyTorch's default, which the
        reference keeps; Paddle's default is a wider normal), trunc-normal(0.02) Linear weights
        and zero biases, then each GPSA's local init."""
        conv = self.patch_embed.proj
        bound = (conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]) ** -0.5
        for tensor in (conv.weight, conv.bias):
            nn.initializer.Uniform(-bound, bound)(tensor)
        for layer in self.sublayers():
            if isinstance(layer, nn.Linear):
                _trunc_normal(layer.weight)
                if layer.bias is not None:
                    _zeros(layer.bias)
        for block in self.gpsa_blocks():
            if block.attn.use_local_init:
                block.attn.local_init()

    def set_img_size(self, img_size):
        """Run at another resolution: interpolate pos_embed, rebuild the relative positions."""
        old_grid = self.grid_size
        self.patch_embed.set_img_size(img_size)
        if self.grid_size == old_grid:
            return
        if self.use_pos_embed:
            resized = resize_pos_embed(self.pos_embed.detach(), old_grid, self.grid_size)
            self.pos_embed = self.create_parameter(resized.shape, default_initializer=_zeros)
            self.pos_embed.set_value(resized)
        for block in self.gpsa_blocks():
            block.attn.set_grid(self.grid_size)

    def forward_features(self, x, block_hook=None):
        """Tokens after the final norm, class token first: [B, 1 + N, D].

        `block_hook(index, block, tokens)`, if given, sees each block's input: analysis reads
        real activations this way instead of copying the forward pass.
        """
        x = self.patch_embed(x)
        if self.use_pos_embed:
            # expand first: Paddle's CPU add broadcasting over the batch is a scalar loop, while a
            # copy then a same-shape add runs vectorised
            x = x + self.pos_embed.expand_as(x)
        x = self.pos_drop(x)
        cls = self.cls_token.expand([x.shape[0], -1, -1])
        for i, block in enumerate(self.blocks):
            if i == self.local_up_to_layer:
                x = paddle.concat([cls, x], axis=1)
            if block_hook is not None:
                block_hook(i, block, x)
            x = block(x)
        if self.local_up_to_layer == len(self.blocks):
            x = paddle.concat([cls + x.mean(axis=1, keepdim=True), x], axis=1)
        return self.norm(x)

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])


def resize_pos_embed(pos_embed, old_grid, new_grid):
    """Bicubic interpolation of a [1, N, D] position embedding from one patch grid to another."""
    dim = pos_embed.shape[-1]
    grid = pos_embed.reshape([1, old_grid[0], old_grid[1], dim]).transpose([0, 3, 1, 2])
    grid = F.interpolate(grid, size=list(new_grid), mode="bicubic", align_corners=False)
    return grid.transpose([0, 2, 3, 1]).reshape([1, new_grid[0] * new_grid[1], dim])


def square_grid(num_patches: int):
    side = math.isqrt(num_patches)
    return (side, side) if side * side == num_patches else None
