"""Mixup and CutMix on a batch, as DeiT trains: each image mixed with its partner in the reversed batch."""
import math

import numpy as np
import paddle
import paddle.nn.functional as F


def smoothed_one_hot(labels, num_classes: int, smoothing: float):
    """One-hot targets with label smoothing: the mixed targets are built from them."""
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mixing_enabled(augment_cfg) -> bool:
    """Whether mixup or cutmix is on."""
    return augment_cfg.mixup > 0 or augment_cfg.cutmix > 0


def cutmix_box(height: int, width: int, lam: float, rng):
    """(top, bottom, left, right) of a box of about (1 - lam) of the image, centred anywhere in it
    and clipped to its edges."""
    cut = math.sqrt(1.0 - lam)
    h, w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    return (min(max(cy - h // 2, 0), height), min(max(cy + h // 2 + h % 2, 0), height),
            min(max(cx - w // 2, 0), width), min(max(cx + w // 2 + w % 2, 0), width))


def mix_batch(images, labels, augment_cfg, smoothing: float, num_classes: int, rng):
    """(images, targets float32 [B, num_classes]): with probability mix_prob, a mixup or cutmix
    (cutmix with probability mix_switch_prob when both are on) of each image with its partner in
    the reversed batch, λ ~ Beta(α, α) from `rng`; targets λ·smooth(y) + (1 − λ)·smooth(y reversed),
    with λ the share of the image really kept for cutmix."""
    targets = smoothed_one_hot(labels, num_classes, smoothing).astype("float32")
    if not mixing_enabled(augment_cfg) or rng.random() >= augment_cfg.mix_prob:
        return images, targets
    use_cutmix = augment_cfg.cutmix > 0 and (augment_cfg.mixup <= 0 or rng.random() < augment_cfg.mix_switch_prob)
    alpha = augment_cfg.cutmix if use_cutmix else augment_cfg.mixup
    lam = float(rng.beta(alpha, alpha))
    partners = paddle.flip(images, axis=[0])
    if use_cutmix:
        height, width = images.shape[-2:]
        top, bottom, left, right = cutmix_box(height, width, lam, rng)
        box = np.zeros((1, 1, height, width), dtype=np.float32)
        box[..., top:bottom, left:right] = 1.0
        box = paddle.to_tensor(box, dtype=images.dtype)
        mixed = images * (1.0 - box) + partners * box
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    else:
        mixed = images * lam + partners * (1.0 - lam)
    return mixed, targets * lam + paddle.flip(targets, axis=[0]) * (1.0 - lam)
