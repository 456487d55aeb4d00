"""The named model sizes: the one place their knobs are defined (plain data, no Paddle).

`create_model(name)` and `python src/train.py model=name` both build from `size_knobs(name)`:
Hydra's `model` group is generated from this table (config.register_configs), so a value
cannot be set in two places and disagree.
"""
from convitlab.core.errors import UserError

# The knobs every size shares, at the reference's values; a size may change them too.
COMMON_KNOBS = dict(
    mlp_ratio=4.0,
    locality_strength=1.0,
    use_local_init=True,
    train_gating=True,
    train_gpsa=True,
    use_pos_embed=True,
    drop_rate=0.0,
    attn_drop_rate=0.0,
    drop_path_rate=0.1,       # the reference's training recipe (its main.py --drop-path)
)
# What the data decides in a training run (conf/data); these are the values a size is published at.
IMAGE_KNOBS = ("img_size", "patch_size", "in_chans", "num_classes")
_IMAGENET = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, depth=12)
# CPU-sized pair for tiny images (8x8 digits with patch 2, 32x32 CIFAR with patch 4): same except locality.
_MICRO = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, num_heads=4, depth=6,
              drop_path_rate=0.0)

# embed_dim is per head (the model's width is embed_dim x num_heads); local_up_to_layer counts the
# leading GPSA blocks. The paper's sizes: "+" = 64 dimensions per head, 10 GPSA blocks of 12. The
# DeiT rows are the same backbone with no GPSA (local_up_to_layer=0): the paper's baselines.
SIZES = {
    "convit_tiny": dict(_IMAGENET, embed_dim=48, num_heads=4, local_up_to_layer=10),
    "convit_small": dict(_IMAGENET, embed_dim=48, num_heads=9, local_up_to_layer=10),
    "convit_base": dict(_IMAGENET, embed_dim=48, num_heads=16, local_up_to_layer=10),
    "convit_tiny_plus": dict(_IMAGENET, embed_dim=64, num_heads=4, local_up_to_layer=10),
    "convit_small_plus": dict(_IMAGENET, embed_dim=64, num_heads=9, local_up_to_layer=10),
    "convit_base_plus": dict(_IMAGENET, embed_dim=64, num_heads=16, local_up_to_layer=10),
    "deit_tiny": dict(_IMAGENET, embed_dim=64, num_heads=3, local_up_to_layer=0),
    "deit_small": dict(_IMAGENET, embed_dim=64, num_heads=6, local_up_to_layer=0),
    "deit_base": dict(_IMAGENET, embed_dim=64, num_heads=12, local_up_to_layer=0),
    "convit_micro": dict(_MICRO, local_up_to_layer=5),
    "deit_micro": dict(_MICRO, local_up_to_layer=0),
}


def list_models():
    return sorted(SIZES)


def model_defaults(name: str) -> dict:
    """Every keyword of the named size: its knobs and the image it is published at."""
    if name not in SIZES:
        raise UserError(f"model {name!r} is unknown: known models are {', '.join(list_models())}")
    return {**COMMON_KNOBS, **SIZES[name]}


def size_knobs(name: str) -> dict:
    """The named size's knobs without the image ones (those follow the data in a training run)."""
    return {k: v for k, v in model_defaults(name).items() if k not in IMAGE_KNOBS}
