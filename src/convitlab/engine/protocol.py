"""The training protocol: how long a run trains, warms up and waits between evaluations.

One rule, the paper's small-sample protocol: with `schedule.scale_epochs` (the default) every
length given in epochs — `schedule.epochs`, `schedule.warmup_epochs`, `trainer.eval_every` —
counts full-data epochs, that is images. At `data.fraction=f` each is 1/f passes over the
subset, so a run on 10% of the data trains 10x the passes, sees as many images as the full-data
run, warms up over as many images and is evaluated (and checkpointed) as often per image seen.
"""
from dataclasses import dataclass


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
    return max(1, round(cfg.schedule.epochs * epoch_scale(cfg)))


def plan(cfg, steps_per_epoch: int) -> Protocol:
    """The protocol of `cfg` for a training loader of `steps_per_epoch` steps."""
    warmup_steps = round(cfg.schedule.warmup_epochs * epoch_scale(cfg) * steps_per_epoch)
    return Protocol(epochs=total_epochs(cfg), steps_per_epoch=steps_per_epoch, warmup_steps=int(warmup_steps),
                    eval_every=max(1, round((cfg.trainer.eval_every or 1) * epoch_scale(cfg))))
