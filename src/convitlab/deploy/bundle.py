"""An export folder: the static-graph model, its weights and export.json (what to feed it).

    <out>/
      inference.json       the program (Paddle 3.x's PIR; inference.pdmodel where Paddle writes the old format)
      inference.pdiparams  the weights
      export.json          input shape, image size, channels, mean/std, framing, class names,
                           the source checkpoint and its SHA-256
"""
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import List, Optional

from convitlab.core.errors import UserError, broken_link
from convitlab.core.files import write_text

PREFIX = "inference"   # paddle.jit.save's path prefix inside the folder
PROGRAMS = (f"{PREFIX}.json", f"{PREFIX}.pdmodel")  # PIR, then the old program format
PARAMS = f"{PREFIX}.pdiparams"
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
    params: str
    checkpoint: str                  # the weights exported (absolute path) and their SHA-256
    checkpoint_sha256: str
    run: Optional[str]               # the training run they came from, if any
    paddle_version: str

    def write(self, folder) -> None:
        write_text(Path(folder) / MANIFEST, json.dumps(asdict(self), indent=2) + "\n")


def program_file(folder) -> Optional[Path]:
    """The program file paddle.jit.save wrote in `folder`, or None."""
    return next((Path(folder) / name for name in PROGRAMS if (Path(folder) / name).is_file()), None)


def is_export(folder) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder) -> Manifest:
    """The Manifest of export folder `folder`; a UserError saying what is wrong when it is not one."""
    folder = Path(folder)
    what = f"model_dir={str(folder)!r}"
    expected = f"give the folder export.py wrote (with {MANIFEST}, {PROGRAMS[0]} and {PARAMS})"
    if not folder.is_dir():
        problem = broken_link(folder) or ("a file" if folder.exists() else "not found")
        raise UserError(f"{what} is not an export folder: it is {problem}; {expected}")
    missing = [name for name in (MANIFEST, PARAMS) if not (folder / name).is_file()]
    if program_file(folder) is None:
        missing.insert(0, PROGRAMS[0])
    if missing:
        raise UserError(f"{what} is not an export folder: it holds no {', no '.join(missing)}; {expected}")
    try:
        data = json.loads((folder / MANIFEST).read_text())
        manifest = Manifest(**{f.name: data[f.name] for f in fields(Manifest)})
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{what}: {MANIFEST} is damaged or of another version ({type(exc).__name__}: {exc}); "
                        "export the model again with export.py") from None
    if manifest.framing not in FRAMINGS or len(manifest.img_size) != 2:
        raise UserError(f"{what}: {MANIFEST} is damaged (framing {manifest.framing!r}, img_size "
                        f"{manifest.img_size}); export the model again with export.py")
    return manifest
