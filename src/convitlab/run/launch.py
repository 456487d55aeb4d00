"""One run of the entry point: validate, skip or resume, train, and always leave a result row."""
import logging
from pathlib import Path

from omegaconf import OmegaConf

from convitlab.config import config_hash, validate
from convitlab.core import distributed, tables
from convitlab.core.errors import one_line
from convitlab.core.files import find_disk_full, remove_temporaries, write_text
from convitlab.core.layout import RunFolder
from convitlab.core.signals import Interrupted, signal_name
from convitlab.run import lock as run_lock
from convitlab.run.record import RunRecord, first_row, identity_row

log = logging.getLogger(__name__)
FINISHED = ("completed", "diverged")


def run_training(cfg, run_dir, overrides=()) -> dict:
    """Train the run described by `cfg` in `run_dir` and return its result row.

    The run directory is held for the whole run (run/lock.py): another process holding
    it raises RunDirInUse before anything is written. A finished run with the same config is
    reported, not retrained (unless trainer.resume=false); any failure still writes result.csv
    with status "failed" and the error in one line, then re-raises; a stop (Interrupted, or
    submitit's exit for a requeue) writes status "interrupted" and the epochs kept.
    """
    run_dir = Path(run_dir)
    with run_lock.hold(run_dir) as lock:
        if lock.taken_over:
            log.warning("the lock of %s was left by %s, which is gone: taken over", run_dir,
                        run_lock.describe(lock.taken_over))
            lock.taken_over = None
        return _run_training(cfg, run_dir, overrides)


def _run_training(cfg, run_dir: Path, overrides) -> dict:
    distributed.init()
    main = distributed.is_main()
    folder = RunFolder(run_dir)
    record = RunRecord(run_dir)
    row = first_row(run_dir, tables.TRAIN, overrides)  # every column of the schema, in order
    cfg_hash = None
    try:
        from convitlab.engine.checkpoint import Checkpointer  # inside: an import failure is a failed run too
        from convitlab.engine.protocol import total_epochs
        from convitlab.engine.trainer import fit

        if main:  # the run's own, under its lock: what a killed write left
            removed = Checkpointer(folder.checkpoints).remove_leftovers() + remove_temporaries(run_dir)
            if removed:
                log.info("removed the temporary files of an interrupted write: %s",
                         ", ".join(str(p.relative_to(run_dir)) for p in removed))
        validate(cfg)
        cfg_hash = config_hash(cfg)
        row.update(identity_row(cfg, run_dir, cfg_hash, overrides))
        row["epochs"] = total_epochs(cfg)  # after the identity: a refused plan's failed row still says which run
        fresh = cfg.trainer.resume is False
        previous = tables.read_result(run_dir)
        if not fresh:
            if previous and previous.get("status") in FINISHED and previous.get("config_hash") == cfg_hash:
                log.info("run in %s already %s (top-1 %s): not retrained; trainer.resume=false retrains it",
                         run_dir, previous["status"], previous.get("top1"))
                return previous
        if main:
            # Another config's run that trained nothing (it failed its checks, or was stopped before
            # its first checkpoint) leaves nothing to keep: the directory is this run's.
            stale = record.stored_hash() not in (None, cfg_hash) and not trained_anything(folder, previous)
            if stale:
                log.info("run directory %s held a run of another config that trained nothing (%s): replaced",
                         run_dir, (previous or {}).get("status", "no result"))
            if fresh or stale:
                folder.clear_outputs()
            record.claim(cfg_hash, overwrite=fresh or stale)
            write_text(folder.config, OmegaConf.to_yaml(cfg, resolve=True))
        distributed.barrier()
        row.update(fit(cfg, run_dir, identity=row))
    except BaseException as exc:
        stopped = isinstance(exc, (Interrupted, SystemExit))  # SystemExit: submitit's requeue
        full = None if stopped else find_disk_full(exc, run_dir)
        # Never overwrite the result of a run that belongs to another config.
        if main and record.stored_hash() in (None, cfg_hash):
            outcome = (interrupted_outcome(run_dir, exc, row.get("epochs")) if stopped else
                       {"status": "failed", "error": str(full) if full is not None else one_line(exc)})
            try:
                tables.write_result(run_dir, {**row, **outcome})
            except OSError as write_error:  # e.g. the disk is still full: the first error is the one to report
                log.error("result.csv not written: %s", one_line(write_error))
        if full is not None and full is not exc:
            raise full from None
        raise
    if main:
        tables.write_result(run_dir, row)
    return row


def trained_anything(folder: RunFolder, previous) -> bool:
    """Whether a run directory holds work of its run: a checkpoint, or a finished result."""
    from convitlab.engine.checkpoint import Checkpointer  # here, as in run_training

    return bool(Checkpointer(folder.checkpoints).generations()) or (previous or {}).get("status") in FINISHED


def interrupted_outcome(run_dir: Path, exc: BaseException, epochs) -> dict:
    """result.csv's outcome columns for a stopped run: status "interrupted", how far its last
    checkpoint got (what a resume starts from) and what stopped it. Sets exc.epochs_done."""
    from convitlab.engine.checkpoint import Checkpointer  # here, as in run_training

    state = Checkpointer(RunFolder(run_dir).checkpoints).latest_state()
    done = int(state.get("epoch", 0))
    exc.epochs_done = done
    cause = signal_name(exc.signum) if isinstance(exc, Interrupted) else f"a requeue ({one_line(exc)})"
    kept = (f"{'epoch 1' if done == 1 else f'epochs 1-{done}'} of {epochs} kept in checkpoints/epoch_{done:04d}"
            if done else "no epoch completed")
    best = state.get("best_epoch") or None
    return {"status": "interrupted", "epochs_done": done, "error": f"stopped by {cause}: {kept}; the same command "
            "resumes it", "best_top1": state.get("best_top1") if best else None, "best_epoch": best,
            "images_seen": state.get("train_images"), "train_time_s": state.get("train_time_s")}
