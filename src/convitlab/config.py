"""The config schema: one dataclass per config group, registered in Hydra's ConfigStore.

Hydra checks types, unknown keys and the closed choices (enums) while composing. Each range
rule sits beside its field (`ranged`); `validate` applies them all, then the checks that span
fields or groups, so a bad value fails before any work with one line naming the key, the
value and what is allowed.
"""
import difflib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from convitlab.core.errors import UserError, check
from convitlab.core.layout import RunFolder, job_folder_name
from convitlab.core.processes import process_started_at
from convitlab.data.transforms import image_size_pair
from convitlab.models.sizes import list_models, model_defaults, size_knobs


class Choice(str, Enum):
    """A closed choice: Hydra refuses any other value while composing; it prints and compares as its value."""

    def __str__(self):
        return self.value

    __format__ = str.__format__
    __repr__ = str.__repr__  # errors quote it as the string the user typed: trainer.amp='fp16'


def _choice(name, *values):
    return Choice(name, [(v, v) for v in values])


DatasetName = _choice("DatasetName", "digits", "cifar10", "cifar100", "imagefolder")
SubsetRule = _choice("SubsetRule", "random", "first")  # first: the reference's first files in sorted order
OptimizerName = _choice("OptimizerName", "adamw", "adam", "sgd")
ScheduleName = _choice("ScheduleName", "cosine", "constant")
Device = _choice("Device", "auto", "cpu", "gpu")
ExportFormat = _choice("ExportFormat", "paddle", "onnx")  # export.py: Paddle Inference, or ONNX through paddle2onnx
Precision = _choice("Precision", "off", "fp16", "bf16")  # mixed precision on a GPU
ChannelAdapt = _choice("ChannelAdapt", "sum", "mean")


@dataclass(frozen=True)
class Rule:
    """What a value must be: `test` says whether it is, `allowed` says it in words."""
    test: Callable[[Any], bool]
    allowed: str

    def or_null(self):
        return Rule(lambda v: v is None or self.test(v), f"{self.allowed} or null")


def at_least(low, kind="a number"):
    return Rule(lambda v: v >= low, f"{kind} >= {low}")


def above(low):
    return Rule(lambda v: v > low, f"a number > {low}")


def unit_interval(low_open=False, high_open=False):
    """A number in [0, 1], either end open."""
    return Rule(lambda v: (0 < v if low_open else 0 <= v) and (v < 1 if high_open else v <= 1),
                f"a number in {'(' if low_open else '['}0, 1{')' if high_open else ']'}")


POSITIVE_INT = at_least(1, "an int")
# Every consumer takes it: NumPy's and Paddle's generators, scikit-learn's random_state (< 2**32).
SEED = Rule(lambda v: 0 <= v < 2**32, "an int in 0..4294967295")


def ranged(default, rule: Rule, note: str = ""):
    """A field with its range rule beside it (applied by `validate`); `note` is added to the rule's words."""
    if note:
        rule = Rule(rule.test, f"{rule.allowed} ({note})")
    return field(default=default, metadata={"rule": rule})


@dataclass
class ModelConfig:
    """A named size's knobs: the `model` group is generated from models/sizes.py (register_configs)."""
    name: str = MISSING                # a name from convitlab.models.list_models()
    img_size: Any = "${data.img_size}"  # int or [H, W]
    patch_size: int = ranged("${data.patch_size}", POSITIVE_INT)  # type: ignore[arg-type]
    in_chans: int = ranged("${data.in_chans}", POSITIVE_INT)  # type: ignore[arg-type]
    num_classes: int = ranged("${data.num_classes}", POSITIVE_INT)  # type: ignore[arg-type]
    embed_dim: int = ranged(MISSING, POSITIVE_INT)  # per head, as in the reference
    num_heads: int = ranged(MISSING, POSITIVE_INT)
    depth: int = ranged(MISSING, POSITIVE_INT)
    mlp_ratio: float = ranged(MISSING, above(0))
    local_up_to_layer: int = MISSING   # number of leading GPSA blocks; 0 = DeiT-style ViT
    locality_strength: float = ranged(MISSING, at_least(0))
    use_local_init: bool = MISSING
    train_gating: bool = MISSING
    train_gpsa: bool = MISSING
    use_pos_embed: bool = MISSING
    drop_rate: float = ranged(MISSING, unit_interval(high_open=True))
    attn_drop_rate: float = ranged(MISSING, unit_interval(high_open=True))
    drop_path_rate: float = ranged(MISSING, unit_interval(high_open=True))
    pretrained: Optional[str] = ranged(None, Rule(lambda v: v is None or v.strip() != "",
                                                  "a .safetensors, .pth or .pdparams file, or null"))


@dataclass
class AugmentConfig:
    random_crop: bool = False          # pad then crop back to img_size
    crop_padding: int = ranged(1, at_least(0, "an int"))
    random_resized_crop: bool = False  # ImageNet-style scale/aspect jitter
    hflip: bool = False
    randaugment: bool = False
    randaugment_ops: int = ranged(2, at_least(0, "an int"))
    randaugment_magnitude: int = 9
    randaugment_magnitude_std: float = 0.5
    random_erasing: float = ranged(0.0, unit_interval(), "probability per image")
    mixup: float = ranged(0.0, at_least(0), "Beta(alpha, alpha); 0 = off")
    cutmix: float = ranged(0.0, at_least(0), "Beta(alpha, alpha); 0 = off")
    mix_prob: float = ranged(1.0, unit_interval())          # probability a batch is mixed at all
    mix_switch_prob: float = ranged(0.5, unit_interval())   # with both on: probability of cutmix over mixup


@dataclass
class DataConfig:
    name: DatasetName = MISSING
    root: Optional[str] = None         # where the files are (cifar, imagefolder)
    download: bool = False             # cifar: let Paddle download when online
    checksum: bool = True              # cifar: check the archive's MD5 against the official one
    img_size: Any = MISSING            # int or [H, W] fed to the model
    patch_size: int = ranged(MISSING, POSITIVE_INT)  # the patch the model uses at this resolution
    in_chans: int = ranged(3, Rule(lambda v: v in (1, 3), "1 or 3"))
    num_classes: int = ranged(MISSING, POSITIVE_INT)
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    fraction: float = ranged(1.0, unit_interval(low_open=True))  # per-class fraction of the training split kept
    subset: SubsetRule = SubsetRule.random
    subset_seed: Optional[int] = ranged(None, SEED.or_null())  # None: the run's seed
    val_split: float = ranged(0.2, unit_interval(low_open=True, high_open=True))  # digits: share held out
    split_seed: int = ranged(0, SEED)  # digits only: the fixed train/validation split
    batch_size: int = ranged(64, POSITIVE_INT)
    eval_batch_size: Optional[int] = ranged(None, POSITIVE_INT.or_null())  # None: batch_size
    drop_last: bool = True
    num_workers: int = ranged(0, at_least(0, "an int"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = ranged(1e-3, at_least(0), "0 trains nothing: a check of model.pretrained")
    scale_lr: bool = False             # lr × global batch / 512, as the reference
    weight_decay: float = ranged(0.05, at_least(0))
    no_decay_on_1d: bool = True        # the reference groups: no decay on biases, norms, pos_embed, cls_token, gating
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9              # sgd only
    nesterov: bool = False             # sgd only


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.cosine
    epochs: int = ranged(30, POSITIVE_INT)
    scale_epochs: bool = True          # lengths count full-data epochs: × 1/fraction passes (engine/protocol.py)
    warmup_epochs: float = ranged(0.0, at_least(0))
    warmup_lr: float = ranged(1e-6, at_least(0))
    min_lr: float = ranged(1e-5, at_least(0))


@dataclass
class FinetuneConfig:
    """How a run started from model.pretrained trains (convitlab/engine/finetune.py)."""
    freeze_patch_embed: bool = False   # the patch convolution keeps the file's filters
    freeze_blocks: int = 0             # the first k blocks keep the file's weights (checked against model.depth)
    backbone_lr_scale: float = ranged(1.0, at_least(0), "1: the head's learning rate; 0: only the head trains")
    channel_adapt: ChannelAdapt = ChannelAdapt.sum  # 3-channel filters onto 1-channel data
    checkpoints: Dict[str, str] = field(default_factory=dict)  # model name -> file (experiment=finetune)


@dataclass
class TrainerConfig:
    device: Device = Device.auto
    amp: Precision = Precision.off
    label_smoothing: float = ranged(0.1, unit_interval(high_open=True))
    grad_clip: Optional[float] = ranged(None, above(0).or_null())  # max global gradient norm
    ema: bool = False
    ema_decay: float = ranged(0.999, unit_interval(high_open=True))
    # auto (or true): continue an unfinished run, report a finished one; false: start afresh
    resume: Any = ranged("auto", Rule(lambda v: v in ("auto", False, True), "auto, true or false"))
    keep_checkpoints: int = ranged(2, POSITIVE_INT)  # generations kept, so a torn one has a fallback
    save_best: bool = True
    # epochs between evaluations and checkpoints (None: 1), scaled as schedule.epochs
    eval_every: Optional[int] = ranged(None, POSITIVE_INT.or_null())
    measure_locality: bool = True
    locality_batch_size: int = ranged(64, POSITIVE_INT)  # images used to measure nonlocality each epoch
    progress_bar: bool = True
    max_steps_per_epoch: Optional[int] = ranged(None, POSITIVE_INT.or_null(), "no limit")  # debugging
    to_static: bool = False            # paddle.jit.to_static the model


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    schedule: ScheduleConfig = MISSING
    trainer: TrainerConfig = MISSING
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    seed: int = ranged(0, SEED)
    tags: List[str] = field(default_factory=list)
    study: str = "default"             # names the sweep directory; presets set it
    ablation: Optional[str] = None     # set by conf/ablation/*: the row of the paper's Table 3


@dataclass
class EvalConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    trainer: TrainerConfig = MISSING
    ckpt: Optional[str] = None         # .safetensors, .pth or .pdparams (run=: the run's best weights)
    run: Optional[str] = None          # a training run's folder: its model and data (src/eval.py)
    seed: int = ranged(0, SEED)


@dataclass
class ImageConfig:
    """convert.py's `data`: the image the model sees (conf/convert.yaml: the size's published one)."""
    img_size: Any = MISSING
    patch_size: int = MISSING
    in_chans: int = MISSING
    num_classes: int = MISSING


@dataclass
class ConvertConfig:
    model: ModelConfig = MISSING
    data: ImageConfig = field(default_factory=ImageConfig)
    source: str = MISSING              # timm's .safetensors, the authors' .pth or a .pdparams
    target: str = MISSING              # the .pdparams to write


@dataclass
class TrainedWeights:
    """A model with its weights: a training run's (run=) or a checkpoint of a named size (model=, ckpt=)."""
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    ckpt: Optional[str] = None         # .safetensors, .pth or .pdparams (run=: the run's best weights)
    run: Optional[str] = None          # a training run's folder: its model, data and best weights


@dataclass
class ExportConfig(TrainedWeights):
    """export.py: a run's best weights (run=) or a checkpoint of a named size (model=, ckpt=) to Paddle
    Inference, or to ONNX (format=onnx: the onnx extra)."""
    out: str = MISSING                 # the folder to write (created; an earlier export there is replaced)
    format: ExportFormat = ExportFormat.paddle  # paddle: inference.json + .pdiparams; onnx: model.onnx (any batch)


@dataclass
class PredictConfig:
    """predict.py: an exported model (export.py's folder) on image files, through paddle.inference."""
    model_dir: str = MISSING           # the folder export.py wrote
    images: str = MISSING              # an image file, or a folder (searched recursively)
    out: str = "predictions.csv"
    topk: int = ranged(5, POSITIVE_INT, "at most the model's classes")
    batch_size: int = ranged(32, POSITIVE_INT)
    device: Device = Device.auto


@dataclass
class MapsConfig(TrainedWeights):
    """maps.py: attention maps of chosen images, from a run's best weights (run=) or a checkpoint of a named size."""
    images: str = MISSING              # an image file, a folder of them, or val:<indices> of the data's validation split
    out: str = MISSING                 # the folder for the PNGs, one per image (created)
    query: Any = "centre"              # the query patch: centre, a patch index (row-major) or [row, col]


# Keys that do not change what a run computes: they stay out of the hash, so a run started
# again with another value resumes, and out of a sweep job's folder name (conf/hydra/default.yaml).
NEUTRAL_KEYS = ("trainer.resume", "trainer.progress_bar", "trainer.device", "trainer.keep_checkpoints",
                "trainer.save_best", "data.num_workers", "data.eval_batch_size", "data.root", "data.download",
                "data.checksum", "tags", "study")
# What varies between the repeats of one setup: left out of setup_hash.
SEED_KEYS = ("seed", "data.subset_seed")


def _hash(cfg, leave_out) -> str:
    container = OmegaConf.to_container(cfg, resolve=True)
    for dotted in leave_out:
        *parents, leaf = dotted.split(".")
        node = container
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    blob = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_hash(cfg) -> str:
    """Identifies what a run computes: equal hashes, equal runs."""
    return _hash(cfg, NEUTRAL_KEYS)


def setup_hash(cfg) -> str:
    """The config hash less the seeds: runs that repeat one setup share it (comparison tables
    average over them and nothing else)."""
    return _hash(cfg, NEUTRAL_KEYS + SEED_KEYS)


def sweep_exclude_keys() -> list:
    """Overrides left out of a sweep job's folder name: the neutral keys and the preset choice
    (a preset names its own sweep folder)."""
    return [*NEUTRAL_KEYS, "experiment"]


def _schema_keys(schema, prefix=""):
    """Every dotted key of a schema dataclass, nested ones included."""
    keys = []
    for f in fields(schema):
        keys.append(f"{prefix}{f.name}")
        if is_dataclass(f.type):
            keys += _schema_keys(f.type, f"{prefix}{f.name}.")
    return keys


def unknown_key(dotted: str, parent_type) -> UserError:
    """`dotted` is not a key of its parent (a schema dataclass): name the nearest keys."""
    parent, _, leaf = dotted.rpartition(".")
    known = [f.name for f in fields(parent_type)]
    near = [f"{parent}.{k}" if parent else k for k in difflib.get_close_matches(leaf, known, n=2, cutoff=0.6)]
    if not near:  # a key of another group (trainer.epoch: schedule.epochs)
        by_leaf = {}
        for key in _schema_keys(TrainConfig):
            by_leaf.setdefault(key.rpartition(".")[2], []).append(key)
        near = [key for name in difflib.get_close_matches(leaf, by_leaf, n=2, cutoff=0.75) for key in by_leaf[name]]
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    where = f"the keys of {parent} are" if parent else "the top-level keys are"
    return UserError(f"{dotted} is not a config key: {hint}{where} {', '.join(known)}")


def check_known_keys(cfg, prefix="") -> None:
    """Refuse keys the schema does not have: `+trainer.epoch=3` composes, and would be ignored."""
    schema = OmegaConf.get_type(cfg)
    if not is_dataclass(schema):
        return
    names = {f.name for f in fields(schema)}
    for key, value in cfg.items_ex(resolve=False):
        if key not in names:
            raise unknown_key(f"{prefix}{key}", schema)
        if isinstance(value, DictConfig):
            check_known_keys(value, f"{prefix}{key}.")


# The model's image keys: ${data.*} in the composed config, resolved in a run's config.yaml.
FOLLOW_DATA = ("img_size", "patch_size", "in_chans", "num_classes")


def with_training_run(cfg, overrides=()):
    """cfg with the model and data of the training run in cfg.run (its resolved config.yaml; the
    command line's model.* and data.* keys on top, e.g. data.root) and, when ckpt is not given,
    that run's best weights. What followed the data in training follows it again, so data.img_size
    on the command line resizes the model too."""
    folder = RunFolder(cfg.run)
    if not folder.config.is_file():
        raise UserError(f"run={cfg.run!r} is not a training run's folder: it holds no {folder.config.name} "
                        "(give the folder train.py printed as its run directory)")
    saved = OmegaConf.load(folder.config)
    given = [o.lstrip("+") for o in overrides if o.lstrip("+").startswith(("model.", "data."))]
    model = OmegaConf.to_container(saved.model)
    for key in FOLLOW_DATA:
        if key in model and key in saved.data and model[key] == saved.data[key] \
                and not any(o.startswith(f"model.{key}=") for o in given):
            model[key] = f"${{data.{key}}}"
    cfg = OmegaConf.merge(cfg, {"model": model, "data": saved.data}, OmegaConf.from_dotlist(given))
    if not cfg.ckpt:
        if not folder.best.is_file():
            raise UserError(f"run={cfg.run!r} has no {folder.best.relative_to(folder.path)} (trained with "
                            "trainer.save_best=false, or stopped before its first evaluation): give ckpt=<file>")
        cfg.ckpt = str(folder.best)
    return cfg


def run_stamp() -> str:
    """A timestamp for the run directory that every rank of one distributed launch shares.

    Ranks started by `paddle.distributed.launch` on one node are children of the same
    launcher process, so its start time names the run; CONVITLAB_RUN_STAMP overrides it
    (set it, or hydra.run.dir, for runs across several nodes).
    """
    if os.environ.get("CONVITLAB_RUN_STAMP"):
        return os.environ["CONVITLAB_RUN_STAMP"]
    started = None
    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1:
        started = process_started_at(os.getppid())
    if started is None:
        started = time.time()
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started))


def rank_suffix() -> str:
    """'' for rank 0 of a distributed launch, '.rank<r>' for the others: one log file per rank."""
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    return f".rank{rank}" if rank else ""


def register_configs() -> None:
    resolvers = {"run_stamp": run_stamp, "sweep_exclude_keys": sweep_exclude_keys, "rank_suffix": rank_suffix,
                 "job_folder": job_folder_name,
                 # ${published:<model name>,<knob>}: the size's own value
                 "published": lambda name, knob: model_defaults(name)[knob]}
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver, use_cache=name == "run_stamp")  # one stamp per process
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="convert_schema", node=ConvertConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="maps_schema", node=MapsConfig)
    for name in list_models():  # `model=<name>`: one option per named size
        cs.store(group="model", name=name, node=ModelConfig(name=name, **size_knobs(name)))


def check_ranges(node, schema, prefix: str = "", groups: bool = True) -> None:
    """Apply the range rule beside each field of `schema` to `node`; nested groups too unless `groups` is false."""
    for f in fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if is_dataclass(f.type):
            if groups:
                check_ranges(node[f.name], f.type, key)
        elif "rule" in f.metadata:
            rule = f.metadata["rule"]
            check(rule.test(node[f.name]), key, node[f.name], rule.allowed)


GROUPS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig, "schedule": ScheduleConfig,
          "trainer": TrainerConfig, "finetune": FinetuneConfig}


def validate(cfg) -> None:
    """Check the values of a composed train or eval config; raise UserError on the first bad one.

    The data's checks come first: the model's image knobs follow the data's by default.
    """
    check_known_keys(cfg)  # a `+key=` Hydra let through
    for group in ("data", *(g for g in GROUPS if g != "data")):
        if group in cfg:
            check_ranges(cfg[group], GROUPS[group], group)
    if is_dataclass(OmegaConf.get_type(cfg)):  # the top-level keys (seed)
        check_ranges(cfg, OmegaConf.get_type(cfg), groups=False)
    m, d = cfg.model, cfg.data
    check(m.name in list_models(), "model.name", m.name, f"one of {', '.join(list_models())}")
    # within a group
    data_size = image_size_pair(d.img_size, "data.img_size")
    check(len(d.mean) == d.in_chans and len(d.std) == d.in_chans, "data.mean", list(d.mean),
          f"one value per channel (data.in_chans={d.in_chans})")
    check(d.name != "imagefolder" or d.root, "data.root", d.root, "the folder holding train/ and val/")
    check(0 <= m.local_up_to_layer <= m.depth, "model.local_up_to_layer", m.local_up_to_layer,
          f"0..model.depth={m.depth}")
    # across groups: the model sees the data's images (both follow the data through ${data.*}
    # unless overridden; another size or channel count would fail deep in forward)
    for key, size in (("data.img_size", d.img_size), ("model.img_size", m.img_size)):
        h, w = image_size_pair(size, key)
        check(h % m.patch_size == 0 and w % m.patch_size == 0, key, size,
              f"sides divisible by model.patch_size={m.patch_size}")
    check(image_size_pair(m.img_size, "model.img_size") == data_size, "model.img_size", m.img_size,
          f"the data's size (data.img_size={d.img_size}): set data.img_size instead")
    check(m.in_chans == d.in_chans, "model.in_chans", m.in_chans,
          f"the data's channels (data.in_chans={d.in_chans}): set data.in_chans instead")
    check(m.num_classes == d.num_classes, "model.num_classes", m.num_classes,
          f"the data's classes (data.num_classes={d.num_classes}): set data.num_classes instead")
    if "optimizer" in cfg:
        betas = cfg.optimizer.betas
        check(len(betas) == 2 and all(0 <= b < 1 for b in betas), "optimizer.betas", list(betas),
              "two numbers in [0, 1)")
    if "finetune" in cfg:
        f = cfg.finetune
        check(0 <= f.freeze_blocks <= m.depth, "finetune.freeze_blocks", f.freeze_blocks, f"0..model.depth={m.depth}")
