"""Every config option composes through Hydra's compose API and the schema; bad values fail in one line."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from convitlab.config import register_configs, validate
from convitlab.errors import UserError
from convitlab.models import list_models, model_defaults
from convitlab.models.convit import ConViT

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def compose_train(*overrides, name="train"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_registered_model_has_a_config_that_builds_it():
    assert options("model") == list_models()
    for name in list_models():
        cfg = compose_train(f"model={name}")
        validate(cfg)
        arch = {k: v for k, v in cfg.model.items() if k not in ("name", "drop_path_rate", "drop_rate", "attn_drop_rate")}
        defaults = {**{k: p.default for k, p in __import__("inspect").signature(ConViT.__init__).parameters.items()
                       if k != "self"}, **model_defaults(name)}
        for key in ("embed_dim", "num_heads", "depth", "local_up_to_layer", "locality_strength", "mlp_ratio"):
            assert arch[key] == defaults[key], (name, key)


@pytest.mark.parametrize("group", ["data", "optimizer", "schedule", "trainer", "debug", "ablation"])
def test_every_option_of_every_group_composes(group):
    for option in options(group):
        extra = ["data.root=/tmp/nowhere"] if option == "imagefolder" else []
        cfg = compose_train(f"{group}={option}", *extra)
        validate(cfg)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_preset_composes_with_its_sweep(experiment):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.study != "default"
    if experiment != "cifar10_seed":
        assert cfg.hydra.sweeper.params, experiment


def test_default_model_instantiates_from_the_composed_config():
    from convitlab.engine.trainer import build_model
    cfg = compose_train("model.locality_strength=0.1", "model.local_up_to_layer=2")
    model = build_model(cfg)
    assert model.local_up_to_layer == 2 and model.grid_size == (4, 4)
    assert abs(float(model.blocks[0].attn.pos_proj.weight[2, 0]) + 0.1) < 1e-6


def test_schema_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigCompositionException):
        compose_train("model.locality_strenght=0.1")
    with pytest.raises(ConfigCompositionException):
        compose_train("data.batch_size=many")
    with pytest.raises(ConfigCompositionException):
        compose_train("model=convit_huge")


# key=value, and the text the one-line error must contain
BAD_VALUES = [
    ("data.fraction=0", "data.fraction=0.0"),
    ("data.fraction=1.5", "(0, 1]"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("schedule.epochs=0", "schedule.epochs=0"),
    ("model.local_up_to_layer=7", "model.local_up_to_layer=7"),
    ("data.img_size=9", "divisible by model.patch_size=2"),
    ("data.subset=last", "random or first"),
    ("data.name=mnist", "digits, cifar10, cifar100, imagefolder"),
    ("optimizer.name=lamb", "adamw, adam, sgd"),
    ("schedule.name=step", "cosine, constant"),
    ("trainer.device=tpu", "auto, cpu or gpu"),
    ("trainer.amp=fp8", "off, fp16 or bf16"),
    ("model.name=convit_huge", "one of convit_base"),
    ("model.locality_strength=-1", "a number >= 0"),
]


@pytest.mark.parametrize("override,expected", BAD_VALUES)
def test_bad_values_fail_in_one_line_naming_key_and_allowed(override, expected):
    cfg = compose_train(override)
    with pytest.raises(UserError) as info:
        validate(cfg)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert override.split("=")[0] in message


def test_eval_config_composes():
    cfg = compose_train("ckpt=/tmp/x.pdparams", name="eval")
    validate(cfg)
    assert OmegaConf.select(cfg, "optimizer") is None
