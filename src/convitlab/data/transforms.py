"""Training and evaluation transforms: PIL for pixels and geometry, NumPy for the normalised tensor.

Every random choice comes from the generator handed in, so what an image becomes is fixed by the
generator's seed (the data sets use (seed, epoch, index)) wherever and whenever it is computed.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from convitlab.core.errors import bad_value, check
from convitlab.data.randaugment import RandAugment

BICUBIC = Image.Resampling.BICUBIC
CROP_FRACTION = 0.875  # the reference's evaluation crop: resize to img_size / 0.875, keep the centre


def image_size_pair(value, key: str = "data.img_size"):
    """An int or [H, W] as an (H, W) tuple of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    else:
        try:
            pair = tuple(int(v) for v in value)
        except TypeError:
            raise bad_value(key, value, "an int or a list [H, W]") from None
    check(len(pair) == 2 and min(pair) > 0, key, value, "a positive int or [H, W]")
    return pair


def random_resized_crop(image, size, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A crop covering a random share `scale` of the image with a log-uniform aspect `ratio`, resized
    (bicubic) to size (H, W); after 10 failed draws, the centre crop with the ratio clamped."""
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            break
    else:
        w, h = width, height
        if width / height < ratio[0]:
            h = round(width / ratio[0])
        elif width / height > ratio[1]:
            w = round(height * ratio[1])
        left, top = (width - w) // 2, (height - h) // 2
    return image.resize((size[1], size[0]), BICUBIC, box=(left, top, left + w, top + h))


def resize(image, size):
    """The whole image resized (bicubic) to size (H, W)."""
    return image if image.size == (size[1], size[0]) else image.resize((size[1], size[0]), BICUBIC)


def resize_and_centre_crop(image, size):
    """The reference's evaluation framing: the short side to size / 0.875 (bicubic), the centre (H, W)."""
    height, width = size
    if height == width:
        short = int(height / CROP_FRACTION)
        w, h = image.size
        scaled = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    else:
        scaled = (int(width / CROP_FRACTION), int(height / CROP_FRACTION))
    image = image.resize(scaled, BICUBIC)
    left, top = round((scaled[0] - width) / 2), round((scaled[1] - height) / 2)
    return image.crop((left, top, left + width, top + height))


def pad_and_random_crop(image, padding: int, rng):
    """The image zero-padded by `padding` on every side, then cropped back to its size at a random offset."""
    width, height = image.size
    padded = Image.new(image.mode, (width + 2 * padding, height + 2 * padding), 0)
    padded.paste(image, (padding, padding))
    left, top = (int(v) for v in rng.integers(0, 2 * padding + 1, size=2))
    return padded.crop((left, top, left + width, top + height))


def random_hflip(image, rng):
    """The image mirrored left-right with probability 0.5."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def match_channels(image, channels: int):
    """A colour image made grey when the model takes one channel."""
    return image.convert("L") if channels == 1 and image.mode not in ("L", "F") else image


def to_normalised_array(image, mean: np.ndarray, std: np.ndarray, channels: int) -> np.ndarray:
    """float32 [C, H, W]: pixels in [0, 1] (F images already are), one channel repeated to `channels`,
    then (x - mean) / std per channel."""
    array = np.asarray(image, dtype=np.float32)
    if image.mode != "F":
        array = array / 255.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if array.shape[0] != channels:
        array = np.repeat(array, channels, axis=0)
    return ((array - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


def random_erasing(array: np.ndarray, probability: float, rng) -> np.ndarray:
    """With `probability`, a box of 2–33% of the area (aspect 0.3–3.3) replaced by N(0, 1) noise,
    on the normalised [C, H, W] array (DeiT's random erasing, one box, per-pixel noise)."""
    if rng.random() >= probability:
        return array
    channels, height, width = array.shape
    for _ in range(10):
        area = height * width * rng.uniform(0.02, 1 / 3)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < h < height and 0 < w < width:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            erased = array.copy()
            erased[:, top:top + h, left:left + w] = rng.standard_normal((channels, h, w), dtype=np.float32)
            return erased
    return array


@dataclass
class Normalise:
    """Pixels to the model's input: float32 [C, H, W] with the data's mean and std."""
    mean: np.ndarray
    std: np.ndarray
    channels: int

    def __call__(self, image):
        return to_normalised_array(image, self.mean, self.std, self.channels)


@dataclass
class TrainTransform:
    """Training augmentation: framing (random resized crop, or the evaluation framing) → padded random
    crop → flip → RandAugment → normalise → random erasing; `rng` decides every random step."""
    size: tuple
    normalise: Normalise
    random_resized_crop: bool = False
    centre_crop: bool = False  # frame like evaluation (image folders) rather than resize the whole image
    crop_padding: int = 0      # 0: no padded random crop
    hflip: bool = False
    randaugment: Optional[RandAugment] = None
    erasing: float = 0.0

    def __call__(self, image, rng) -> np.ndarray:
        image = match_channels(image, self.normalise.channels)
        if self.random_resized_crop:
            image = random_resized_crop(image, self.size, rng)
        elif self.centre_crop:
            image = resize_and_centre_crop(image, self.size)
        else:
            image = resize(image, self.size)
        if self.crop_padding:
            image = pad_and_random_crop(image, self.crop_padding, rng)
        if self.hflip:
            image = random_hflip(image, rng)
        if self.randaugment is not None:
            image = self.randaugment(image, rng)
        array = self.normalise(image)
        return random_erasing(array, self.erasing, rng) if self.erasing > 0 else array


@dataclass
class EvalTransform:
    """Evaluation: the reference's resize and centre crop (image folders) or a plain resize; no randomness."""
    size: tuple
    normalise: Normalise
    centre_crop: bool = False

    def __call__(self, image, rng=None) -> np.ndarray:
        image = match_channels(image, self.normalise.channels)
        image = resize_and_centre_crop(image, self.size) if self.centre_crop else resize(image, self.size)
        return self.normalise(image)


def build_transforms(data_cfg, centre_crop: bool):
    """(train, eval) transforms for `data_cfg`; `centre_crop` for photographs of any size (image folders)."""
    size, augment = image_size_pair(data_cfg.img_size), data_cfg.augment
    normalise = Normalise(np.asarray(data_cfg.mean, np.float32), np.asarray(data_cfg.std, np.float32), data_cfg.in_chans)
    randaugment = None
    if augment.randaugment:
        fill = tuple(round(255 * m) for m in data_cfg.mean)
        randaugment = RandAugment(augment.randaugment_ops, augment.randaugment_magnitude,
                                  augment.randaugment_magnitude_std, fill)
    train = TrainTransform(size, normalise, augment.random_resized_crop, centre_crop,
                           augment.crop_padding if augment.random_crop else 0, augment.hflip, randaugment,
                           augment.random_erasing)
    return train, EvalTransform(size, normalise, centre_crop)
