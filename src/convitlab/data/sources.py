"""Where images come from: arrays in memory or files on disk, each read as a PIL image."""
from pathlib import Path

import numpy as np
from PIL import Image

from convitlab.errors import UserError


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
                return image.convert(self.mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise UserError(f"cannot read image {path}: {reason} (replace or remove the file)") from None
