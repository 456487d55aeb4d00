"""Parallel joblib jobs on a GPU machine, as logic and real file locks on this CPU machine: one
job per GPU at a time whatever order jobs end in, and each job's cached memory released at its
end. tests/test_gpu.py checks the memory release on a real GPU."""
import os
import threading
import time

import paddle
import pytest
from omegaconf import OmegaConf

from convitlab.run import sharing
from convitlab.run.callbacks import GpuPerJob
from convitlab.run.sharing import claim_gpu, slot_order


def test_a_job_prefers_its_own_gpu_then_the_next_free_one():
    assert slot_order(5, 4) == [1, 2, 3, 0]
    assert slot_order(2, 2) == [0, 1]


def test_jobs_ending_unevenly_never_share_a_gpu(tmp_path):
    """Two workers, two GPUs, with the real lock files: the GPU (job number mod 2) rule would have
    put job 2 on GPU 0 beside job 0."""
    job0 = claim_gpu(tmp_path, 0, 2)
    job1 = claim_gpu(tmp_path, 1, 2)
    assert (job0.index, job1.index) == (0, 1)
    job1.release()  # job 1 ends first; its worker takes job 2
    job2 = claim_gpu(tmp_path, 2, 2, timeout_s=0)
    assert job2.index == 1
    with pytest.raises(TimeoutError):  # a third parallel job finds none free
        claim_gpu(tmp_path, 3, 2, poll_s=0.01, timeout_s=0.05)
    job0.release()
    job3 = claim_gpu(tmp_path, 3, 2, timeout_s=0)
    assert job3.index == 0
    for slot in (job2, job3):
        slot.release()
        assert not slot.held


def test_more_jobs_than_gpus_wait_for_a_free_one(tmp_path):
    held = claim_gpu(tmp_path, 0, 1)
    threading.Timer(0.2, held.release).start()
    start = time.monotonic()
    waiting = claim_gpu(tmp_path, 1, 1, poll_s=0.02, timeout_s=30)
    assert waiting.index == 0 and time.monotonic() - start >= 0.15
    waiting.release()


def job_config(sweep_dir, num, launcher="hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
               device="auto"):
    return OmegaConf.create({"trainer": {"device": device},
                             "hydra": {"launcher": {"_target_": launcher}, "job": {"num": num},
                                       "sweep": {"dir": str(sweep_dir)}}})


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """Paddle reporting 2 GPUs; empty_cache recorded."""
    emptied = []
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(paddle.device.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setenv("FLAGS_selected_gpus", "0")
    yield emptied
    sharing.release_job_gpu()


def test_the_hydra_callback_gives_each_job_a_free_gpu_and_frees_it_after(tmp_path, two_fake_gpus):
    callback = GpuPerJob()
    callback.on_job_start(job_config(tmp_path, 1))
    assert os.environ["FLAGS_selected_gpus"] == "1"
    assert (tmp_path / ".gpu_slots" / "gpu1.lock").read_text().startswith("job 1, pid")
    other_worker = claim_gpu(tmp_path / ".gpu_slots", 0, 2)  # job 0 runs in another process on GPU 0
    callback.on_job_end(job_config(tmp_path, 1))
    assert two_fake_gpus == [True]  # the allocator's cache released between jobs
    callback.on_job_start(job_config(tmp_path, 2))  # this worker's next job: 2 mod 2 = 0 is taken
    assert os.environ["FLAGS_selected_gpus"] == "1"
    other_worker.release()
    callback.on_job_end(job_config(tmp_path, 2))


@pytest.mark.parametrize("launcher, device", [("hydra._internal.core_plugins.basic_launcher.BasicLauncher", "auto"),
                                              ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                                               "auto"),
                                              ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
                                               "cpu")])
def test_no_gpu_is_claimed_outside_joblib_or_for_cpu_jobs(tmp_path, two_fake_gpus, launcher, device):
    GpuPerJob().on_job_start(job_config(tmp_path, 1, launcher, device))
    assert os.environ["FLAGS_selected_gpus"] == "0" and not (tmp_path / ".gpu_slots").exists()


def test_the_callback_is_registered_for_every_run():
    from helpers import ROOT

    hydra_cfg = OmegaConf.load(ROOT / "conf" / "hydra" / "default.yaml")
    assert hydra_cfg.callbacks.gpu_per_job._target_ == "convitlab.run.callbacks.GpuPerJob"
