"""Every config option composes through Hydra's compose API and the schema; bad values fail in one line."""
from pathlib import Path

import numpy as np
import paddle
import pytest
from builders import plain, write_fake_cifar
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image

from convitlab.config import register_configs, validate
from convitlab.core.errors import UserError
from convitlab.models import create_model, list_models, model_defaults

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def compose_train(*overrides, name="train"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("name", list_models())
def test_model_option_and_create_model_build_the_same_network(name):
    """`model=<name>` and create_model(<name>) read one table (models/sizes.py): same knobs, same weights."""
    from convitlab.models.registry import build_model

    cfg = compose_train(f"model={name}", "model.depth=2", f"model.local_up_to_layer={min(model_defaults(name)['local_up_to_layer'], 1)}")
    validate(cfg)
    image = {k: cfg.model[k] for k in ("img_size", "patch_size", "in_chans", "num_classes")}
    knobs = {k: v for k, v in cfg.model.items() if k not in ("name", "pretrained", *image)}
    assert knobs == {**{k: v for k, v in model_defaults(name).items() if k not in image},
                     "depth": 2, "local_up_to_layer": cfg.model.local_up_to_layer}
    paddle.seed(3)
    from_config = build_model(cfg)
    paddle.seed(3)
    direct = create_model(name, **image, depth=2, local_up_to_layer=cfg.model.local_up_to_layer)
    a, b = from_config.state_dict(), direct.state_dict()
    assert list(a) == list(b)
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)
    rates = [[blk.drop_path.p for blk in m.blocks] for m in (from_config, direct)]
    assert rates[0] == rates[1] and rates[0][-1] == pytest.approx(model_defaults(name)["drop_path_rate"])


def test_model_group_lists_exactly_the_named_sizes():
    from hydra.core.config_store import ConfigStore

    assert not (CONF / "model").exists()  # the options come from the table, not from YAML copies of it
    assert sorted(n.removesuffix(".yaml") for n in ConfigStore.instance().list("model")) == list_models()


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
    from convitlab.models.registry import build_model
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


# Closed choices are enums in the schema: Hydra refuses another value while composing, listing the allowed ones.
BAD_CHOICES = [("data.subset=last", "[random, first]"), ("data.name=mnist", "[digits, cifar10, cifar100, imagefolder]"),
               ("optimizer.name=lamb", "[adamw, adam, sgd]"), ("schedule.name=step", "[cosine, constant]"),
               ("trainer.device=tpu", "[auto, cpu, gpu]"), ("trainer.amp=fp8", "[off, fp16, bf16]"),
               ("finetune.channel_adapt=max", "[sum, mean]")]


@pytest.mark.parametrize("override,allowed", BAD_CHOICES)
def test_closed_choices_are_refused_while_composing(override, allowed):
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(override)
    assert allowed in str(info.value.__cause__) and override.split("=")[1] in str(info.value.__cause__)


def test_every_range_rule_refuses_a_value_outside_it():
    """Each rule beside a field is applied by validate: a value it refuses fails naming the key."""
    from dataclasses import fields, is_dataclass

    from convitlab.config import GROUPS

    def ruled(schema, prefix):
        for f in fields(schema):
            if is_dataclass(f.type):
                yield from ruled(f.type, f"{prefix}.{f.name}")
            elif "rule" in f.metadata:
                yield f"{prefix}.{f.name}", f.metadata["rule"]

    checked = 0
    for group, schema in GROUPS.items():
        for key, rule in ruled(schema, group):
            bad = next(v for v in (-1, 2, 0, 1.5, 0.5, "auto", None, " ") if not _accepts(rule, v))
            cfg = compose_train()
            OmegaConf.update(cfg, key, bad, force_add=False)
            with pytest.raises(UserError, match=f"^{key}="):
                validate(cfg)
            checked += 1
    assert checked >= 30


def _accepts(rule, value):
    try:
        return rule.test(value)
    except (TypeError, AttributeError):  # a value of another type: Hydra's type check refuses it before the rule runs
        return True


# key=value, and the text the one-line error must contain
BAD_VALUES = [
    ("data.fraction=0", "data.fraction=0.0"),
    ("data.fraction=1.5", "(0, 1]"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("schedule.epochs=0", "schedule.epochs=0"),
    ("model.local_up_to_layer=7", "model.local_up_to_layer=7"),
    ("data.img_size=9", "divisible by model.patch_size=2"),
    ("model.name=convit_huge", "one of convit_base"),
    ("model.locality_strength=-1", "a number >= 0"),
    # the model must take the data's images (both follow the data unless overridden)
    ("model.img_size=16", "data.img_size=8"),
    ("model.img_size=[8,6]", "data.img_size=8"),
    ("model.in_chans=3", "data.in_chans=1"),
    ("model.num_classes=12", "data.num_classes=10"),
    ("data.in_chans=2", "1 or 3"),
    ("trainer.ema_decay=1", "[0, 1)"),
    ("trainer.ema_decay=-0.1", "[0, 1)"),
    ("data.augment.mixup=-0.2", ">= 0"),
    ("data.augment.cutmix=-1", ">= 0"),
    ("data.augment.mix_prob=1.5", "[0, 1]"),
    ("data.augment.mix_switch_prob=-0.5", "[0, 1]"),
    ("data.augment.random_erasing=2", "[0, 1]"),
    ("data.augment.crop_padding=-1", "an int >= 0"),
    ("data.augment.randaugment_ops=-1", "an int >= 0"),
    ("trainer.grad_clip=0", "> 0 or null"),
    ("trainer.grad_clip=-1", "> 0 or null"),
    ("optimizer.betas=[0.9]", "two numbers in [0, 1)"),
    ("optimizer.betas=[0.9,1.0]", "two numbers in [0, 1)"),
    ("optimizer.betas=[-0.1,0.999]", "two numbers in [0, 1)"),
    ("schedule.warmup_lr=-1e-6", "a number >= 0"),
    ("schedule.min_lr=-1e-5", "a number >= 0"),
    ("trainer.max_steps_per_epoch=0", "an int >= 1 or null"),
    ("trainer.locality_batch_size=0", "an int >= 1"),
]


@pytest.mark.parametrize("override,expected", BAD_VALUES)
def test_bad_values_fail_in_one_line_naming_key_and_allowed(override, expected):
    cfg = compose_train(override)
    with pytest.raises(UserError) as info:
        validate(cfg)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert override.split("=")[0] in message


def test_values_at_the_edges_of_the_new_checks_are_accepted():
    validate(compose_train("model.img_size=[8,8]", "model.in_chans=1", "trainer.ema_decay=0", "trainer.grad_clip=1",
                           "trainer.max_steps_per_epoch=1", "trainer.locality_batch_size=1",
                           "optimizer.betas=[0,0.999]", "schedule.warmup_lr=0", "schedule.min_lr=0",
                           "data.augment.mix_prob=0", "data.augment.mix_switch_prob=1",
                           "data.augment.random_erasing=1", "data.augment.crop_padding=0",
                           "data.augment.randaugment_ops=0", "data.augment.mixup=0.8", "data.augment.cutmix=1"))
    # both sizes follow the data through ${data.img_size} / ${data.in_chans}
    validate(compose_train("data.img_size=16", "data.in_chans=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"))


def test_eval_config_composes():
    cfg = compose_train("ckpt=/tmp/x.pdparams", name="eval")
    validate(cfg)
    assert OmegaConf.select(cfg, "optimizer") is None
    with pytest.raises(UserError, match="model.img_size=16"):
        validate(compose_train("ckpt=/tmp/x.pdparams", "model.img_size=16", name="eval"))


def test_eval_dataset_reads_only_the_validation_split(tmp_path, val_only_folder):
    from convitlab.data import build_eval_dataset, build_eval_loader

    root = val_only_folder
    cfg = compose_train("ckpt=x", "data=imagefolder", f"data.root={root}", "data.num_classes=2", "data.img_size=16",
                        "data.patch_size=4", "data.batch_size=64", "data.num_workers=0", name="eval")
    val, num_classes, class_names = build_eval_dataset(cfg.data)
    assert (len(val), num_classes, class_names) == (4, 2, ["cat", "dog"])
    assert val.labels.tolist() == [0, 0, 1, 1] and val[0][0].shape == (3, 16, 16)
    # 4 images and batch_size 64 with drop_last: fine for evaluation (build_loaders would refuse)
    assert [labels.numpy().tolist() for _, labels in build_eval_loader(val, cfg.data)] == [[0, 0, 1, 1]]
    with pytest.raises(UserError, match="val/<class>/"):
        build_eval_dataset(OmegaConf.merge(cfg.data, {"root": str(tmp_path / "nowhere")}))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"{empty / 'val'} is missing"):
        build_eval_dataset(OmegaConf.merge(cfg.data, {"root": str(empty)}))


@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_eval_dataset_is_the_training_runs_validation_split(tmp_path, name):
    from convitlab.data import build_datasets, build_eval_dataset

    if name == "cifar10":
        write_fake_cifar(tmp_path, name)
        cfg = plain(name, tmp_path)
    else:
        cfg = compose_train().data
    data = build_datasets(cfg, seed=0)
    val, num_classes, class_names = build_eval_dataset(cfg)
    assert (num_classes, class_names) == (data.num_classes, data.class_names)
    assert val.labels.tolist() == data.val.labels.tolist()
    for i in (0, len(val) - 1):
        np.testing.assert_array_equal(val[i][0], data.val[i][0])


def test_eval_entry_point_on_a_folder_with_only_val(tmp_path, val_only_folder):
    from helpers import EVAL, read_csv, run

    from convitlab.models import create_model
    from convitlab.models.weights import save_pdparams

    root = val_only_folder
    ckpt = save_pdparams(create_model("convit_micro", img_size=16, patch_size=4, in_chans=3, num_classes=2),
                         tmp_path / "micro.pdparams")
    common = [f"ckpt={ckpt}", "model=convit_micro", "data=imagefolder", f"data.root={root}", "data.img_size=16",
              "data.patch_size=4", "data.num_workers=0", "trainer.device=cpu"]
    proc = run(EVAL + common + ["data.num_classes=2", f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = read_csv(tmp_path / "out" / "result.csv")
    assert row["status"] == "completed" and row["dataset"] == "imagefolder"
    assert 0 <= float(row["top1"]) <= 100 and float(row["top1"]) in (0, 25, 50, 75, 100)  # 4 images
    # data.num_classes disagreeing with the classes in val/ is refused in one line
    (root / "val" / "emu").mkdir()
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(root / "val" / "emu" / "0.png")
    proc = run(EVAL + common + ["data.num_classes=2", f"hydra.run.dir={tmp_path / 'out2'}"], cwd=tmp_path)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "data.num_classes=2" in error and "3 classes" in error
