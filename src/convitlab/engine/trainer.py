"""The training loop: config in, result row out, every epoch recorded on the way.

`fit` reads top to bottom: set up (set_up: data → model → optimiser → the resumed LoopState),
loop (epochs of train_one_epoch, and at each evaluation evaluate_epoch, then a checkpoint),
record (the Recorder writes the tables and logs; the result row comes from the LoopState).
"""
import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import paddle
import paddle.nn.functional as F
from tqdm import tqdm

from convitlab.analysis.locality import locality_rows
from convitlab.analysis.summary import count_flops, count_parameters
from convitlab.core import distributed
from convitlab.core.errors import UserError
from convitlab.core.layout import RunFolder
from convitlab.core.signals import run_deferred_signals
from convitlab.data import build_datasets, build_loaders, mix_batch, mixing_enabled, write_subset_csv
from convitlab.data.mixing import smoothed_one_hot
from convitlab.data.seeds import mix_rng
from convitlab.engine import finetune
from convitlab.engine.amp import amp_settings, backward_and_step
from convitlab.engine.checkpoint import Checkpointer
from convitlab.engine.ema import ModelEMA
from convitlab.engine.metrics import Totals, correct_top_k, soft_target_cross_entropy
from convitlab.engine.optim import base_learning_rate, build_optimizer, learning_rate_at
from convitlab.engine.protocol import Protocol, plan
from convitlab.engine.recorder import Recorder
from convitlab.engine.rng import capture as capture_rng
from convitlab.models.registry import build_model
from convitlab.ops.runtime import select_device

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Everything the loop carries from epoch to epoch; saved in every checkpoint."""
    epoch: int = 0          # epochs completed
    step: int = 0           # optimiser steps taken
    best_top1: float = -1.0
    best_epoch: int = 0
    train_time_s: float = 0.0
    train_images: int = 0
    world_size: int = 1     # ranks that wrote it: a resume needs the same
    skipped_steps: int = 0  # optimiser steps the fp16 loss scaler skipped (gradient overflow)
    # The result row's final columns: the last epoch's train loss and the last evaluation.
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    val_top1: Optional[float] = None
    val_top5: Optional[float] = None


class Diverged(Exception):
    """The training loss became NaN or infinite."""


@paddle.no_grad()
def evaluate(model, loader, amp_dtype=None):
    """Loss, top-1 and top-5 (percent) over a loader, summed across ranks."""
    model.eval()
    totals = Totals()
    with contextlib.closing(iter(loader)) as batches:  # a stop between batches ends the loader's workers too
        for images, labels in batches:
            run_deferred_signals()
            labels = labels.flatten()
            with paddle.amp.auto_cast(enable=amp_dtype is not None, dtype=amp_dtype or "float16"):
                logits = model(images)
            logits = logits.astype("float32")
            loss = F.cross_entropy(logits, labels, reduction="sum")
            totals.add(labels.shape[0], loss=loss, top1=correct_top_k(logits, labels, 1),
                       top5=correct_top_k(logits, labels, 5))
    sums, count = totals.reduced()
    count = max(count, 1)
    return {"val_loss": sums.get("loss", math.nan) / count, "val_top1": 100 * sums.get("top1", 0) / count,
            "val_top5": 100 * sums.get("top5", 0) / count}


@dataclass
class Training:
    """What set_up builds and the loop uses."""
    model: paddle.nn.Layer  # evaluated, checkpointed and averaged by the EMA
    train_model: paddle.nn.Layer  # what the train step calls: DataParallel around `model` on several ranks
    optimizer: paddle.optimizer.Optimizer
    scaler: object  # LossScaler with trainer.amp=fp16, else None
    ema: object  # ModelEMA with trainer.ema, else None
    amp_dtype: object  # auto_cast's dtype, None in float32
    train_loader: object
    val_loader: object
    probe: object  # the fixed batch locality is measured on, or None
    protocol: Protocol
    base_lr: float
    num_classes: int
    checkpoints: Checkpointer
    columns: dict  # the result row's columns known before training: params, flops, the pretrained file


def train_one_epoch(t: Training, cfg, state: LoopState, epoch: int) -> dict:
    """One pass over the training loader; advances `state` and returns the epoch's metrics row."""
    t.train_model.train()
    t.train_loader.batch_sampler.set_epoch(epoch)
    totals = Totals()
    data_wait, start = 0.0, time.perf_counter()
    smoothing = cfg.trainer.label_smoothing
    mixing = mixing_enabled(cfg.data.augment)
    world = distributed.world_size()
    steps_per_epoch = t.protocol.steps_per_epoch
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{t.protocol.epochs}", leave=False, dynamic_ncols=True,
               disable=None if cfg.trainer.progress_bar and distributed.is_main() else True)
    skipped_steps = 0
    # A pass read to its end ends its loader workers; closing ends them when a step raises.
    with contextlib.closing(iter(t.train_loader)) as batches:
        for batch_index in range(steps_per_epoch):
            # A step boundary: a requeue's exit or a stop leaves no op half done.
            run_deferred_signals(step=state.step)
            tick = time.perf_counter()
            images, labels = next(batches)
            data_wait += time.perf_counter() - tick
            labels = labels.flatten()
            lr = learning_rate_at(state.step, t.protocol.total_steps, t.protocol.warmup_steps, t.base_lr,
                                  cfg.schedule)
            t.optimizer.set_lr(lr)
            if mixing:
                rng = mix_rng(cfg.seed, epoch, batch_index)
                images, targets = mix_batch(images, labels, cfg.data.augment, smoothing, t.num_classes, rng)
            else:
                targets = smoothed_one_hot(labels, t.num_classes, smoothing)
            with paddle.amp.auto_cast(enable=t.amp_dtype is not None, dtype=t.amp_dtype or "float16"):
                logits = t.train_model(images)
            loss = soft_target_cross_entropy(logits.astype("float32"), targets)
            count = labels.shape[0]
            # DataParallel averages the ranks' gradients; weighting each rank's mean by its share
            # of the global batch makes that the gradient of the global batch's mean loss also
            # when a last partial batch (data.drop_last=false) splits unevenly across ranks.
            weight = count * world / t.train_loader.batch_sampler.global_batch_size(batch_index)
            skipped = backward_and_step(loss * weight if weight != 1 else loss, t.optimizer, t.scaler)
            if t.ema is not None:
                t.ema.update(t.model)
            state.step += 1
            if skipped:  # its loss (often NaN) trained nothing: kept out of the epoch's loss and top-1
                skipped_steps += 1
                state.skipped_steps += 1
                totals.add(count)
                if t.scaler.overflow_unexplained():
                    bar.close()
                    raise Diverged(f"float16 overflow at every step down to a loss scale of "
                                   f"{t.scaler.loss_scale:g} in epoch {epoch} ({skipped_steps} steps skipped): "
                                   "the loss or its gradients are not finite whatever the scale")
            else:
                totals.add(count, loss=loss.detach() * count, top1=correct_top_k(logits.detach(), labels, 1),
                           trained=count)
            if not bar.disable and (batch_index % 10 == 0 or batch_index == steps_per_epoch - 1):
                images_per_s = totals.count / (time.perf_counter() - start)  # this rank's images
                # float(loss) syncs: every 10 steps only
                bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
            bar.update(1)
        next(batches, None)  # the end of the pass (there are steps_per_epoch batches)
    bar.close()
    elapsed = time.perf_counter() - start
    sums, count = totals.reduced()
    trained = sums.get("trained", 0.0)  # images of the steps that updated the model
    if trained and not math.isfinite(sums["loss"]):
        raise Diverged(f"training loss became {sums['loss']} in epoch {epoch}")
    if skipped_steps:
        log.info("epoch %d: %d of %d steps skipped (float16 gradient overflow); loss scale now %g", epoch,
                 skipped_steps, steps_per_epoch, t.scaler.loss_scale)
    train_loss = sums["loss"] / trained if trained else math.nan
    state.epoch, state.train_loss = epoch, train_loss
    state.train_time_s += elapsed
    state.train_images += int(count)
    return {"epoch": epoch, "lr": lr, "train_loss": train_loss,
            "train_top1": 100 * sums["top1"] / trained if trained else math.nan, "skipped_steps": skipped_steps,
            "epoch_s": elapsed, "img_per_s": count / elapsed, "data_wait_frac": data_wait / elapsed}


def evaluate_epoch(t: Training, cfg, state: LoopState) -> tuple:
    """(val metrics, locality rows) of the model after `state.epoch`; keeps the best weights."""
    main, locality = distributed.is_main(), []
    # With EMA on, the EMA weights are the model that is evaluated, measured and kept as best.
    with t.ema.swapped_into(t.model) if t.ema is not None else contextlib.nullcontext():
        val = evaluate(t.model, t.val_loader, t.amp_dtype)
        improved = val["val_top1"] > state.best_top1
        if main and t.probe is not None:
            locality = [{"epoch": state.epoch, **r} for r in locality_rows(t.model, t.probe)]
        if main and improved and cfg.trainer.save_best:
            # Before the epoch's checkpoint: once that exists, a restart never comes back here.
            t.checkpoints.save_best(t.model)
    if improved:
        state.best_top1, state.best_epoch = val["val_top1"], state.epoch
    state.val_loss, state.val_top1, state.val_top5 = val["val_loss"], val["val_top1"], val["val_top5"]
    return val, locality


def save_checkpoint(t: Training, state: LoopState, recorder: Recorder) -> None:
    # Checkpoints follow evaluations (once per full-data epoch's worth of images), not every
    # pass: at a small data.fraction a pass is a few steps, and writing the model after each
    # would take a large share of the run (measured: experiments/convit_tiny_10pct/README.md).
    # A resume redoes at most one interval, exactly.
    rng_states = distributed.gather_objects(capture_rng())  # every rank takes part
    recorder.flush()
    if distributed.is_main():
        t.checkpoints.save(state.epoch, t.model, t.optimizer, asdict(state), rng_states, t.ema, t.scaler)
    distributed.barrier()


def set_up(cfg, folder: RunFolder):
    """(Training, LoopState): data, model, optimiser, the protocol, and the state of the last
    checkpoint when the run resumes (a fresh one otherwise)."""
    device = select_device(cfg.trainer.device)
    amp_dtype, scaler = amp_settings(cfg.trainer.amp, device)
    paddle.seed(cfg.seed + distributed.rank())
    np.random.seed((cfg.seed + distributed.rank()) % 2**32)
    data = build_datasets(cfg.data, cfg.seed)
    if data.num_classes != cfg.data.num_classes:
        raise UserError(f"data.num_classes={cfg.data.num_classes} does not match the {data.num_classes} "
                        f"classes found in data.name={cfg.data.name}")
    train_loader, val_loader = build_loaders(data, cfg.data, cfg.seed, distributed.rank(), distributed.world_size(),
                                             cfg.trainer.max_steps_per_epoch)
    if distributed.is_main():
        write_subset_csv(folder.subset, data.subset_indices, data.subset_labels)

    model = build_model(cfg)
    # model.pretrained on a fresh start, frozen layers (before the optimiser, EMA and DataParallel copy anything)
    lr_scale, pretrained_columns = finetune.prepare(cfg, model, folder.path)
    # Wrapped before anything copies the weights (EMA): DataParallel broadcasts rank 0's
    # parameters, so every rank starts from the same model whatever its seed.
    train_model = paddle.DataParallel(model) if distributed.world_size() > 1 else model
    columns = {"params": count_parameters(model), "flops": count_flops(model), **pretrained_columns}
    global_batch = cfg.data.batch_size * distributed.world_size()
    base_lr = base_learning_rate(cfg.optimizer, global_batch)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.trainer.grad_clip, lr_scale)
    ema = ModelEMA(model, cfg.trainer.ema_decay) if cfg.trainer.ema else None
    protocol = plan(cfg, len(train_loader))
    checkpoints = Checkpointer(folder.checkpoints, cfg.trainer.keep_checkpoints)
    state = LoopState(world_size=distributed.world_size())
    latest = checkpoints.latest() if cfg.trainer.resume != False else None  # noqa: E712 (auto or true)
    if latest is not None:
        state = LoopState(**{k: v for k, v in checkpoints.load(latest, model, optimizer, ema, scaler).items()
                             if k in LoopState.__dataclass_fields__})
        if state.world_size != distributed.world_size():
            raise UserError(f"{latest} was written by {state.world_size} rank(s), this run has "
                            f"{distributed.world_size()}: resume with the same number of ranks (the global batch "
                            "and schedule depend on it), or set trainer.resume=false to start afresh")
        log.info("resuming from %s (epoch %d of %d)", latest, state.epoch, protocol.epochs)
    if cfg.trainer.to_static:
        # The model itself, in place: DataParallel wraps this very object, so it runs the static
        # forward and keeps its gradient all-reduce (tests/test_distributed.py); DataParallel's own
        # forward(*inputs) cannot be converted (to_static raises "requires 0 arguments").
        paddle.jit.to_static(model)
    probe = _locality_probe(data.val, cfg.trainer.locality_batch_size) if cfg.trainer.measure_locality else None
    return Training(model=model, train_model=train_model, optimizer=optimizer, scaler=scaler, ema=ema,
                    amp_dtype=amp_dtype, train_loader=train_loader, val_loader=val_loader, probe=probe,
                    protocol=protocol, base_lr=base_lr, num_classes=data.num_classes, checkpoints=checkpoints,
                    columns=columns), state


def fit(cfg, run_dir, identity=None) -> dict:
    """Train per `cfg` in `run_dir` (resuming from its last checkpoint when there is one);
    `identity`, the run's identity columns, goes to VisualDL's hyper-parameter view.

    Returns the result row; only rank 0 writes files.
    """
    folder = RunFolder(run_dir)
    t, state = set_up(cfg, folder)
    row = {**t.columns, "epochs": t.protocol.epochs, "status": "running"}
    with Recorder(folder, cfg, t.protocol.epochs, state, identity) as recorder:
        try:
            for epoch in range(state.epoch + 1, t.protocol.epochs + 1):
                metrics, locality = train_one_epoch(t, cfg, state, epoch), []
                if t.protocol.evaluates(epoch):
                    val, locality = evaluate_epoch(t, cfg, state)
                    metrics.update(val)
                recorder.record(metrics, locality)
                if t.protocol.evaluates(epoch):
                    save_checkpoint(t, state, recorder)
            row["status"] = "completed"
        except Diverged as exc:
            log.error("%s: stopping; the last good checkpoint is kept", exc)
            row.update(status="diverged", error=str(exc))
            recorder.flush()  # the epochs that completed before it, for the record
    evaluated = state.best_epoch > 0  # (not yet when a run diverges before its first evaluation)
    row.update(top1=state.val_top1, top5=state.val_top5, best_top1=state.best_top1 if evaluated else None,
               best_epoch=state.best_epoch if evaluated else None, final_val_loss=state.val_loss,
               final_train_loss=state.train_loss, images_seen=state.train_images, train_time_s=state.train_time_s,
               skipped_steps=state.skipped_steps,
               img_per_s=state.train_images / state.train_time_s if state.train_time_s else None)
    return row


def _locality_probe(dataset, size):
    """A fixed batch of validation images, so locality is measured on the same inputs each epoch."""
    size = min(size, len(dataset))
    if size == 0:
        return None
    return paddle.to_tensor(np.stack([dataset[i][0] for i in range(size)]))
