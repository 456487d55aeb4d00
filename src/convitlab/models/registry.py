"""Named model sizes: `create_model(name, **overrides)` builds any of them with any knob changed."""
from convitlab.errors import UserError
from convitlab.models.convit import ConViT

_REGISTRY = {}


def register_model(name: str, **defaults):
    """Register a named size: keyword defaults of ConViT, overridable at creation."""
    _REGISTRY[name] = defaults


def list_models():
    return sorted(_REGISTRY)


def model_defaults(name: str) -> dict:
    if name not in _REGISTRY:
        raise UserError(f"model {name!r} is unknown: known models are {', '.join(list_models())}")
    return dict(_REGISTRY[name])


def create_model(name: str, **overrides) -> ConViT:
    return ConViT(**{**model_defaults(name), **overrides})


# The paper's sizes (depth 12, patch 16, 224x224). `embed_dim` is per head; "+" = 64 per head.
# The DeiT rows are the same backbone with no GPSA (local_up_to_layer=0), the paper's baselines.
_CONVIT = dict(local_up_to_layer=10, locality_strength=1.0, depth=12)
register_model("convit_tiny", num_heads=4, embed_dim=48, **_CONVIT)
register_model("convit_small", num_heads=9, embed_dim=48, **_CONVIT)
register_model("convit_base", num_heads=16, embed_dim=48, **_CONVIT)
register_model("convit_tiny_plus", num_heads=4, embed_dim=64, **_CONVIT)
register_model("convit_small_plus", num_heads=9, embed_dim=64, **_CONVIT)
register_model("convit_base_plus", num_heads=16, embed_dim=64, **_CONVIT)
register_model("deit_tiny", num_heads=3, embed_dim=64, depth=12, local_up_to_layer=0)
register_model("deit_small", num_heads=6, embed_dim=64, depth=12, local_up_to_layer=0)
register_model("deit_base", num_heads=12, embed_dim=64, depth=12, local_up_to_layer=0)
# CPU-sized pair for tiny images (8x8 digits with patch 2, 32x32 CIFAR with patch 4): same except locality.
_MICRO = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, num_heads=4, embed_dim=16, depth=6)
register_model("convit_micro", local_up_to_layer=5, locality_strength=1.0, **_MICRO)
register_model("deit_micro", local_up_to_layer=0, **_MICRO)
