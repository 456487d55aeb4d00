"""The training protocol: how long a run trains, warms up and waits between evaluations.

One rule, the paper's small-sample protocol: with `schedule.scale_epochs` (the default) every
length given in epochs — `schedule.epochs`, `schedule.warmup_epochs`, `trainer.eval_every` —
counts full-data epochs, that is images. At `data.fraction=f` each is 1/f passes over the
subset, so a run on 10% of the data trains 10x the passes, sees as many images as the full-data
run, warms up over as many images and is evaluated (and checkpointed) as often per image seen.
"""
import logging
from dataclasses import dataclass

from convitlab.core.errors import UserError

log = logging.getLogger(__name__)
# More passes than this is a mistyped fraction or epoch count, not a study: 10^6 passes of a
# single step already take days on a GPU, and a run evaluates (and checkpoints) only every
# 1/fraction passes. Refused before any work rather than left to run silently.
MAX_PASSES = 1_000_000


@dataclass(frozen=True)
class Protocol:
    epochs: int           # passes over the (subset) training split
    steps_per_epoch: int  # optimiser steps per pass
    warmup_steps: int     # linear warm-up, in optimiser steps
    eval_every: int       # passes between evaluations; the last pass is always evaluated

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def evaluates(self, epoch: int) -> bool:
        return epoch % self.eval_every == 0 or epoch == self.epochs


def epoch_scale(cfg) -> float:
    """Passes over the subset per full-data epoch: 1/fraction with schedule.scale_epochs, else 1."""
    return 1 / cfg.data.fraction if cfg.schedule.scale_epochs else 1.0


def total_epochs(cfg) -> int:
    """Passes over the subset; a plan of more than MAX_PASSES is refused in one line."""
    passes = max(1, round(cfg.schedule.epochs * epoch_scale(cfg)))
    if passes > MAX_PASSES:
        why = (f"schedule.epochs={cfg.schedule.epochs} full-data epochs at data.fraction={cfg.data.fraction} "
               if cfg.schedule.scale_epochs else f"schedule.epochs={cfg.schedule.epochs} ")
        raise UserError(f"{why}make {passes:,} passes over the training subset, more than the {MAX_PASSES:,} "
                        "allowed: raise data.fraction, lower schedule.epochs, or set schedule.scale_epochs=false "
                        "to count passes")
    return passes


def plan(cfg, steps_per_epoch: int) -> Protocol:
    """The protocol of `cfg` for a training loader of `steps_per_epoch` steps."""
    warmup_steps = round(cfg.schedule.warmup_epochs * epoch_scale(cfg) * steps_per_epoch)
    if cfg.schedule.warmup_epochs >= cfg.schedule.epochs:  # kept as asked: a warm-up study may want it
        log.warning("schedule.warmup_epochs=%g is not less than schedule.epochs=%g: the whole run is warm-up and "
                    "the learning rate never reaches optimizer.lr; lower schedule.warmup_epochs or train longer",
                    cfg.schedule.warmup_epochs, cfg.schedule.epochs)
    return Protocol(epochs=total_epochs(cfg), steps_per_epoch=steps_per_epoch, warmup_steps=int(warmup_steps),
                    eval_every=max(1, round((cfg.trainer.eval_every or 1) * epoch_scale(cfg))))
