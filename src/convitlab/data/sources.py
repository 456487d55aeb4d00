"""Where images come from: arrays in memory or files on disk, each read as a PIL image."""
from pathlib import Path

import numpy as np
from PIL import Image

from convitlab.core.errors import UserError, whole_message

WIDE_INTEGERS = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey (PNG, TIFF), and I as Pillow widens it


def to_8_bit(image: Image.Image, mode: str) -> Image.Image:
    """`image` in `mode` (RGB or L, 8 bits a channel), by one rule for every Pillow mode:

    - 16-bit grey (I;16*) and 32-bit integers (I, which Pillow makes of some 16-bit files) are
      taken as 0..65535 and scaled by 1/257 (65535 -> 255), rounded, clipped to 0..255; Pillow's
      own convert would saturate them (every value above 255 becomes white);
    - 32-bit floats (F) are taken as 0..1, as float arrays are everywhere here: x 255, rounded, clipped;
    - 16-bit RGB(A) PNGs Pillow itself reads as 8-bit RGB(A), keeping each channel's high byte;
    - every 8-bit mode (1, L, P, RGB, CMYK, YCbCr, LAB, HSV, and those with alpha) goes through
      Pillow's convert; alpha is dropped, each pixel keeps the colour stored under it (a palette
      with transparency through RGBA, as Pillow asks).
    """
    if image.mode in WIDE_INTEGERS:
        image = _grey(np.asarray(image, dtype=np.float64) / 257)
    elif image.mode == "F":
        image = _grey(np.asarray(image, dtype=np.float64) * 255)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # as Pillow asks of a palette with transparency (it warns otherwise)
    return image.convert(mode)  # a copy when already in `mode`: the file is closed after


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


class ArrayImages:
    """Images held as an array [N, H, W, 3] or [N, H, W] (uint8, or float32 in [0, 1]) with int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        """Image `index` as RGB, L (uint8, one channel) or F (float, one channel)."""
        return Image.fromarray(self.images[index])


class FileImages:
    """Image files with int labels, decoded lazily to `mode` (RGB or L)."""

    def __init__(self, paths: list, labels, mode: str):
        self.paths, self.labels, self.mode = list(paths), np.asarray(labels, dtype=np.int64), mode

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        """The decoded image; a file PIL cannot read is a UserError naming it."""
        path = Path(self.paths[index])
        try:
            with Image.open(path) as image:
                return to_8_bit(image, self.mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise UserError(f"cannot read image {path}: {whole_message(exc)} (replace or remove the file)") from None
