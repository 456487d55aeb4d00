"""Export a model to Paddle Inference: `paddle.jit.save` of its forward pass on float32
[batch, in_chans, H, W] (any batch), in a folder written whole or not at all, with export.json.
format=onnx converts that same Paddle graph to model.onnx (deploy/onnx_export.py) and keeps only it.

The exported graph is made of Paddle's own ops. convitlab's CPU layers (ops/cpu_layers.py) are
subclasses of Paddle's that change only how forward and backward run on the CPU, for training
speed; their static-shape arithmetic (a Linear's addmm on rows) does not trace with a dynamic
batch, so each is exported as its Paddle base class, same weights. The compiled CPU kernels
must be off in the process (CONVITLAB_CPU_KERNELS=0, src/export.py sets it): to_static with
them on is known to fail.
"""
import contextlib
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import paddle
from omegaconf import OmegaConf

from convitlab.config import validate
from convitlab.core.errors import UserError, broken_link
from convitlab.core.files import file_digest, find_disk_full
from convitlab.data.transforms import image_size_pair
from convitlab.deploy import bundle, onnx_export, source
from convitlab.models.convit import square_grid
from convitlab.models.registry import build_model
from convitlab.models.weights import load_state_dict, read_checkpoint
from convitlab.ops import cpu_layers
from convitlab.ops.runtime import cpu_threads

INPUT_NAME = "image"


def as_paddle_layers(model):
    """`model` with each of convitlab's CPU layers turned into the Paddle layer it subclasses (same
    parameters; they add no state), so that the traced graph holds Paddle's ops only."""
    for layer in model.sublayers(include_self=True):
        if type(layer).__module__ == cpu_layers.__name__:
            layer.__class__ = next(c for c in type(layer).__mro__ if c.__module__.startswith("paddle."))
    return model


def check_grid(state, model, cfg) -> None:
    """Refuse weights trained on another patch grid: load_state_dict would interpolate their
    pos_embed, and the export would be a model nobody trained."""
    if "pos_embed" not in state or not model.use_pos_embed:
        return
    positions = state["pos_embed"].shape[1]
    if positions == model.pos_embed.shape[1]:
        return
    side = square_grid(positions)
    trained = (f"a {side[0]}x{side[1]} grid of patches (data.img_size={side[0] * cfg.model.patch_size} at "
               f"patch {cfg.model.patch_size})" if side else f"{positions} patches")
    raise UserError(f"data.img_size={cfg.data.img_size!r} is not allowed: the checkpoint {cfg.ckpt!r} takes {trained}; "
                    "export at that size, or fine-tune at this one first (train.py model.pretrained=<checkpoint> "
                    f"data.img_size={cfg.data.img_size})")


def save_static(model, prefix, in_chans: int, size) -> None:
    """paddle.jit.save of model.forward on float32 [any batch, in_chans, H, W] at `prefix`."""
    model = as_paddle_layers(model)
    model.eval()
    spec = [paddle.static.InputSpec([None, in_chans, *size], "float32", INPUT_NAME)]
    paddle.jit.save(paddle.jit.to_static(model, input_spec=spec, full_graph=True), str(prefix))


def check_out(out) -> Path:
    """The folder to write: new, empty, or an earlier export (replaced); anything else refused."""
    out = Path(out).expanduser()
    link = broken_link(out)
    if link is not None:
        raise UserError(f"out={str(out)!r} is not allowed: it is {link}; give a folder to write the export in")
    if out.exists() and not out.is_dir():
        raise UserError(f"out={str(out)!r} is not allowed: it is a file; give a folder to write the export in "
                        "(created if missing)")
    ancestor = next(p for p in out.parents if p.exists())  # the root at worst
    if not ancestor.is_dir():
        raise UserError(f"cannot write out={str(out)!r} ({ancestor} is a file): give a folder you can write to")
    if out.is_dir() and any(out.iterdir()) and not bundle.is_export(out):
        raise UserError(f"out={str(out)!r} is not allowed: it is a folder holding other files than an export; "
                        "give a new or empty folder, or an earlier export to replace")
    return out


@contextlib.contextmanager
def staged_folder(out: Path):
    """A new folder beside `out` to write into; on success it takes `out`'s place (an earlier export
    there is replaced), on failure it is removed: `out` is a whole export, or what it was before."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
        staging.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write out={str(out)!r} ({exc.strerror or exc}): give a folder on a file system "
                        "you can write to") from None
    try:
        yield staging
        if out.exists():
            old = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
            os.rename(out, old)
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        full = find_disk_full(exc, out.parent) if isinstance(exc, Exception) else None
        if full is not None:
            raise full from None
        raise


def save_onnx(model, folder: Path, in_chans: int, size) -> int:
    """<folder>/model.onnx: save_static's graph (written in a folder of its own, removed after),
    converted by paddle2onnx and checked in onnxruntime against `model`'s logits; its ONNX opset."""
    paddle_graph = folder / ".paddle"
    save_static(model, paddle_graph / bundle.PREFIX, in_chans, size)
    opset = onnx_export.convert(bundle.program_file(paddle_graph), paddle_graph / bundle.PARAMS, folder / bundle.ONNX)
    shutil.rmtree(paddle_graph)

    def logits(images: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            return model(paddle.to_tensor(images)).numpy()

    onnx_export.check(folder / bundle.ONNX, logits, in_chans, size, cpu_threads())
    return opset


def export(cfg, overrides=()) -> bundle.Manifest:
    """Export cfg's model with its weights (src/export.py: run=, or model= and ckpt=) to cfg.out, in
    cfg.format (paddle or onnx)."""
    if OmegaConf.is_missing(cfg, "out") or not cfg.out:
        raise UserError("out=<folder> is required: where to write the exported model")
    to_onnx = str(cfg.format) == "onnx"
    if to_onnx:
        onnx_export.require_tools()
    src = source.resolve(cfg, overrides)
    cfg = src.cfg
    validate(cfg)
    out = check_out(cfg.out)
    state, layout = read_checkpoint(cfg.ckpt)
    model = build_model(cfg)
    check_grid(state, model, cfg)
    load_state_dict(model, state, layout)
    size = list(image_size_pair(cfg.data.img_size))
    with staged_folder(out) as staging:
        opset = None
        if to_onnx:
            opset = save_onnx(model, staging, cfg.data.in_chans, size)
        else:
            save_static(model, staging / bundle.PREFIX, cfg.data.in_chans, size)
        manifest = bundle.Manifest(
            model=cfg.model.name, img_size=size, in_chans=cfg.data.in_chans, mean=list(cfg.data.mean),
            std=list(cfg.data.std), framing="resize_and_centre_crop" if cfg.data.name == "imagefolder" else "resize",
            num_classes=cfg.data.num_classes, class_names=source.class_names(cfg.data), input_name=INPUT_NAME,
            program=bundle.ONNX if to_onnx else bundle.program_file(staging).name,
            params=None if to_onnx else bundle.PARAMS, checkpoint=str(Path(cfg.ckpt).resolve()),
            checkpoint_sha256=file_digest(cfg.ckpt), run=str(Path(src.run).resolve()) if src.run else None,
            paddle_version=paddle.__version__, format=str(cfg.format), onnx_opset=opset)
        manifest.write(staging)
    return manifest
