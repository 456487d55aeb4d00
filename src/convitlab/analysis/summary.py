"""Model summary: parameters and FLOPs per image (multiply-adds, the convention of the paper's table)."""


def count_parameters(model, trainable_only=False) -> int:
    return int(sum(p.numel().item() for p in model.parameters()
                   if not (trainable_only and p.stop_gradient)))


def count_flops(model) -> int:
    """Multiply-adds per image of a forward pass (LayerNorm, softmax and activations left out)."""
    dim = model.embed_dim
    patches = model.grid_size[0] * model.grid_size[1]
    patch = model.patch_embed.patch_size
    in_chans = model.patch_embed.proj.weight.shape[1]
    total = patches * dim * in_chans * patch * patch
    for block in model.blocks:
        tokens = patches if block.is_gpsa else patches + 1
        total += 4 * tokens * dim * dim              # q, k, v and the output projection
        total += 2 * tokens * tokens * dim           # scores and attention-weighted values
        total += 2 * tokens * dim * block.mlp.fc1.weight.shape[1]
    if hasattr(model.head, "weight"):
        total += dim * model.head.weight.shape[1]
    return int(total)


def summary(model) -> str:
    params = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    gpsa = len(model.gpsa_blocks())
    return (f"{type(model).__name__}: {len(model.blocks)} blocks ({gpsa} GPSA), dim {model.embed_dim}, "
            f"{model.num_heads} heads, grid {model.grid_size[0]}x{model.grid_size[1]}, "
            f"{params:,} parameters ({trainable:,} trainable), {count_flops(model) / 1e9:.3f} GFLOPs per image")
