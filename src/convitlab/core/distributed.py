"""Data-parallel training with paddle.distributed: who this process is, and reductions.

Started by `python -m paddle.distributed.launch`, each rank sees PADDLE_TRAINER_ID and
PADDLE_TRAINERS_NUM; a plain `python src/train.py` is rank 0 of a world of 1.
Paddle is imported inside the functions: run/lock.py and ops/runtime.py use this module before
runtime.setup() has loaded Paddle (in a launcher's job process, in setup's own module).
"""
import os

import numpy as np


def world_size() -> int:
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def rank() -> int:
    return int(os.environ.get("PADDLE_TRAINER_ID", "0"))


def is_main() -> bool:
    return rank() == 0


_initialised = False


def init() -> None:
    """Join the process group once when launched with several ranks."""
    global _initialised
    if world_size() > 1 and not _initialised:
        import paddle.distributed as dist
        dist.init_parallel_env()
        _initialised = True


def sum_across_ranks(values):
    """Element-wise sum of a list of floats over all ranks (identity for one rank)."""
    if world_size() == 1:
        return list(values)
    import paddle
    import paddle.distributed as dist
    tensor = paddle.to_tensor(np.asarray(values, dtype=np.float64))
    dist.all_reduce(tensor)
    return tensor.numpy().tolist()


def gather_objects(obj) -> list:
    """Every rank's Python object, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    import paddle.distributed as dist
    gathered = []
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if world_size() > 1:
        import paddle.distributed as dist
        dist.barrier()
