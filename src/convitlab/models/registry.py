"""`create_model(name, **overrides)`: any named size (models/sizes.py) with any knob changed."""
from convitlab.models.convit import ConViT
from convitlab.models.sizes import model_defaults


def create_model(name: str, **overrides) -> ConViT:
    return ConViT(**{**model_defaults(name), **overrides})
