"""Training and validation loaders: paddle.io.DataLoader driven by this project's batch samplers.

The training sampler yields (epoch, position) keys, so the epoch reaches the augmentation in
whichever process reads the image: batches are the same for any num_workers and after a rebuild.
"""
import multiprocessing
import shutil
import signal

import numpy as np
import paddle

from convitlab.core.errors import UserError
from convitlab.data.seeds import shuffle_rng
from convitlab.data.transforms import image_size_pair

PREFETCH_FACTOR = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainBatchSampler:
    """One rank's batches of an epoch: global batches of batch_size · world_size cut from a
    permutation seeded by (seed, epoch), this rank taking its contiguous slice of each.

    With drop_last the final partial global batch is dropped; without it the batch is split
    across ranks as evenly as possible (dropped only when it has fewer images than ranks, as
    every rank must take a step).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, max_batches=None):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.max_batches = max_batches  # a pass cut short (trainer.max_steps_per_epoch), still read to its end
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch  # fixed for the pass even if set_epoch is called meanwhile
        order = shuffle_rng(self.seed, epoch).permutation(self.num_samples)
        size = self.batch_size * self.world_size
        for start in range(0, len(self) * size, size):  # a global batch: every rank's positions
            yield [(epoch, int(p)) for p in np.array_split(order[start:start + size], self.world_size)[self.rank]]

    def global_batch_size(self, index: int) -> int:
        """The images of the index-th batch over all ranks (fewer than batch_size · world_size
        only for a last partial batch)."""
        size = self.batch_size * self.world_size
        return min(size, self.num_samples - index * size)

    def __len__(self) -> int:
        size = self.batch_size * self.world_size
        full, rest = divmod(self.num_samples, size)
        batches = full + (not self.drop_last and rest >= self.world_size)
        return batches if self.max_batches is None else min(batches, self.max_batches)


class EvalBatchSampler:
    """This rank's contiguous share of the positions 0..n-1, in order, in batches of batch_size."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        share = np.array_split(np.arange(num_samples), world_size)[rank]
        self.batches = [share[i:i + batch_size].tolist() for i in range(0, len(share), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Loader:
    """Batches [images float32 [B, C, H, W], labels int64 [B]] as paddle tensors.

    Paddle's loader hangs (no workers) or hides the message behind a SystemError (workers) when
    reading an item raises, so a failure travels as a batch of its own and is raised here.

    Each pass starts its workers and ends them when the pass ends, however it ends (use
    `with closing(iter(loader))` where a pass may be left early): Paddle ends them only when a
    pass is read to its end, and its loader thread keeps an abandoned pass, with its workers,
    alive until the process exits. Paddle's persistent_workers would avoid the start-up, but it
    waits in 0.5 s sleeps at the start of every pass (experiments/perf/loader_workers.md).
    """

    def __init__(self, dataset, batch_sampler, num_workers: int, use_shared_memory: bool):
        self.batch_sampler = batch_sampler
        if num_workers:
            _plain_start_method()
        self._loader = paddle.io.DataLoader(_FailuresAsItems(dataset), batch_sampler=batch_sampler,
                                            num_workers=num_workers, collate_fn=_collate,
                                            use_shared_memory=use_shared_memory, prefetch_factor=PREFETCH_FACTOR,
                                            worker_init_fn=_leave_stop_signals_to_the_main_process)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        # Stop signals wait while the workers are forked: a worker takes Paddle's handlers before
        # its init function ignores them, and one that got a group's SIGTERM in between would die.
        # Blocked, the signal waits: the workers drop it once they ignore it, the main process
        # takes it when the mask is restored (and Paddle's reader thread never takes it).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            batches = iter(self._loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        try:
            for batch in batches:
                if isinstance(batch, dict):
                    message = bytes(batch["message"].numpy()).decode()
                    raise UserError(message) if batch["user_error"].numpy().item() else RuntimeError(message)
                yield batch
        finally:
            end_workers(batches)


def end_workers(batches) -> None:
    """End the worker processes (and the reader thread) of a Paddle loader's pass that was not
    read to its end; a pass read to its end has ended them already.

    Paddle has no public call for it: `_try_shutdown_all` is what its own end of a pass calls
    (paddle/io/dataloader/dataloader_iter.py); tests/test_private_apis.py fails if it moves.
    Every pass must end here or at its end: its workers ignore SIGTERM, so multiprocessing's
    terminate() at exit could not end a forgotten one."""
    shutdown = getattr(batches, "_try_shutdown_all", None)  # private API: _DataLoaderIterMultiProcess._try_shutdown_all
    if shutdown is not None:
        shutdown()


def _plain_start_method() -> None:
    """Paddle starts its workers with multiprocessing's default start method. A joblib job (Hydra's
    joblib launcher) runs in a loky process, which makes that loky's own, whose Popen cannot start
    Paddle's workers ("'Process' object has no attribute 'env'"): go back to the platform's."""
    if "loky" in (multiprocessing.get_start_method(allow_none=True) or ""):
        multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """SIGTERM/SIGINT sent to the process group (scancel, kill -- -PGID, Ctrl-C) reach the workers
    too; a worker killed by one fails the main process with a SystemError before it can stop at a
    step boundary. Workers ignore them: the main process stops and ends its workers, and a worker
    whose main process died exits by itself (Paddle's workers watch their parent)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by Loader.__iter__ while forking


class _Failure:
    def __init__(self, exc: Exception):
        self.user_error = isinstance(exc, UserError)
        self.message = str(exc) if self.user_error else f"{type(exc).__name__}: {exc}"


class _FailuresAsItems(paddle.io.Dataset):
    """The dataset's items, or a _Failure in place of one whose reading raised."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except Exception as exc:  # noqa: BLE001  (re-raised in the main process by Loader)
            return _Failure(exc)


def _collate(items):
    for item in items:
        if isinstance(item, _Failure):
            return {"message": np.frombuffer(item.message.encode(), dtype=np.uint8),
                    "user_error": np.array([item.user_error], dtype=np.int64)}
    return [np.stack([image for image, _ in items]), np.array([label for _, label in items], dtype=np.int64)]


def _shared_memory_fits(data_cfg, batch_size: int) -> bool:
    """Whether /dev/shm has room for the batches the workers keep in flight (it is small in many containers)."""
    if data_cfg.num_workers == 0:
        return False
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return False
    height, width = image_size_pair(data_cfg.img_size)
    batch_bytes = 4 * data_cfg.in_chans * height * width * batch_size
    return free > 2 * batch_bytes * data_cfg.num_workers * PREFETCH_FACTOR


def build_loaders(data, data_cfg, seed: int, rank: int = 0, world_size: int = 1, max_batches=None):
    """(train_loader, val_loader) of this rank; call train_loader.batch_sampler.set_epoch(e) before epoch e.
    A training pass holds at most `max_batches` batches (all when None)."""
    kept, batch_size = len(data.train), data_cfg.batch_size
    if data_cfg.drop_last and batch_size * world_size > kept:
        ranks = f" × {world_size} ranks" if world_size > 1 else ""
        raise UserError(f"data.batch_size={batch_size}{ranks} is more than the {kept} training images kept "
                        f"(data.fraction={data_cfg.fraction}), so every batch would be dropped: lower "
                        "data.batch_size or set data.drop_last=false")
    train = Loader(data.train, TrainBatchSampler(kept, batch_size, seed, rank, world_size, data_cfg.drop_last, max_batches),
                   data_cfg.num_workers, _shared_memory_fits(data_cfg, batch_size))
    return train, build_eval_loader(data.val, data_cfg, rank, world_size)


def build_eval_loader(dataset, data_cfg, rank: int = 0, world_size: int = 1):
    """This rank's loader over every image of `dataset`, in order, in batches of data.eval_batch_size
    (data.batch_size when null); nothing about the training split is needed or checked."""
    eval_batch_size = data_cfg.eval_batch_size or data_cfg.batch_size
    return Loader(dataset, EvalBatchSampler(len(dataset), eval_batch_size, rank, world_size),
                  data_cfg.num_workers, _shared_memory_fits(data_cfg, eval_batch_size))
