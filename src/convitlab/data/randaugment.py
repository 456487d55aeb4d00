"""RandAugment (Cubuk et al., 2020) in the form DeiT trains with (rand-m9-mstd0.5): PIL ops.

Each of `num_ops` draws picks an op uniformly, applies it with probability 0.5, at a magnitude
drawn from N(magnitude, magnitude_std) clipped to [0, 10]; higher magnitudes are always stronger.
"""
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_MAGNITUDE = 10.0
_BILINEAR = Image.Resampling.BILINEAR


def _signed(value: float, rng) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(image, coefficients, fill):
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, _BILINEAR, fillcolor=fill)


def _enhance(enhancer):
    return lambda image, level, rng, fill: enhancer(image).enhance(1.0 + _signed(0.9 * level, rng))


def _solarize_add(image, level, rng, fill):
    add = int(110 * level)
    table = [min(255, v + add) if v < 128 else v for v in range(256)]
    return image.point(table * len(image.getbands()))


# op(image, level in [0, 1], rng, fill) -> image
OPS = {
    "auto_contrast": lambda image, level, rng, fill: ImageOps.autocontrast(image),
    "equalize": lambda image, level, rng, fill: ImageOps.equalize(image),
    "invert": lambda image, level, rng, fill: ImageOps.invert(image),
    "rotate": lambda image, level, rng, fill: image.rotate(_signed(30 * level, rng), _BILINEAR, fillcolor=fill),
    "posterize": lambda image, level, rng, fill: ImageOps.posterize(image, 8 - round(4 * level)),
    "solarize": lambda image, level, rng, fill: ImageOps.solarize(image, 256 - round(256 * level)),
    "solarize_add": _solarize_add,
    "color": _enhance(ImageEnhance.Color),
    "contrast": _enhance(ImageEnhance.Contrast),
    "brightness": _enhance(ImageEnhance.Brightness),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "shear_x": lambda image, level, rng, fill: _affine(image, (1, _signed(0.3 * level, rng), 0, 0, 1, 0), fill),
    "shear_y": lambda image, level, rng, fill: _affine(image, (1, 0, 0, _signed(0.3 * level, rng), 1, 0), fill),
    "translate_x": lambda image, level, rng, fill: _affine(
        image, (1, 0, _signed(0.45 * level, rng) * image.width, 0, 1, 0), fill),
    "translate_y": lambda image, level, rng, fill: _affine(
        image, (1, 0, 0, 0, 1, _signed(0.45 * level, rng) * image.height), fill),
}
_OP_LIST = list(OPS.values())


class RandAugment:
    """`num_ops` random PIL ops per image; `fill` (one int per channel) paints uncovered pixels."""

    def __init__(self, num_ops: int, magnitude: float, magnitude_std: float, fill: tuple, prob: float = 0.5):
        self.num_ops, self.magnitude, self.magnitude_std = num_ops, magnitude, magnitude_std
        self.fill, self.prob = tuple(fill), prob

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """The augmented image, in mode L or RGB (a float image is first quantised to 8 bits)."""
        if image.mode == "F":  # the ops need 8-bit pixels
            image = Image.fromarray(np.round(np.clip(np.asarray(image), 0, 1) * 255).astype(np.uint8))
        fill = self.fill[0] if image.mode == "L" else self.fill
        for op in rng.integers(0, len(_OP_LIST), size=self.num_ops):
            if rng.random() >= self.prob:
                continue
            magnitude = self.magnitude + self.magnitude_std * rng.standard_normal()
            image = _OP_LIST[op](image, float(np.clip(magnitude, 0, MAX_MAGNITUDE)) / MAX_MAGNITUDE, rng, fill)
        return image
