"""Convert a reference checkpoint to .pdparams once:
`python src/convert.py model=<name> source=<in.safetensors|in.pth> target=<out.pdparams> [data.num_classes=N]`.

The model is the named size at its published image (conf/convert.yaml); data.* and model.* change it.
"""
import os

from convitlab.ops import runtime

runtime.setup()  # first: Paddle must load after it (threads, MKL's code path, Paddle's flags)

import hydra  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from convitlab.config import register_configs  # noqa: E402
from convitlab.core.errors import UserError, exit_in_one_line  # noqa: E402
from convitlab.models import list_models  # noqa: E402
from convitlab.models.registry import build_model  # noqa: E402
from convitlab.models.weights import FORMATS, load_pretrained, save_pdparams  # noqa: E402

register_configs()
REQUIRED = {"model": f"model=<name> is required: one of {', '.join(list_models())}",
            "source": f"source=<file> is required: the checkpoint to convert ({', '.join(FORMATS)})",
            "target": "target=<file> is required: the .pdparams to write"}


def convert(cfg) -> None:
    for key, message in REQUIRED.items():
        if OmegaConf.is_missing(cfg, key):
            raise UserError(message)
    if not cfg.target.endswith(".pdparams"):
        raise UserError(f"target={cfg.target!r} is not allowed: a path ending in .pdparams")
    if os.path.lexists(cfg.target) and not os.path.isfile(cfg.target):
        raise UserError(f"target={cfg.target!r} is not allowed: it is a folder (or not a regular file); "
                        "give the path of the .pdparams file to write")
    model = build_model(cfg)
    load_pretrained(model, cfg.source)
    try:
        save_pdparams(model, cfg.target)  # atomic: nothing is left at the target, or beside it, when it fails
    except OSError as exc:
        raise UserError(f"cannot write target={cfg.target!r} ({exc.strerror or exc}): give a target on a file "
                        "system you can write to") from None


@hydra.main(version_base="1.3", config_path="../conf", config_name="convert")
def main(cfg):
    try:
        convert(cfg)
    except Exception as exc:  # noqa: BLE001  (every failure is reported in one line)
        exit_in_one_line(exc)
    print(f"wrote {cfg.target}")


if __name__ == "__main__":
    main()
