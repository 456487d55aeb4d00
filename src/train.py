"""Train one model, or sweep many with -m: `python src/train.py [group=option] [key=value ...]`.

config (Hydra composes conf/) → validation → data → model → training loop → result tables.
"""
import logging
import shlex
import sys
import time
from pathlib import Path

from convitlab.ops import runtime

runtime.setup()  # first: Paddle must load after it (threads, MKL's code path, Paddle's flags)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402

from convitlab.config import register_configs  # noqa: E402
from convitlab.config_errors import report_composition_errors_in_one_line  # noqa: E402
from convitlab.core import distributed  # noqa: E402
from convitlab.core.errors import describe_error  # noqa: E402
from convitlab.core.layout import BEST, RunFolder  # noqa: E402
from convitlab.core.signals import Interrupted, defer_signal_handlers, signal_name, stop_at_step_boundaries, stop_signal  # noqa: E402
from convitlab.run.lock import RunDirInUse  # noqa: E402
from convitlab.run.sharing import share_machine_between_jobs  # noqa: E402

log = logging.getLogger("convitlab.train")
register_configs()
report_composition_errors_in_one_line()


def resume_command(run_dir) -> str:
    """This command again, on the same run directory (the default one is named by the time)."""
    args = [a for a in sys.argv[1:] if not a.lstrip("+").startswith(("hydra.run.dir=", "trainer.resume="))]
    return shlex.join(["python", sys.argv[0], *args, f"hydra.run.dir={run_dir}"])


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def closing_lines(cfg, row, run_dir, wall_s, best_weights) -> str:
    """What a single run prints last: its outcome, where it is, and what to run next."""
    top1, best, best_epoch = row.get("top1"), row.get("best_top1"), row.get("best_epoch")
    outcome = (f"top-1 {top1:.2f}% at the end, best {best:.2f}% after epoch {best_epoch} of {row.get('epochs')}"
               if top1 is not None and best is not None else "no evaluation")
    trained = row.get("train_time_s")
    times = (f"trained for {duration(trained)}, this command took {duration(wall_s)}" if trained is not None
             else f"this command took {duration(wall_s)}")
    lines = [f"{row.get('status')}: {cfg.model.name} on {cfg.data.name} (data.fraction={cfg.data.fraction}), "
             f"{outcome}; {times}",
             f"run directory: {run_dir}",
             f"compare: python src/compare.py {shlex.quote(str(run_dir))} <other runs or sweeps>"]
    if Path(best_weights).is_file():  # not with trainer.save_best=false
        lines.append(f"evaluate its best weights: python src/eval.py run={shlex.quote(str(run_dir))} "
                     "[data.root=<elsewhere>]")
    return "\n".join(lines)


def diverged(row, run_dir) -> str:
    return (f"run in {run_dir} diverged ({row.get('error') or 'a loss that is not finite'}): lower optimizer.lr "
            "or set trainer.grad_clip, then run again in another hydra.run.dir or with trainer.resume=false")


def interrupted(exc) -> str:
    done = getattr(exc, "epochs_done", None)
    kept = (f"{'epoch 1 is' if done == 1 else f'epochs 1-{done} are'} kept (checkpoints/epoch_{done:04d})" if done else
            "no epoch was completed" if done == 0 else "its last checkpoint is kept")
    return f"interrupted by {signal_name(exc.signum)}: {kept}"


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg):
    # Here: a launcher's job process unpickles main before RunGuard.on_job_start sets the runtime up, and this loads Paddle.
    from convitlab.run.launch import run_training

    logging.raiseExceptions = False  # a log that cannot be written (a full disk) must not bury the error
    stop_at_step_boundaries()  # SIGTERM, SIGINT: stop at the next step boundary, result.csv says interrupted
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        share_machine_between_jobs(hydra_cfg)
        defer_signal_handlers()  # submitit's preemption/time-limit signal: requeue between steps
        if stop_signal():  # an earlier job of this process was stopped: the sweep is stopping
            print(f"job {run_dir} not started: the sweep was stopped by {signal_name(stop_signal())}",
                  file=sys.stderr)
            return None
    started = time.monotonic()
    try:
        row = run_training(cfg, run_dir, list(hydra_cfg.overrides.task))
    except RunDirInUse as exc:  # nothing was written
        if multirun:  # the job that process runs is left to it; the other jobs carry on
            print(f"job {run_dir} skipped: in use by {exc.holder_text}", file=sys.stderr)
            return None
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as exc:  # result.csv says "interrupted"
        if multirun:  # the sweep says how to resume, when it ends
            log.warning("job %s %s", run_dir, interrupted(exc))
            return None
        print(f"{interrupted(exc)}; resume with: {resume_command(run_dir)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001  (every failure is reported in one line)
        message = describe_error(exc)
        if multirun:  # the job's result.csv says "failed"; the other jobs carry on
            log.error("job failed: %s", message)
            return None
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    if multirun:  # a diverged job is a result of the sweep: the sweep carries on
        return row.get("top1")
    if row.get("status") == "diverged":  # finished, but not a result to use: the command failed
        print(f"error: {diverged(row, run_dir)}", file=sys.stderr)
        sys.exit(2)
    if distributed.is_main():
        best_weights = RunFolder(run_dir).checkpoints / BEST
        print(closing_lines(cfg, row, run_dir, time.monotonic() - started, best_weights))
    return row.get("top1")


if __name__ == "__main__":
    main()
