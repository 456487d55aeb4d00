"""`create_model(name, **overrides)`: any named size (models/sizes.py) with any knob changed;
`build_model(cfg)`: the model a composed config's `model` group describes."""
from omegaconf import OmegaConf

from convitlab.models.convit import ConViT
from convitlab.models.sizes import model_defaults


def create_model(name: str, **overrides) -> ConViT:
    return ConViT(**{**model_defaults(name), **overrides})


def build_model(cfg):
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    kwargs.pop("name")
    kwargs.pop("pretrained", None)  # a file to load, not a knob of the model (engine/finetune.py)
    return create_model(cfg.model.name, **kwargs)
