"""RNG states in checkpoints across devices: the CPU generator for real, and GPU generators
fabricated as Paddle exposes them (one state per visible GPU, a state list of another length
refused), so a 4-GPU checkpoint resumed on 1 GPU, or a CPU one on a GPU, is checked here.
tests/test_gpu.py restores a real CUDA state."""
import logging

import numpy as np
import paddle
import pytest

from convitlab.engine import rng
from convitlab.engine.checkpoint import Checkpointer


class FakeGenerators:
    """`visible` GPUs, this process on GPU `current` (None: the CPU); states are strings."""

    def __init__(self, visible, current, tag="new"):
        self.cpu = f"{tag}-cpu"
        self.gpus = [f"{tag}-gpu{i}" for i in range(visible)]
        self.current = current

    def cpu_state(self):
        return self.cpu

    def set_cpu_state(self, state):
        self.cpu = state

    def gpu_index(self):
        return self.current

    def gpu_states(self):
        return list(self.gpus)

    def set_gpu_states(self, states):
        if len(states) != len(self.gpus):  # what Paddle's set_cuda_rng_state checks
            raise ValueError("Length of gpu state list should be equal to the gpu device count")
        self.gpus = list(states)


def test_a_rank_of_a_4_gpu_run_resumes_with_one_gpu_visible(caplog):
    saved = rng.capture(FakeGenerators(visible=4, current=3, tag="saved"))
    assert saved == {"format": 2, "cpu": "saved-cpu", "gpu": "saved-gpu3", "gpu_index": 3}
    here = FakeGenerators(visible=1, current=0)
    with caplog.at_level(logging.WARNING):
        assert rng.restore(saved, here) == []
    assert here.cpu == "saved-cpu" and here.gpus == ["saved-gpu3"]  # the rank's stream, on its new GPU
    assert not caplog.records


def test_other_gpus_are_left_as_they_are():
    here = FakeGenerators(visible=4, current=2)
    rng.restore(rng.capture(FakeGenerators(visible=2, current=0, tag="saved")), here)
    assert here.gpus == ["new-gpu0", "new-gpu1", "saved-gpu0", "new-gpu3"]


def test_a_cpu_checkpoint_on_a_gpu_and_back_say_what_was_not_restored(caplog):
    here = FakeGenerators(visible=2, current=1)
    with caplog.at_level(logging.WARNING):
        lost = rng.restore(rng.capture(FakeGenerators(visible=0, current=None, tag="saved")), here)
    assert here.cpu == "saved-cpu" and here.gpus == ["new-gpu0", "new-gpu1"]
    assert lost == ["the stream of GPU 1 (the checkpoint was written on the CPU)"]
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
    assert "not restored for the stream of GPU 1" in caplog.records[0].getMessage()

    on_cpu = FakeGenerators(visible=0, current=None)
    lost = rng.restore(rng.capture(FakeGenerators(visible=1, current=0, tag="saved")), on_cpu)
    assert on_cpu.cpu == "saved-cpu" and lost == ["the GPU's stream (this run is on the CPU)"]


@pytest.mark.parametrize("visible, current, expected_gpus, lost", [
    (4, 1, ["new-gpu0", "old-gpu1", "new-gpu2", "new-gpu3"], ["the CPU generator (an older GPU checkpoint has none)"]),
    (1, 0, ["old-gpu0"], ["the CPU generator (an older GPU checkpoint has none)"]),
    (8, 5, [f"new-gpu{i}" for i in range(8)],
     ["the CPU generator and the stream of GPU 5 (an older checkpoint of 4 visible GPU(s) has only theirs)"]),
])
def test_older_gpu_checkpoints_restore_what_they_hold(visible, current, expected_gpus, lost):
    """Written before format 2 on a 4-GPU machine: paddle.get_rng_state() put the CUDA states
    under "cpu" (and again under "cuda"); restoring them used to need 4 visible GPUs."""
    cuda = [f"old-gpu{i}" for i in range(4)]
    here = FakeGenerators(visible, current)
    assert rng.restore({"cpu": list(cuda), "cuda": list(cuda)}, here) == lost
    assert here.gpus == expected_gpus and here.cpu == "new-cpu"


def test_older_cpu_checkpoints_restore_the_cpu_generator():
    here = FakeGenerators(visible=0, current=None)
    assert rng.restore({"cpu": ["old-cpu"]}, here) == [] and here.cpu == "old-cpu"


@pytest.fixture
def on_cpu():
    """The CPU as the current device, also on a GPU machine (restored after)."""
    previous = paddle.device.get_device()
    paddle.set_device("cpu")
    yield
    paddle.set_device(previous)


def test_the_cpu_generator_round_trips_for_real(tmp_path, on_cpu):
    paddle.seed(7)
    saved = rng.capture()
    assert saved["format"] == 2 and saved["gpu"] is None  # this machine: the CPU
    expected = paddle.rand([5]).numpy()
    paddle.rand([100])
    assert rng.restore(saved) == []
    np.testing.assert_array_equal(paddle.rand([5]).numpy(), expected)

    # ... and through a checkpoint (pickled, as every rank's state is)
    model = paddle.nn.Linear(2, 2)
    optimizer = paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters())
    checkpoints = Checkpointer(tmp_path)
    rng.restore(saved)
    folder = checkpoints.save(1, model, optimizer, {}, [rng.capture()])
    expected = paddle.rand([5]).numpy()
    paddle.rand([100])
    checkpoints.load(folder, model, optimizer)
    np.testing.assert_array_equal(paddle.rand([5]).numpy(), expected)
