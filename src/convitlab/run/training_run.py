"""A finished training run reopened: its model and data as it trained, and its best weights
(eval.py and maps.py take `run=<run dir>`)."""
from omegaconf import OmegaConf

from convitlab.core.errors import UserError
from convitlab.core.layout import RunFolder
from convitlab.engine.checkpoint import BEST


def with_training_run(cfg, overrides):
    """cfg with the model and data of the training run in cfg.run (its resolved config.yaml), the
    command line's model.* and data.* keys on top (e.g. data.root), and ckpt, when not given,
    that run's best weights."""
    folder = RunFolder(cfg.run)
    if not folder.config.is_file():
        raise UserError(f"run={cfg.run!r} is not a training run's folder: it holds no {folder.config.name} "
                        "(give the folder train.py printed as its run directory)")
    saved = OmegaConf.load(folder.config)
    given = [o.lstrip("+") for o in overrides if o.lstrip("+").startswith(("model.", "data."))]
    cfg = OmegaConf.merge(cfg, {"model": saved.model, "data": saved.data}, OmegaConf.from_dotlist(given))
    if not cfg.ckpt:
        best = folder.checkpoints / BEST
        if not best.is_file():
            raise UserError(f"run={cfg.run!r} has no {best.relative_to(folder.path)} (trained with "
                            "trainer.save_best=false, or not evaluated yet): give ckpt=<file>")
        cfg.ckpt = str(best)
    return cfg
