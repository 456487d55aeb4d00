"""Hydra callback: what must happen before Hydra writes into a run directory, and after a sweep.

- A single run (and each rank of a distributed launch) takes its run directory's lock
  (engine/run_lock.py) before Hydra writes .hydra/ and the log, so a second process on the same
  directory refuses in one line having touched nothing; SIGTERM/SIGINT stop at a step boundary
  from then on (runtime.stop_at_step_boundaries).
- A sweep process that runs its jobs itself (basic launcher) or shares the terminal's signals
  with its workers (joblib) stops at a signal once its running jobs have stopped, and exits with
  128 + the signal after the sweep's summary is written. Jobs take their own directory's lock
  (engine/run.py), so a job held by another process is reported and skipped.
- A launcher's job process (joblib's worker, submitit's job) never ran train.py's top: it sets
  up the runtime (runtime.setup) when its job starts, before the job loads Paddle.
"""
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from convitlab.atomic import write_text
from convitlab.engine import run_lock
from convitlab.errors import UserError
from convitlab.run_folder import RunFolder, job_folder_name
from convitlab.runtime import setup, signal_name, stop_at_step_boundaries, stop_signal


class RunGuard(Callback):
    def on_job_start(self, config, **kwargs) -> None:
        setup()  # first of the callbacks (conf/hydra/default.yaml); does nothing where Paddle is loaded
        overrides = OmegaConf.select(config, "hydra.job.override_dirname", default=None)
        output_dir = Path(str(OmegaConf.select(config, "hydra.runtime.output_dir", default="")))
        if overrides and output_dir.name == job_folder_name(overrides) != overrides:  # named by a hash
            # the same text whoever writes it, so no lock is needed (the job's is taken later, in run_training)
            write_text(RunFolder(output_dir).job_overrides, overrides + "\n")

    def on_run_start(self, config, **kwargs) -> None:
        stop_at_step_boundaries()
        try:
            run_dir = OmegaConf.select(config, "hydra.run.dir", throw_on_resolution_failure=True)
        except Exception:  # noqa: BLE001  (e.g. a ${hydra:...} that resolves only in the job: locked there)
            return
        if not run_dir:
            return
        try:
            run_lock.RunLock(run_dir).acquire()
        except UserError as exc:  # in use (or no space for the lock file): nothing written
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_start(self, config, **kwargs) -> None:
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        if "submitit" not in launcher.lower():  # submitit's jobs run elsewhere and handle their own signals
            stop_at_step_boundaries()

    def on_multirun_end(self, config, **kwargs) -> None:
        signum = stop_signal()
        if signum:  # after the summary: this callback is listed first, so it ends last
            print(f"sweep stopped by {signal_name(signum)}: its stopped jobs say status interrupted in their "
                  "result.csv; run the same command again to resume them (finished jobs are not retrained)",
                  file=sys.stderr)
            sys.exit(128 + signum)
