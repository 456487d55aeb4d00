"""The config schema: one dataclass per config group, registered in Hydra's ConfigStore.

Hydra checks types and unknown keys while composing; `validate` then checks values, so a
bad value fails before any work with one line naming the key, the value and what is allowed.
"""
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from convitlab.errors import check, bad_value
from convitlab.models.sizes import list_models, model_defaults, size_knobs
from convitlab.run_record import sweep_exclude_keys


@dataclass
class ModelConfig:
    """A named size's knobs: the `model` group is generated from models/sizes.py (register_configs)."""
    name: str = MISSING                # a name from convitlab.models.list_models()
    img_size: Any = "${data.img_size}"  # int or [H, W]
    patch_size: int = "${data.patch_size}"  # type: ignore[assignment]
    in_chans: int = "${data.in_chans}"  # type: ignore[assignment]
    num_classes: int = "${data.num_classes}"  # type: ignore[assignment]
    embed_dim: int = MISSING           # per head, as in the reference
    num_heads: int = MISSING
    depth: int = MISSING
    mlp_ratio: float = MISSING
    local_up_to_layer: int = MISSING   # number of leading GPSA blocks; 0 = DeiT-style ViT
    locality_strength: float = MISSING
    use_local_init: bool = MISSING
    train_gating: bool = MISSING
    train_gpsa: bool = MISSING
    use_pos_embed: bool = MISSING
    drop_rate: float = MISSING
    attn_drop_rate: float = MISSING
    drop_path_rate: float = MISSING
    pretrained: Optional[str] = None   # train.py: start from these weights (convitlab/finetune.py)


@dataclass
class AugmentConfig:
    random_crop: bool = False          # pad then crop back to img_size
    crop_padding: int = 1
    random_resized_crop: bool = False  # ImageNet-style scale/aspect jitter
    hflip: bool = False
    randaugment: bool = False
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    randaugment_magnitude_std: float = 0.5
    random_erasing: float = 0.0        # probability per image
    mixup: float = 0.0                 # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0                # Beta(alpha, alpha); 0 = off
    mix_prob: float = 1.0              # probability a batch is mixed at all
    mix_switch_prob: float = 0.5       # with both on: probability of cutmix over mixup


@dataclass
class DataConfig:
    name: str = MISSING                # digits | cifar10 | cifar100 | imagefolder
    root: Optional[str] = None         # where the files are (cifar, imagefolder)
    download: bool = False             # cifar: let Paddle download when online
    checksum: bool = True              # cifar: check the archive's MD5 against the official one
    img_size: Any = MISSING            # int or [H, W] fed to the model
    patch_size: int = MISSING          # the patch the model uses at this resolution
    in_chans: int = 3
    num_classes: int = MISSING
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    fraction: float = 1.0              # per-class fraction of the training split kept
    subset: str = "random"             # random | first (the reference: first files in sorted order)
    subset_seed: Optional[int] = None  # None: the run's seed
    val_split: float = 0.2             # digits only: share held out for validation
    split_seed: int = 0                # digits only: the fixed train/validation split
    batch_size: int = 64
    eval_batch_size: Optional[int] = None  # None: batch_size
    drop_last: bool = True
    num_workers: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimizerConfig:
    name: str = "adamw"                # adamw | adam | sgd
    lr: float = 1e-3
    scale_lr: bool = False             # lr × global batch / 512, as the reference
    weight_decay: float = 0.05
    no_decay_on_1d: bool = True        # the reference groups: no decay on biases, norms, pos_embed, cls_token, gating
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9              # sgd only
    nesterov: bool = False             # sgd only


@dataclass
class ScheduleConfig:
    name: str = "cosine"               # cosine | constant
    epochs: int = 30
    scale_epochs: bool = True          # lengths count full-data epochs: × 1/fraction passes (engine/protocol.py)
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5


@dataclass
class FinetuneConfig:
    """How a run started from model.pretrained trains (convitlab/finetune.py)."""
    freeze_patch_embed: bool = False   # the patch convolution keeps the file's filters
    freeze_blocks: int = 0             # the first k blocks keep the file's weights
    backbone_lr_scale: float = 1.0     # everything but the head trains at optimizer.lr x this
    channel_adapt: str = "sum"         # 3-channel filters onto 1-channel data: sum | mean
    checkpoints: Dict[str, str] = field(default_factory=dict)  # model name -> file (experiment=finetune)


@dataclass
class TrainerConfig:
    device: str = "auto"               # auto | cpu | gpu
    amp: str = "off"                   # off | fp16 | bf16 (GPU)
    label_smoothing: float = 0.1
    grad_clip: Optional[float] = None  # max global gradient norm
    ema: bool = False
    ema_decay: float = 0.999
    resume: Any = "auto"               # auto: continue an unfinished run, report a finished one; false: start afresh
    keep_checkpoints: int = 2          # checkpoint generations kept, so a torn one has a fallback
    save_best: bool = True
    eval_every: Optional[int] = None   # epochs between evaluations and checkpoints (None: 1), scaled as schedule.epochs
    measure_locality: bool = True
    locality_batch_size: int = 64      # images used to measure nonlocality each epoch
    progress_bar: bool = True
    max_steps_per_epoch: Optional[int] = None  # cut epochs short (debugging)
    to_static: bool = False            # paddle.jit.to_static the model


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    schedule: ScheduleConfig = MISSING
    trainer: TrainerConfig = MISSING
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    seed: int = 0
    tags: List[str] = field(default_factory=list)
    study: str = "default"             # names the sweep directory; presets set it
    ablation: Optional[str] = None     # set by conf/ablation/*: the row of the paper's Table 3


@dataclass
class EvalConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    trainer: TrainerConfig = MISSING
    ckpt: str = MISSING                # .safetensors, .pth or .pdparams
    seed: int = 0


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


def run_stamp() -> str:
    """A timestamp for the run directory that every rank of one distributed launch shares.

    Ranks started by `paddle.distributed.launch` on one node are children of the same
    launcher process, so its start time names the run; CONVITLAB_RUN_STAMP overrides it
    (set it, or hydra.run.dir, for runs across several nodes).
    """
    if os.environ.get("CONVITLAB_RUN_STAMP"):
        return os.environ["CONVITLAB_RUN_STAMP"]
    started = time.time()
    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1:
        try:
            with open(f"/proc/{os.getppid()}/stat") as f:
                ticks = int(f.read().rsplit(")", 1)[1].split()[19])
            with open("/proc/stat") as f:
                boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
            started = boot + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started))


def rank_suffix() -> str:
    """'' for rank 0 of a distributed launch, '.rank<r>' for the others: one log file per rank."""
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    return f".rank{rank}" if rank else ""


def register_configs() -> None:
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
    if not OmegaConf.has_resolver("sweep_exclude_keys"):
        OmegaConf.register_new_resolver("sweep_exclude_keys", sweep_exclude_keys)
    if not OmegaConf.has_resolver("rank_suffix"):
        OmegaConf.register_new_resolver("rank_suffix", rank_suffix)
    if not OmegaConf.has_resolver("published"):  # ${published:<model name>,<knob>}: the size's own value
        OmegaConf.register_new_resolver("published", lambda name, knob: model_defaults(name)[knob])
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="convert_schema", node=ConvertConfig)
    for name in list_models():  # `model=<name>`: one option per named size
        cs.store(group="model", name=name, node=ModelConfig(name=name, **size_knobs(name)))


DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")


def image_size_pair(value, key: str = "data.img_size"):
    """An int or [H, W] as an (H, W) tuple of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    else:
        try:
            pair = tuple(int(v) for v in value)
        except TypeError:
            raise bad_value(key, value, "an int or a list [H, W]") from None
    check(len(pair) == 2 and min(pair) > 0, key, value, "a positive int or [H, W]")
    return pair


def validate_data(d) -> None:
    """Check the values of a data config alone (no model); validate and the data builders call it."""
    check(d.name in DATASETS, "data.name", d.name, f"one of {', '.join(DATASETS)}")
    image_size_pair(d.img_size, "data.img_size")
    check(d.in_chans in (1, 3), "data.in_chans", d.in_chans, "1 or 3")
    check(len(d.mean) == d.in_chans and len(d.std) == d.in_chans, "data.mean", list(d.mean),
          f"one value per channel (data.in_chans={d.in_chans})")
    check(0 < d.fraction <= 1, "data.fraction", d.fraction, "a number in (0, 1]")
    check(d.subset in ("random", "first"), "data.subset", d.subset, "random or first")
    check(d.batch_size >= 1, "data.batch_size", d.batch_size, "an int >= 1")
    check(d.eval_batch_size is None or d.eval_batch_size >= 1, "data.eval_batch_size",
          d.eval_batch_size, "an int >= 1 or null")
    check(d.num_workers >= 0, "data.num_workers", d.num_workers, "an int >= 0")
    check(d.name != "imagefolder" or d.root, "data.root", d.root, "the folder holding train/ and val/")
    a = d.augment
    check(a.crop_padding >= 0, "data.augment.crop_padding", a.crop_padding, "an int >= 0")
    check(a.randaugment_ops >= 0, "data.augment.randaugment_ops", a.randaugment_ops, "an int >= 0")
    for key in ("mixup", "cutmix"):
        check(a[key] >= 0, f"data.augment.{key}", a[key], "a number >= 0 (0 = off)")
    for key in ("mix_prob", "mix_switch_prob", "random_erasing"):
        check(0 <= a[key] <= 1, f"data.augment.{key}", a[key], "a number in [0, 1]")


def validate(cfg) -> None:
    """Check the values of a composed train or eval config; raise UserError on the first bad one."""
    m, d = cfg.model, cfg.data
    check(m.name in list_models(), "model.name", m.name, f"one of {', '.join(list_models())}")
    validate_data(d)
    check(m.patch_size >= 1, "model.patch_size", m.patch_size, "an int >= 1")
    for key in ("data.img_size", "model.img_size"):  # the data's first: the model's follows it
        h, w = image_size_pair(cfg[key.split(".")[0]].img_size, key)
        check(h % m.patch_size == 0 and w % m.patch_size == 0, key, cfg[key.split(".")[0]].img_size,
              f"sides divisible by model.patch_size={m.patch_size}")
    for key in ("embed_dim", "num_heads", "depth", "num_classes", "in_chans"):
        check(m[key] >= 1, f"model.{key}", m[key], "an int >= 1")
    # The model sees the data's images: another size or channel count fails deep in forward.
    # (Both default to the data's values through ${data.*}; an explicit override may differ.)
    check(image_size_pair(m.img_size, "model.img_size") == image_size_pair(d.img_size), "model.img_size",
          m.img_size, f"the data's size (data.img_size={d.img_size}): set data.img_size instead")
    check(m.in_chans == d.in_chans, "model.in_chans", m.in_chans,
          f"the data's channels (data.in_chans={d.in_chans}): set data.in_chans instead")
    check(0 <= m.local_up_to_layer <= m.depth, "model.local_up_to_layer", m.local_up_to_layer,
          f"0..model.depth={m.depth}")
    check(m.locality_strength >= 0, "model.locality_strength", m.locality_strength, "a number >= 0")
    for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        check(0 <= m[key] < 1, f"model.{key}", m[key], "a number in [0, 1)")
    t = cfg.trainer
    check(t.device in ("auto", "cpu", "gpu"), "trainer.device", t.device, "auto, cpu or gpu")
    check(t.amp in ("off", "fp16", "bf16"), "trainer.amp", t.amp, "off, fp16 or bf16")
    check(t.resume in ("auto", False, True), "trainer.resume", t.resume, "auto, true or false")
    check(0 <= t.label_smoothing < 1, "trainer.label_smoothing", t.label_smoothing, "a number in [0, 1)")
    check(t.eval_every is None or t.eval_every >= 1, "trainer.eval_every", t.eval_every, "an int >= 1 or null")
    check(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", t.keep_checkpoints, "an int >= 1")
    check(0 <= t.ema_decay < 1, "trainer.ema_decay", t.ema_decay, "a number in [0, 1)")
    check(t.grad_clip is None or t.grad_clip > 0, "trainer.grad_clip", t.grad_clip, "a number > 0 or null")
    check(t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1, "trainer.max_steps_per_epoch",
          t.max_steps_per_epoch, "an int >= 1 or null (no limit)")
    check(t.locality_batch_size >= 1, "trainer.locality_batch_size", t.locality_batch_size, "an int >= 1")
    if "optimizer" in cfg:
        o, s = cfg.optimizer, cfg.schedule
        check(o.name in OPTIMIZERS, "optimizer.name", o.name, f"one of {', '.join(OPTIMIZERS)}")
        check(o.lr >= 0, "optimizer.lr", o.lr, "a number >= 0 (0 trains nothing: a check of model.pretrained)")
        check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "a number >= 0")
        check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas", list(o.betas),
              "two numbers in [0, 1)")
        check(s.name in SCHEDULES, "schedule.name", s.name, f"one of {', '.join(SCHEDULES)}")
        check(s.epochs >= 1, "schedule.epochs", s.epochs, "an int >= 1")
        check(0 <= s.warmup_epochs, "schedule.warmup_epochs", s.warmup_epochs, "a number >= 0")
        check(s.warmup_lr >= 0, "schedule.warmup_lr", s.warmup_lr, "a number >= 0")
        check(s.min_lr >= 0, "schedule.min_lr", s.min_lr, "a number >= 0")
    if "finetune" in cfg:
        from convitlab.finetune import validate_finetune  # here: finetune.py loads Paddle, the schema must not
        validate_finetune(cfg)
