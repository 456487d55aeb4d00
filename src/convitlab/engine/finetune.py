"""Fine-tuning from published weights: `python src/train.py model.pretrained=<file> [finetune.*=...]`.

The file (timm's .safetensors, the authors' .pth, a .pdparams of the seed or of convitlab) is
loaded after the model's own initialisation, at the start of a fresh run only: a run that
resumes continues from its own checkpoint and never reads the file again. What does not fit
as it is gets adapted, one log line per tensor:
- the head, when the number of classes differs: kept at its fresh initialisation;
- pos_embed, when the patch grid differs: bicubic interpolation from the file's square grid;
- the patch filters of a 3-channel file on 1-channel data: summed over the channels (or averaged,
  finetune.channel_adapt=mean). Summing keeps the response to a grey image: feeding the grey
  channel x as (x, x, x) to the 3-channel filters W gives sum_c W_c * x, which is what the summed
  filter gives on x alone, so the patch tokens keep their scale against pos_embed and the rest
  of the network sees what it was trained on. Averaging divides them by 3.
Anything else that does not fit (another architecture) is one line naming the missing,
unexpected and mis-shaped tensors.

Then what fine-tuning needs: freezing (finetune.freeze_patch_embed, finetune.freeze_blocks=k)
and one learning-rate scale for the backbone against the head (finetune.backbone_lr_scale).
"""
import json
import logging
import os

import numpy as np

from convitlab.core import distributed
from convitlab.core.errors import UserError
from convitlab.core.files import file_digest, write_text
from convitlab.core.layout import RunFolder
from convitlab.engine.checkpoint import Checkpointer
from convitlab.models.weights import fit_state_dict, read_checkpoint, set_state

log = logging.getLogger(__name__)
# ImageNet's statistics, which the published weights were trained with; one grey channel takes
# their channel means, so the summed filters see what the 3-channel ones saw on a grey image.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = 0.449, 0.226


def adapt_state(model, state, layout="paddle", channel_adapt="sum"):
    """The file's tensors fitted to the model under fine-tuning's policy (models.weights.fit_state_dict):
    (values, notes), one note per tensor skipped, re-initialised, resized or adapted."""
    return fit_state_dict(model, state, layout, "finetune", channel_adapt)


def apply_pretrained(model, path, channel_adapt="sum") -> dict:
    """Load `path` into `model` (after its initialisation), adapting what may be; logs one line
    per adapted tensor and returns the result.csv columns naming the file."""
    state, layout = read_checkpoint(path)  # a missing, unknown or corrupt file: one line naming it
    try:
        adapted, notes = adapt_state(model, state, layout, channel_adapt)
    except UserError as exc:
        raise UserError(f"model.pretrained={str(path)!r}: {exc}") from None
    set_state(model, adapted)
    for note in notes:
        log.info("model.pretrained: %s", note)
    digest = file_digest(path)
    log.info("model.pretrained: %d tensors from %s (sha256 %s, %s layout)", len(state), path, digest[:16], layout)
    return {"pretrained": os.fspath(path), "pretrained_sha256": digest}


def freeze(model, freeze_patch_embed: bool, freeze_blocks: int) -> None:
    """Frozen parameters keep their values: no gradient, left out of the optimiser."""
    layers = ([("patch_embed", model.patch_embed)] if freeze_patch_embed else []) + \
             [(f"blocks.{i}", model.blocks[i]) for i in range(freeze_blocks)]
    count = 0
    for _, layer in layers:
        for param in layer.parameters():
            param.stop_gradient = True
            count += int(np.prod(param.shape))
    if layers:
        log.info("frozen: %s (%d parameters)", ", ".join(name for name, _ in layers), count)


def backbone_lr_scale(scale: float):
    """optimizer's lr_scale: the head at the base learning rate, everything else at scale × it.

    One scale rather than a layer-wise decay: with few images the question is how far the
    backbone may move from the published weights against the new head, one number to set or
    sweep; which early layers must not move at all is what freezing (finetune.freeze_blocks)
    says, and a decay's per-depth rates would add a second knob tied to the depth of each size.
    """
    if scale == 1:
        return None
    return lambda name: 1.0 if name.startswith("head.") else float(scale)


def prepare(cfg, model, run_dir):
    """Before the optimiser is built: the pretrained weights on a fresh start, frozen layers.

    Returns (lr_scale for build_optimizer, result.csv columns naming the pretrained file).
    """
    f = cfg.finetune
    path = cfg.model.get("pretrained")
    columns = {}
    if path:
        folder = RunFolder(run_dir)
        resuming = cfg.trainer.resume is not False and Checkpointer(folder.checkpoints).latest() is not None
        if resuming:  # the checkpoint holds the fine-tuned weights: the file is not read again
            try:
                record = json.loads(folder.pretrained.read_text())
            except (OSError, ValueError):
                record = None
            columns = record or {"pretrained": path, "pretrained_sha256": None}
            log.info("model.pretrained=%s not applied: the run resumes from its own checkpoint", path)
        else:
            columns = apply_pretrained(model, path, f.channel_adapt)
            if distributed.is_main():
                write_text(folder.pretrained, json.dumps(columns, indent=1))
        warn_normalisation(cfg)
    freeze(model, f.freeze_patch_embed, f.freeze_blocks)
    return backbone_lr_scale(f.backbone_lr_scale), columns


def warn_normalisation(cfg) -> None:
    """The published weights expect ImageNet's normalisation (channel means for one grey channel)."""
    d = cfg.data
    expected = (IMAGENET_MEAN, IMAGENET_STD) if d.in_chans == 3 else ((GREY_MEAN,), (GREY_STD,))
    if not (np.allclose(list(d.mean), expected[0], atol=1e-3) and np.allclose(list(d.std), expected[1], atol=1e-3)):
        log.warning("model.pretrained: data.mean=%s data.std=%s differ from the normalisation the published "
                    "weights were trained with (data.mean=%s data.std=%s)", list(d.mean), list(d.std),
                    list(expected[0]), list(expected[1]))
