"""The Hydra callbacks (conf/hydra/default.yaml lists them, in this order):

RunGuard: what must happen before Hydra writes into a run directory, and after a sweep.

- A single run (and each rank of a distributed launch) takes its run directory's lock
  (run/lock.py) before Hydra writes .hydra/ and the log, so a second process on the same
  directory refuses in one line having touched nothing; SIGTERM/SIGINT stop at a step boundary
  from then on (core/signals.py).
- A sweep process that runs its jobs itself (basic launcher) or shares the terminal's signals
  with its workers (joblib) stops at a signal once its running jobs have stopped, and exits with
  128 + the signal after the sweep's summary is written. Jobs take their own directory's lock
  (run/launch.py), so a job held by another process is reported and skipped.
- A launcher's job process (joblib's worker, submitit's job) never ran train.py's top: it sets
  up the runtime (ops/runtime.setup) when its job starts, before the job loads Paddle.

GatherSweep: a sweep's summary.csv at its end (results/sweeps.py).
GpuPerJob: one GPU per parallel job, and its cached memory released after it (run/sharing.py).
"""
import logging
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from convitlab.core.errors import UserError
from convitlab.core.files import write_text
from convitlab.core.layout import RunFolder, job_folder_name
from convitlab.core.signals import signal_name, stop_at_step_boundaries, stop_signal
from convitlab.ops.runtime import setup
from convitlab.results.sweeps import gather_sweep
from convitlab.run import lock as run_lock
from convitlab.run.sharing import SLOTS_DIR, _held, claim_gpu, free_device_memory, release_job_gpu, visible_gpus

log = logging.getLogger(__name__)


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


class GatherSweep(Callback):
    """Hydra callback: after a sweep, gather its jobs into summary.csv.

    Hydra skips on_multirun_end when a job raises: reading a sweep gathers it afresh anyway, and
    `compare.py --write-summary` writes the file.
    """

    def on_multirun_end(self, config, **kwargs) -> None:
        path = gather_sweep(config.hydra.sweep.dir)
        log.info("sweep summary: %s (compare with: python src/compare.py %s)", path, path.parent)


class GpuPerJob(Callback):
    """Hydra callback: under the joblib launcher a job takes a free GPU (FLAGS_selected_gpus,
    which runtime.select_device reads) before it starts; every sweep job gives its GPU and the
    memory it cached back when it ends."""

    def on_job_start(self, config, **kwargs) -> None:
        release_job_gpu()  # a previous job of this worker that ended without on_job_end
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        if "joblib" not in launcher.lower() or OmegaConf.select(config, "trainer.device", default="auto") == "cpu":
            return
        count = visible_gpus()
        if not count:
            return
        job_num = int(OmegaConf.select(config, "hydra.job.num", default=0) or 0)
        slots = Path(str(OmegaConf.select(config, "hydra.sweep.dir", default="."))) / SLOTS_DIR
        slot = claim_gpu(slots, job_num, count)
        _held["slot"] = slot
        os.environ["FLAGS_selected_gpus"] = str(slot.index)
        log.info("job #%d: GPU %d (one job per GPU; %d visible)", job_num, slot.index, count)

    def on_job_end(self, config, **kwargs) -> None:
        release_job_gpu()
        free_device_memory()
