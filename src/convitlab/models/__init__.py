"""The ConViT family: attention kinds, block, backbone and the registry of named sizes."""
from convitlab.models.attention import GPSA, MHSA
from convitlab.models.convit import Block, ConViT
from convitlab.models.registry import create_model, list_models, model_defaults, register_model

__all__ = ["GPSA", "MHSA", "Block", "ConViT", "create_model", "list_models", "model_defaults",
           "register_model"]
