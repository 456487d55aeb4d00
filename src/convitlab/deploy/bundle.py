"""An export folder: the static-graph model, its weights and export.json (what to feed it).

    <out>/
      inference.json       the program (Paddle 3.x's PIR; inference.pdmodel where Paddle writes the old format)
      inference.pdiparams  the weights
      export.json          input shape, image size, channels, mean/std, framing, class names,
                           the source checkpoint and its SHA-256

or, exported with format=onnx, model.onnx (graph and weights) and export.json.
"""
import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import List, Optional

from convitlab.core.errors import UserError, broken_link
from convitlab.core.files import write_text

PREFIX = "inference"   # paddle.jit.save's path prefix inside the folder
PROGRAMS = (f"{PREFIX}.json", f"{PREFIX}.pdmodel")  # PIR, then the old program format
PARAMS = f"{PREFIX}.pdiparams"
ONNX = "model.onnx"    # format=onnx: the graph with its weights
MANIFEST = "export.json"
FRAMINGS = ("resize", "resize_and_centre_crop")  # data/transforms.py: EvalTransform's two framings


@dataclass
class Manifest:
    """export.json: what predict.py (or any Paddle Inference user) needs besides the model."""
    model: str                       # the named size (models/sizes.py)
    img_size: List[int]              # [H, W] the model takes
    in_chans: int
    mean: List[float]
    std: List[float]
    framing: str                     # one of FRAMINGS: how evaluation fits an image to img_size
    num_classes: int
    class_names: Optional[List[str]]  # None where the data had none to read
    input_name: str                  # the program's input: float32 [batch, in_chans, H, W], any batch
    program: str                     # the file names in the folder
    params: Optional[str]            # None for ONNX: the weights are inside model.onnx
    checkpoint: str                  # the weights exported (absolute path) and their SHA-256
    checkpoint_sha256: str
    run: Optional[str]               # the training run they came from, if any
    paddle_version: str
    format: str = "paddle"           # paddle (Paddle Inference) or onnx; absent from the exports written before ONNX
    onnx_opset: Optional[int] = None  # format=onnx: the ONNX opset of model.onnx

    def write(self, folder) -> None:
        write_text(Path(folder) / MANIFEST, json.dumps(asdict(self), indent=2) + "\n")


def program_file(folder) -> Optional[Path]:
    """The program file paddle.jit.save wrote in `folder`, or None."""
    return next((Path(folder) / name for name in PROGRAMS if (Path(folder) / name).is_file()), None)


def is_export(folder) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def written_format(folder) -> Optional[str]:
    """The format export.json in `folder` names ("paddle" when it names none), or None when there is
    no export.json to read."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data.get("format", "paddle") if isinstance(data, dict) else None


def read_manifest(folder) -> Manifest:
    """The Manifest of Paddle Inference export folder `folder`; a UserError saying what is wrong when
    it is not one (an ONNX export included: predict.py runs Paddle Inference)."""
    folder = Path(folder)
    what = f"model_dir={str(folder)!r}"
    expected = f"give the folder export.py wrote (with {MANIFEST}, {PROGRAMS[0]} and {PARAMS})"
    if not folder.is_dir():
        problem = broken_link(folder) or ("a file" if folder.exists() else "not found")
        raise UserError(f"{what} is not an export folder: it is {problem}; {expected}")
    if written_format(folder) == "onnx":
        raise UserError(f"{what} is an ONNX export ({ONNX}): predict.py runs the Paddle Inference exports of "
                        f"export.py format=paddle; export again with format=paddle, or run {ONNX} with onnxruntime")
    missing = [name for name in (MANIFEST, PARAMS) if not (folder / name).is_file()]
    if program_file(folder) is None:
        missing.insert(0, PROGRAMS[0])
    if missing:
        raise UserError(f"{what} is not an export folder: it holds no {', no '.join(missing)}; {expected}")
    try:
        data = json.loads((folder / MANIFEST).read_text())
        manifest = Manifest(**{f.name: data[f.name] for f in fields(Manifest)
                               if f.name in data or f.default is MISSING})  # the later fields have defaults
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{what}: {MANIFEST} is damaged or of another version ({type(exc).__name__}: {exc}); "
                        "export the model again with export.py") from None
    if manifest.framing not in FRAMINGS or len(manifest.img_size) != 2:
        raise UserError(f"{what}: {MANIFEST} is damaged (framing {manifest.framing!r}, img_size "
                        f"{manifest.img_size}); export the model again with export.py")
    return manifest
