"""Parallel sweep jobs on one machine: each job's share of the cores (share_machine_between_jobs),
and on a GPU machine (hydra/launcher=joblib) one job per GPU at a time, the GPU memory a job
cached released when it ends (the Hydra callback run.callbacks.GpuPerJob).

Giving job k the GPU k mod (GPU count) put two jobs on one GPU as soon as jobs ended unevenly
(with 2 GPUs: job 1 ends first, its worker takes job 2, GPU 0, where job 0 still runs). A job
takes a free GPU instead: each GPU is a lock file `gpu<i>.lock` in the sweep directory's
`.gpu_slots/`, held (flock) for the job's length; the job tries its preferred GPU (k mod count)
first, then the others in turn, and waits when all are taken (more parallel jobs than GPUs).
The kernel drops a lock when its process dies however it dies.

joblib's worker processes are reused from job to job: at a job's end (Hydra's on_job_end) the
GPU is given back and the memory Paddle's allocator cached for the job is released
(paddle.device.cuda.empty_cache). The CUDA context itself stays with the worker process.
"""
import errno
import fcntl
import gc
import logging
import os
import time
from pathlib import Path

from convitlab.ops.runtime import available_cores, cpu_threads, set_cpu_threads

log = logging.getLogger(__name__)
SLOTS_DIR = ".gpu_slots"
POLL_S = 1.0


def slot_order(job_num: int, gpu_count: int) -> list:
    """The GPUs a job tries, in order: its own (job number mod count), then the next ones."""
    return [(job_num + i) % gpu_count for i in range(gpu_count)]


class GpuSlot:
    """A GPU held by this process (its lock file open and locked) until release()."""

    def __init__(self, index: int, fd: int):
        self.index, self._fd = index, fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _try_lock(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def claim_gpu(directory, job_num: int, gpu_count: int, poll_s: float = POLL_S, timeout_s=None) -> GpuSlot:
    """Take a free GPU for job `job_num` (its own first), waiting while all are taken.
    TimeoutError after timeout_s (None: wait as long as it takes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    start, said = time.monotonic(), False
    while True:
        for gpu in slot_order(job_num, gpu_count):
            fd = _try_lock(directory / f"gpu{gpu}.lock")
            if fd is not None:
                os.ftruncate(fd, 0)
                os.write(fd, f"job {job_num}, pid {os.getpid()}\n".encode())
                return GpuSlot(gpu, fd)
        if timeout_s is not None and time.monotonic() - start >= timeout_s:
            raise TimeoutError(f"no free GPU among {gpu_count} after {timeout_s} s")
        if not said:
            log.info("job #%d: all %d GPUs are taken by other jobs: waiting for one", job_num, gpu_count)
            said = True
        time.sleep(poll_s)


def visible_gpus() -> int:
    import paddle  # here: a job process imports this callback's module before runtime.setup() runs
    return paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0


def free_device_memory() -> None:
    """Release what Paddle's GPU allocator keeps cached (after the job's objects are collected)."""
    gc.collect()
    if visible_gpus():
        import paddle
        paddle.device.cuda.empty_cache()


_held = {"slot": None}  # the GPU this process holds for its current job


def release_job_gpu() -> None:
    slot = _held["slot"]
    if slot is not None:
        slot.release()
        _held["slot"] = None


def share_machine_between_jobs(hydra_cfg) -> None:
    """Under the joblib launcher, give each parallel job its share of the cores (and, through
    run.callbacks.GpuPerJob, a GPU of its own);
    under submitit, the hydra.launcher.cpus_per_task it asked for (when set)."""
    target = str(hydra_cfg.launcher.get("_target_", "")).lower()
    cores = available_cores()
    if "submitit" in target and hydra_cfg.launcher.get("cpus_per_task"):
        set_cpu_threads(min(int(hydra_cfg.launcher.cpus_per_task), cores))
        log.info("job #%s: %d CPU threads (hydra.launcher.cpus_per_task)", hydra_cfg.job.num, cpu_threads())
        return
    if "joblib" not in target:
        return
    n_jobs = int(hydra_cfg.launcher.get("n_jobs", -1))
    parallel = cores if n_jobs <= 0 else min(n_jobs, cores)
    set_cpu_threads(max(1, cores // parallel))
    log.info("job #%s: %d CPU threads (%d cores shared by %d parallel jobs)", hydra_cfg.job.num, cpu_threads(),
             cores, parallel)
    # The job's GPU: a free one, taken before the job started (run.callbacks.GpuPerJob, a Hydra callback).
