"""The training loop: config in, result row out, every epoch recorded on the way.

One function, `fit`, holds the loop and its state (epoch, step, best, times) in plain view:
data → model → optimiser → epochs of train + evaluate + locality → tables, logs, checkpoints.
"""
import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm
from visualdl import LogWriter

from convitlab import distributed, finetune, results
from convitlab.analysis.locality import locality_rows
from convitlab.analysis.summary import count_flops, count_parameters
from convitlab.data import build_datasets, build_loaders, mix_batch, mixing_enabled, write_subset_csv
from convitlab.data.seeds import mix_rng
from convitlab.engine.amp import amp_settings
from convitlab.engine.checkpoint import Checkpointer, rng_state
from convitlab.engine.ema import ModelEMA
from convitlab.engine.metrics import Totals, correct_top_k, smoothed_one_hot, soft_target_cross_entropy
from convitlab.engine.optim import base_learning_rate, build_optimizer, learning_rate_at
from convitlab.engine.protocol import plan
from convitlab.errors import UserError
from convitlab.models import create_model
from convitlab.runtime import run_deferred_signals, select_device

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


class Diverged(Exception):
    """The training loss became NaN or infinite."""


def model_kwargs(model_cfg) -> dict:
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    kwargs.pop("name")
    kwargs.pop("pretrained", None)  # a file to load, not a knob of the model (convitlab/finetune.py)
    kwargs["img_size"] = tuple(kwargs["img_size"]) if isinstance(kwargs["img_size"], list) else kwargs["img_size"]
    return kwargs


def build_model(cfg):
    return create_model(cfg.model.name, **model_kwargs(cfg.model))


def seed_everything(seed: int) -> None:
    paddle.seed(seed)
    np.random.seed(seed % 2**32)


@paddle.no_grad()
def evaluate(model, loader, amp_dtype=None):
    """Loss, top-1 and top-5 (percent) over a loader, summed across ranks."""
    model.eval()
    totals = Totals()
    for images, labels in loader:
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


def train_one_epoch(model, loader, optimizer, cfg, state, epoch, protocol, base_lr, num_classes, amp_dtype,
                    scaler, ema):
    """One pass over the training loader; returns the epoch's train metrics and timings."""
    model.train()
    loader.batch_sampler.set_epoch(epoch)
    totals = Totals()
    data_wait, start = 0.0, time.perf_counter()
    smoothing = cfg.trainer.label_smoothing
    mixing = mixing_enabled(cfg.data.augment)
    world = distributed.world_size()
    steps_per_epoch = protocol.steps_per_epoch
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{protocol.epochs}", leave=False, dynamic_ncols=True,
               disable=None if cfg.trainer.progress_bar and distributed.is_main() else True)
    iterator = iter(loader)
    skipped_steps = 0
    for batch_index in range(steps_per_epoch):
        run_deferred_signals(step=state.step)  # a step boundary: a requeue's exit or a stop leaves no op half done
        tick = time.perf_counter()
        images, labels = next(iterator)
        data_wait += time.perf_counter() - tick
        labels = labels.flatten()
        lr = learning_rate_at(state.step, protocol.total_steps, protocol.warmup_steps, base_lr, cfg.schedule)
        optimizer.set_lr(lr)
        if mixing:
            rng = mix_rng(cfg.seed, epoch, batch_index)
            images, targets = mix_batch(images, labels, cfg.data.augment, smoothing, num_classes, rng)
        else:
            targets = smoothed_one_hot(labels, num_classes, smoothing)
        with paddle.amp.auto_cast(enable=amp_dtype is not None, dtype=amp_dtype or "float16"):
            logits = model(images)
        loss = soft_target_cross_entropy(logits.astype("float32"), targets)
        count = labels.shape[0]
        # DataParallel averages the ranks' gradients; weighting each rank's mean by its share
        # of the global batch makes that the gradient of the global batch's mean loss also
        # when a last partial batch (data.drop_last=false) splits unevenly across ranks.
        weight = count * world / loader.batch_sampler.global_batch_size(batch_index)
        objective = loss * weight if weight != 1 else loss
        skipped = False
        if scaler is not None:
            scaler.scale(objective).backward()
            scaler.step(optimizer)
            scaler.update()
            skipped = scaler.last_step_skipped  # a gradient overflow: no update, the scale halved
        else:
            objective.backward()
            optimizer.step()
        optimizer.clear_grad()
        if ema is not None:
            ema.update(model)
        state.step += 1
        if skipped:  # its loss (often NaN) trained nothing: kept out of the epoch's loss and top-1
            skipped_steps += 1
            state.skipped_steps += 1
            totals.add(count)
            if scaler.overflow_unexplained():
                bar.close()
                raise Diverged(f"float16 overflow at every step down to a loss scale of {scaler.loss_scale:g} in "
                               f"epoch {epoch} ({skipped_steps} steps skipped): the loss or its gradients are "
                               "not finite whatever the scale")
        else:
            totals.add(count, loss=loss.detach() * count, top1=correct_top_k(logits.detach(), labels, 1),
                       trained=count)
        if not bar.disable and (batch_index % 10 == 0 or batch_index == steps_per_epoch - 1):
            images_per_s = totals.count / (time.perf_counter() - start)  # this rank's images
            bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")  # syncs: every 10 steps
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - start
    sums, count = totals.reduced()
    trained = sums.get("trained", 0.0)  # images of the steps that updated the model
    if trained and not math.isfinite(sums["loss"]):
        raise Diverged(f"training loss became {sums['loss']} in epoch {epoch}")
    if skipped_steps:
        log.info("epoch %d: %d of %d steps skipped (float16 gradient overflow); loss scale now %g", epoch,
                 skipped_steps, steps_per_epoch, scaler.loss_scale)
    return {"lr": lr, "train_loss": sums["loss"] / trained if trained else math.nan,
            "train_top1": 100 * sums["top1"] / trained if trained else math.nan, "skipped_steps": skipped_steps,
            "epoch_s": elapsed, "img_per_s": count / elapsed, "data_wait_frac": data_wait / elapsed,
            "images": int(count)}


def fit(cfg, run_dir, cfg_hash: str) -> dict:
    """Train per `cfg` in `run_dir` (resuming from its last checkpoint when there is one).

    Returns the result row; only rank 0 writes files.
    """
    run_dir = Path(run_dir)
    main = distributed.is_main()
    device = select_device(cfg.trainer.device)
    amp_dtype, scaler = amp_settings(cfg.trainer.amp, device)
    seed_everything(cfg.seed + distributed.rank())
    data = build_datasets(cfg.data, cfg.seed)
    if data.num_classes != cfg.data.num_classes:
        raise UserError(f"data.num_classes={cfg.data.num_classes} does not match the {data.num_classes} "
                        f"classes found in data.name={cfg.data.name}")
    train_loader, val_loader = build_loaders(data, cfg.data, cfg.seed, distributed.rank(), distributed.world_size())
    if main:
        write_subset_csv(run_dir / "subset.csv", data.subset_indices, data.subset_labels)

    model = build_model(cfg)
    # model.pretrained on a fresh start, frozen layers (before the optimiser, EMA and DataParallel copy anything)
    lr_scale, pretrained_columns = finetune.prepare(cfg, model, run_dir)
    # Wrapped before anything copies the weights (EMA): DataParallel broadcasts rank 0's
    # parameters, so every rank starts from the same model whatever its seed.
    train_model = paddle.DataParallel(model) if distributed.world_size() > 1 else model
    params, flops = count_parameters(model), count_flops(model)
    global_batch = cfg.data.batch_size * distributed.world_size()
    base_lr = base_learning_rate(cfg.optimizer, global_batch)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.trainer.grad_clip, lr_scale)
    ema = ModelEMA(model, cfg.trainer.ema_decay) if cfg.trainer.ema else None
    steps_per_epoch = len(train_loader)
    if cfg.trainer.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.trainer.max_steps_per_epoch)
    protocol = plan(cfg, steps_per_epoch)
    epochs = protocol.epochs
    checkpoints = Checkpointer(run_dir / "checkpoints", cfg.trainer.keep_checkpoints)
    state = LoopState(world_size=distributed.world_size())
    latest = checkpoints.latest() if cfg.trainer.resume != False else None  # noqa: E712 (auto or true)
    if latest is not None:
        state = LoopState(**{k: v for k, v in checkpoints.load(latest, model, optimizer, ema, scaler).items()
                             if k in LoopState.__dataclass_fields__})
        if state.world_size != distributed.world_size():
            raise UserError(f"{latest} was written by {state.world_size} rank(s), this run has "
                            f"{distributed.world_size()}: resume with the same number of ranks (the global batch "
                            "and schedule depend on it), or set trainer.resume=false to start afresh")
        log.info("resuming from %s (epoch %d of %d)", latest, state.epoch, epochs)
    if main:  # rows past the checkpoint belong to work that is being redone
        results.truncate_after_epoch(run_dir / "metrics.csv", state.epoch)
        results.truncate_after_epoch(run_dir / "locality.csv", state.epoch)
    if cfg.trainer.to_static:
        # The model itself, in place: DataParallel wraps this very object, so it runs the static
        # forward and keeps its gradient all-reduce (tests/test_distributed.py); DataParallel's own
        # forward(*inputs) cannot be converted (to_static raised "requires 0 arguments").
        paddle.jit.to_static(model)
    probe = _locality_probe(data.val, cfg.trainer.locality_batch_size) if cfg.trainer.measure_locality else None
    writer = _visualdl_writer(run_dir) if main else None

    row = {"params": params, "flops": flops, "epochs": epochs, "status": "running", **pretrained_columns}
    pending = []  # metrics rows of the epochs since the last checkpoint, written with the next one
    try:
        for epoch in range(state.epoch + 1, epochs + 1):
            train = train_one_epoch(train_model, train_loader, optimizer, cfg, state, epoch, protocol, base_lr,
                                    data.num_classes, amp_dtype, scaler, ema)
            state.epoch = epoch
            state.train_time_s += train["epoch_s"]
            state.train_images += train["images"]
            metrics = {"epoch": epoch, **{k: v for k, v in train.items() if k != "images"}}
            improved, locality = False, []
            pending.append(metrics)
            if protocol.evaluates(epoch):
                # With EMA on, the EMA weights are the model that is evaluated, measured and kept as best.
                with ema.swapped_into(model) if ema is not None else contextlib.nullcontext():
                    val = evaluate(model, val_loader, amp_dtype)
                    improved = val["val_top1"] > state.best_top1
                    if main and probe is not None:
                        locality = [{"epoch": epoch, **r} for r in locality_rows(model, probe)]
                    if main and improved and cfg.trainer.save_best:
                        # Before the epoch's checkpoint: once that exists, a restart never comes back here.
                        checkpoints.save_best(model)
                metrics.update(val)
                if improved:
                    state.best_top1, state.best_epoch = val["val_top1"], epoch
                log.info("epoch %d/%d  train loss %.4f  val top-1 %.2f%%  top-5 %.2f%%  %.0f img/s", epoch, epochs,
                         metrics["train_loss"], val["val_top1"], val["val_top5"], train["img_per_s"])
            if main:
                _log_epoch(writer, metrics, locality)
                if locality:
                    results.append_rows(run_dir / "locality.csv", locality, results.LOCALITY_COLUMNS)
            if protocol.evaluates(epoch):
                # Checkpoints follow evaluations (once per full-data epoch's worth of images): a
                # 5.7M-parameter model checkpointed after each of 500 short passes spent a quarter
                # of its time writing them. A resume redoes at most one interval, exactly.
                rng_states = distributed.gather_objects(rng_state())  # every rank takes part
                if main:
                    results.append_rows(run_dir / "metrics.csv", pending, results.METRIC_COLUMNS)
                    checkpoints.save(epoch, model, optimizer, asdict(state), rng_states, ema, scaler)
                pending = []
                distributed.barrier()
        row["status"] = "completed"
    except Diverged as exc:
        log.error("%s: stopping; the last good checkpoint is kept", exc)
        row.update(status="diverged", error=str(exc))
        if main and pending:  # the epochs that completed before it, for the record
            results.append_rows(run_dir / "metrics.csv", pending, results.METRIC_COLUMNS)
    finally:
        if writer is not None:
            _log_hparams(writer, cfg, state)
            writer.close()
    # (none yet when a run diverges in its first epoch)
    rows = results.read_rows(run_dir / "metrics.csv") if main and (run_dir / "metrics.csv").exists() else []
    last = rows[-1] if rows else {}
    evaluated = [r for r in rows if r.get("val_top1") is not None]
    last_eval = evaluated[-1] if evaluated else {}  # a diverged run may stop between evaluations
    evaluated_once = state.best_epoch > 0
    row.update(top1=last_eval.get("val_top1"), top5=last_eval.get("val_top5"),
               best_top1=state.best_top1 if evaluated_once else None,
               best_epoch=state.best_epoch if evaluated_once else None, final_val_loss=last_eval.get("val_loss"),
               final_train_loss=last.get("train_loss"), images_seen=state.train_images, train_time_s=state.train_time_s,
               skipped_steps=state.skipped_steps,
               img_per_s=state.train_images / state.train_time_s if state.train_time_s else None)
    return row


def _locality_probe(dataset, size):
    """A fixed batch of validation images, so locality is measured on the same inputs each epoch."""
    size = min(size, len(dataset))
    if size == 0:
        return None
    return paddle.to_tensor(np.stack([dataset[i][0] for i in range(size)]))


def _visualdl_writer(run_dir):
    return LogWriter(logdir=str(run_dir / "vdl"))


def _log_epoch(writer, metrics, locality):
    epoch = metrics["epoch"]
    for key in ("lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "img_per_s"):
        if key not in metrics:  # not an evaluation epoch
            continue
        group = "train" if key.startswith("train") or key in ("lr", "img_per_s") else "val"
        writer.add_scalar(f"{group}/{key}", metrics[key], epoch)
    layers = sorted({r["layer"] for r in locality})
    for layer in layers:
        heads = [r for r in locality if r["layer"] == layer]
        writer.add_scalar(f"nonlocality/layer_{layer:02d}", float(np.mean([r["nonlocality"] for r in heads])), epoch)
        for r in heads:
            if math.isfinite(r["gate"]):
                writer.add_scalar(f"gate/layer_{layer:02d}_head_{r['head']:02d}", r["gate"], epoch)


def _log_hparams(writer, cfg, state):
    hparams = {"model": cfg.model.name, "dataset": cfg.data.name, "fraction": float(cfg.data.fraction),
               "locality_strength": float(cfg.model.locality_strength),
               "local_up_to_layer": int(cfg.model.local_up_to_layer), "lr": float(cfg.optimizer.lr),
               "seed": int(cfg.seed)}
    writer.add_hparams(hparams, ["val/val_top1", "val/val_loss"])
