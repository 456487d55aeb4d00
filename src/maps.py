"""Attention maps of chosen images: `python src/maps.py run=<run dir> images=<file|folder|val:<indices>>
out=<folder> [query=centre|<patch index>|[row,col]]` (or `model=<name> ckpt=<file>` instead of run=).

Each image is read and preprocessed as evaluation does; <out>/<image>.png shows it as the model sees
it and, per GPSA layer and head, the positional, content and combined attention of the query patch
on one colour scale. Every input is checked, and every image read, before anything is written.
"""
import os
from pathlib import Path

from convitlab.ops import runtime

runtime.setup()  # first: Paddle must load after it (threads, MKL's code path, Paddle's flags)

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import paddle  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from convitlab.analysis.attention_maps import draw_attention_maps, query_patch  # noqa: E402
from convitlab.config import register_configs, validate, with_training_run  # noqa: E402
from convitlab.config_errors import report_composition_errors_in_one_line  # noqa: E402
from convitlab.core.errors import UserError, bad_value, check, exit_in_one_line  # noqa: E402
from convitlab.data import build_eval_dataset  # noqa: E402
from convitlab.data.sources import FileImages  # noqa: E402
from convitlab.data.transforms import build_transforms, image_size_pair  # noqa: E402
from convitlab.deploy.predictions import list_images  # noqa: E402
from convitlab.models.registry import build_model  # noqa: E402
from convitlab.models.weights import load_pretrained  # noqa: E402
from convitlab.ops.runtime import select_device  # noqa: E402

register_configs()
report_composition_errors_in_one_line()

VAL = "val:"
REQUIRED = {"images": "images=<file, folder or val:<indices>> is required: the images to draw the maps of",
            "out": "out=<folder> is required: where to write one PNG per image"}


def val_indices(spec: str, count: int) -> list:
    """The indices of `val:<i>,<j>-<k>,...` (ranges inclusive), each below `count`."""
    allowed = (f"val:<indices> of the {count} validation images: each 0..{count - 1} or a range a-b "
               "(val:0, val:0-3, \"val:0,7,12\")")
    indices = []
    try:
        for part in spec[len(VAL):].split(","):
            low, _, high = part.strip().partition("-")
            indices += range(int(low), int(high or low) + 1)
    except ValueError:
        raise bad_value("images", spec, allowed) from None
    if not indices or not all(0 <= i < count for i in indices):
        raise bad_value("images", spec, allowed)
    return list(dict.fromkeys(indices))  # each once, in the order given


def chosen_images(cfg) -> list:
    """(name, image float32 [C, H, W] as the model takes it, caption) per image of cfg.images."""

    spec = str(cfg.images)
    if spec.startswith(VAL):
        val, _, names = build_eval_dataset(cfg.data)
        chosen = []
        for index in val_indices(spec, len(val)):
            image, label = val[index]
            chosen.append((f"val_{index}", image, f"validation image {index}, class {names[label]}"))
        return chosen
    files, is_folder = list_images(spec)
    _, transform = build_transforms(cfg.data, centre_crop=cfg.data.name == "imagefolder")
    reader = FileImages(files, np.zeros(len(files)), "L" if cfg.data.in_chans == 1 else "RGB")
    root = Path(spec).expanduser()
    chosen = []
    for index, file in enumerate(files):
        relative = file.relative_to(root) if is_folder else Path(file.name)
        chosen.append(("_".join(relative.with_suffix("").parts), transform(reader.load(index)), str(relative)))
    taken = [name for name, _, _ in chosen]
    # a.png and a.jpg in one folder: both keep their suffix in the PNG's name
    return [(f"{name}{Path(caption).suffix}" if taken.count(name) > 1 else name, image, caption)
            for name, image, caption in chosen]


def out_folder(out) -> Path:
    """The folder to write into, checked (not created) before any work."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise bad_value("out", str(out), "a folder for the PNGs (created if missing); it is a file")
    ancestor = next(p for p in [path, *path.parents] if p.exists())
    if not ancestor.is_dir():
        raise UserError(f"cannot write out={str(out)!r} ({ancestor} is a file): give a folder you can write to")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        reason = "Read-only file system" if os.statvfs(ancestor).f_flag & os.ST_RDONLY else "Permission denied"
        raise UserError(f"cannot write out={str(out)!r} ({reason}): give a folder you can write to")
    return path


def draw(cfg, overrides) -> list:
    """Write one PNG per chosen image; their paths."""

    for key, message in REQUIRED.items():
        if OmegaConf.is_missing(cfg, key):
            raise UserError(message)
    if cfg.run:
        cfg = with_training_run(cfg, overrides)
    if not cfg.ckpt:
        raise UserError("run=<a training run's folder> is required (its best weights), or ckpt=<file> with "
                        "model=<name>: the weights whose attention to draw")
    validate(cfg)
    check(cfg.model.local_up_to_layer > 0, "model.local_up_to_layer", 0,
          f"at least 1: the maps are of GPSA heads, and this {cfg.model.name} has none (a DeiT-style model)")
    height, width = image_size_pair(cfg.model.img_size, "model.img_size")
    query = query_patch(cfg.query, (height // cfg.model.patch_size, width // cfg.model.patch_size))
    out = out_folder(cfg.out)
    images = chosen_images(cfg)  # every image read before anything is written
    select_device("cpu")  # a forward pass of one image per figure: the CPU is enough, whichever Paddle build
    model = load_pretrained(build_model(cfg), cfg.ckpt)
    model.eval()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write out={str(cfg.out)!r} ({exc.strerror or exc}): give a folder you can "
                        "write to") from None
    written = []
    for name, image, caption in images:
        with paddle.no_grad():
            probabilities = paddle.nn.functional.softmax(model(paddle.to_tensor(image[None])))[0].numpy()
        predicted = int(probabilities.argmax())
        title = f"{caption}, predicted {predicted} ({probabilities[predicted]:.2f})"
        draw_attention_maps(model, image, out / f"{name}.png", cfg.data.mean, cfg.data.std, query, title)
        written.append(out / f"{name}.png")
    return written


@hydra.main(version_base="1.3", config_path="../conf", config_name="maps")
def main(cfg):
    try:
        written = draw(cfg, list(HydraConfig.get().overrides.task))
    except Exception as exc:  # noqa: BLE001  (every failure is reported in one line)
        exit_in_one_line(exc)
    for path in written:
        print(path)
    print(f"{len(written)} attention map figure(s) in {cfg.out}")


if __name__ == "__main__":
    main()
