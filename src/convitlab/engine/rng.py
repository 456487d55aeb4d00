"""Random-number-generator states for checkpoints, restorable on another device or GPU count.

On a GPU, paddle.get_rng_state() returns one CUDA state per visible GPU and leaves out the CPU
generator, and paddle.set_rng_state() of that list needs the same number of visible GPUs
("Length of gpu state list should be equal to the gpu device count"): restoring that list
would fail for a checkpoint of a 4-GPU run resumed with 1 GPU visible, or one from the CPU on a GPU.

A state here (format 2) holds the CPU generator and the generator of the one GPU this process
runs on. Restoring sets the CPU generator, and the current GPU's generator when both the
checkpoint and this process have a GPU, whatever the GPU's number or how many are visible (a
rank's stream moves with the rank); what cannot be restored is said in one line. States of the
older layout ({"cpu": paddle.get_rng_state(), "cuda": ...}) are read too.
"""
import logging

import paddle

log = logging.getLogger(__name__)

FORMAT = 2


class PaddleGenerators:
    """This process's generators, through Paddle's public API (3.0-3.3)."""

    def cpu_state(self):
        return paddle.get_rng_state("cpu")[0]

    def set_cpu_state(self, state) -> None:
        paddle.set_rng_state([state], "cpu")

    def gpu_index(self):
        """The number of the GPU this process computes on, or None on the CPU."""
        device = paddle.device.get_device()
        if not (paddle.is_compiled_with_cuda() and device.startswith("gpu")):
            return None
        return int(device.partition(":")[2] or 0)

    def gpu_states(self) -> list:
        """One state per visible GPU."""
        return list(paddle.get_cuda_rng_state())

    def set_gpu_states(self, states) -> None:
        paddle.set_cuda_rng_state(list(states))


def capture(generators=None) -> dict:
    """This process's RNG state: {"format": 2, "cpu": state, "gpu": state or None, "gpu_index": int or None}."""
    generators = generators or PaddleGenerators()
    index = generators.gpu_index()
    gpu = generators.gpu_states()[index] if index is not None else None
    return {"format": FORMAT, "cpu": generators.cpu_state(), "gpu": gpu, "gpu_index": index}


def _saved_parts(state, index):
    """(cpu state or None, gpu state or None, what the checkpoint lacks) of a saved state."""
    if state.get("format") == FORMAT:
        return state["cpu"], state.get("gpu"), None
    # The older layout: {"cpu": paddle.get_rng_state()} on the CPU (a one-state list); on a GPU
    # that call returned the CUDA states, so "cpu" held those (as "cuda" did) and no CPU state.
    if "cuda" not in state:
        return state["cpu"][0], None, None
    cuda = list(state["cuda"])
    if index is None:
        return None, cuda[0] if cuda else None, "the CPU generator (an older GPU checkpoint has none)"
    if index < len(cuda):
        return None, cuda[index], "the CPU generator (an older GPU checkpoint has none)"
    return None, None, (f"the CPU generator and the stream of GPU {index} (an older checkpoint of "
                        f"{len(cuda)} visible GPU(s) has only theirs)")


def restore(state, generators=None) -> list:
    """Set this process's generators from a saved state; returns (and logs, in one line) what
    could not be restored. Never raises for a device or GPU count that differs."""
    generators = generators or PaddleGenerators()
    index = generators.gpu_index()
    cpu, gpu, missing = _saved_parts(state, index)
    lost = [missing] if missing else []
    if cpu is not None:
        generators.set_cpu_state(cpu)
    if gpu is not None and index is not None:
        states = generators.gpu_states()
        states[index] = gpu
        generators.set_gpu_states(states)
    elif gpu is not None:
        lost.append("the GPU's stream (this run is on the CPU)")
    elif index is not None and missing is None:
        lost.append(f"the stream of GPU {index} (the checkpoint was written on the CPU)")
    if lost:
        log.warning("resume: random state not restored for %s: dropout and drop path draw other numbers than "
                    "an uninterrupted run would", "; ".join(lost))
    return lost
