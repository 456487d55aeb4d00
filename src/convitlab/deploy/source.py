"""What an export takes: the model, data and weights of a training run (run=), or a named size and
a checkpoint (model=, ckpt=), with the class names the data has."""
import logging
from dataclasses import dataclass
from typing import Optional

from convitlab.config import with_training_run
from convitlab.core.errors import UserError
from convitlab.data.datasets import load_splits

log = logging.getLogger(__name__)


@dataclass
class Source:
    cfg: object                # the composed config: model, data, ckpt
    run: Optional[str]         # the training run's folder, when exported from one


def resolve(cfg, overrides=()) -> Source:
    """cfg with, for run=<dir>, that run's model, data and (unless ckpt= is given) best weights."""
    if cfg.run:
        cfg = with_training_run(cfg, overrides)
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
