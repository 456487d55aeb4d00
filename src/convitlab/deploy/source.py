"""What an export takes: the model, data and weights of a training run (run=), or a named size and
a checkpoint (model=, ckpt=), with the class names the data has."""
import logging
from dataclasses import dataclass
from typing import Optional

from omegaconf import OmegaConf

from convitlab.core.errors import UserError
from convitlab.core.layout import RunFolder
from convitlab.data.datasets import load_splits
from convitlab.engine.checkpoint import BEST

log = logging.getLogger(__name__)
FOLLOW_DATA = ("img_size", "patch_size", "in_chans", "num_classes")  # the model's image keys, ${data.*} by default


@dataclass
class Source:
    cfg: object                # the composed config: model, data, ckpt
    run: Optional[str]         # the training run's folder, when exported from one


def resolve(cfg, overrides=()) -> Source:
    """cfg with, for run=<dir>, that run's model and data (its config.yaml; model.* and data.* keys
    on the command line win) and, unless ckpt= is given, its best weights."""
    if cfg.run:
        folder = RunFolder(cfg.run)
        if not folder.config.is_file():
            raise UserError(f"run={cfg.run!r} is not a training run's folder: it holds no {folder.config.name} "
                            "(give the folder train.py printed as its run directory)")
        saved = OmegaConf.load(folder.config)
        given = [o.lstrip("+") for o in overrides if o.lstrip("+").startswith(("model.", "data."))]
        model = OmegaConf.to_container(saved.model)
        for key in FOLLOW_DATA:  # config.yaml is resolved: what followed the data follows it again
            if model[key] == saved.data[key] and not any(o.startswith(f"model.{key}=") for o in given):
                model[key] = f"${{data.{key}}}"
        cfg = OmegaConf.merge(cfg, {"model": model, "data": saved.data}, OmegaConf.from_dotlist(given))
        if not cfg.ckpt:
            best = folder.checkpoints / BEST
            if not best.is_file():
                raise UserError(f"run={cfg.run!r} has no checkpoint {best.relative_to(folder.path)} (trained with "
                                "trainer.save_best=false, or stopped before its first evaluation): give ckpt=<file>")
            cfg.ckpt = str(best)
    if not cfg.ckpt:
        raise UserError("ckpt=<file> is required: the weights to export (or run=<a training run's folder> for "
                        "its best weights)")
    return Source(cfg, cfg.run)


def class_names(data_cfg) -> Optional[list]:
    """The data's class names (its validation split's), or None when the data is not here to read."""
    try:
        _, _, names = load_splits(data_cfg, with_train=False)
    except UserError as exc:
        log.warning("export.json gets no class names: %s", exc)
        return None
    if len(names) != data_cfg.num_classes:
        log.warning("export.json gets no class names: the data has %d classes, the model %d",
                    len(names), data_cfg.num_classes)
        return None
    return [str(name) for name in names]
