"""Mixed precision without a GPU: the fp16 loss scaler forced on by hand on the CPU (Paddle's
GradScaler switches itself off there), gradient overflows made by an infinite loss, and the
refusal of an amp type the GPU cannot run. tests/test_gpu.py runs the same on a real GPU."""
import math
from unittest import mock

import numpy as np
import paddle
import paddle.amp.grad_scaler as grad_scaler
import pytest
from helpers import QUICK, compose_train, read_csv
from omegaconf import OmegaConf

from convitlab.config import OptimizerConfig
from convitlab.core.errors import UserError
from convitlab.engine import amp, trainer
from convitlab.engine.amp import LossScaler, amp_unsupported_reason, check_amp_supported
from convitlab.engine.optim import build_optimizer


def forced_scaler(**kwargs):
    """A LossScaler switched on although this is the CPU (the place check skipped)."""
    with mock.patch.object(grad_scaler, "in_dynamic_mode", return_value=False):
        scaler = LossScaler(**kwargs)
    assert scaler.is_enable()
    return scaler


def weights(model):
    return [p.numpy().copy() for p in model.parameters()]


def scaled_step(model, optimizer, scaler, loss_factor=1.0):
    with paddle.amp.auto_cast(enable=False, dtype="float16"):  # sets Paddle's amp dtype, as training does
        out = model(paddle.ones([4, 3]))
    loss = out.square().mean() * loss_factor
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.clear_grad()


@pytest.mark.parametrize("name, grad_clip", [("adamw", None), ("adamw", 1.0), ("adam", None), ("sgd", None),
                                             ("sgd", 1.0)])
def test_an_overflow_skips_the_update_halves_the_scale_and_training_goes_on(name, grad_clip):
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.Linear(4, 2))
    cfg = OmegaConf.merge(OmegaConf.structured(OptimizerConfig), {"name": name, "lr": 0.1})
    optimizer = build_optimizer(model, cfg, grad_clip)
    scaler = forced_scaler(init_loss_scaling=1024.0)

    scaled_step(model, optimizer, scaler)
    assert not scaler.last_step_skipped and scaler.loss_scale == 1024.0
    before = weights(model)
    scaled_step(model, optimizer, scaler, loss_factor=math.inf)  # Paddle's own update raised TypeError here
    assert scaler.last_step_skipped and scaler.skipped_steps == 1
    for old, new in zip(before, weights(model)):
        np.testing.assert_array_equal(new, old)  # the update was skipped
    assert scaler.loss_scale == 512.0 and scaler._scale.numpy().tolist() == [512.0]
    scaled_step(model, optimizer, scaler)  # no "step() has already been called": the update completed
    assert not scaler.last_step_skipped and scaler.skipped_steps == 1
    assert any(not np.array_equal(a, b) for a, b in zip(before, weights(model)))


def test_the_scale_grows_after_clean_steps_and_survives_a_checkpoint():
    model = paddle.nn.Linear(3, 2)
    optimizer = paddle.optimizer.SGD(learning_rate=0.01, parameters=model.parameters())
    scaler = forced_scaler(init_loss_scaling=8.0, incr_every_n_steps=2)
    for _ in range(2):
        scaled_step(model, optimizer, scaler)
    assert scaler.loss_scale == 16.0 and scaler._scale.numpy().tolist() == [16.0]
    scaled_step(model, optimizer, scaler, loss_factor=math.nan)
    assert scaler.loss_scale == 8.0
    restored = forced_scaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.loss_scale == 8.0 and restored.state_dict()["scale"].tolist() == [8.0]


def test_overflow_is_unexplained_only_below_a_scale_of_one():
    scaler = forced_scaler(init_loss_scaling=2.0)
    model = paddle.nn.Linear(3, 2)
    optimizer = paddle.optimizer.SGD(learning_rate=0.01, parameters=model.parameters())
    scaled_step(model, optimizer, scaler, loss_factor=math.inf)
    assert scaler.loss_scale == 1.0 and not scaler.overflow_unexplained()
    scaled_step(model, optimizer, scaler, loss_factor=math.inf)
    assert scaler.loss_scale == 0.5 and scaler.overflow_unexplained()


@pytest.mark.parametrize("kind, capability, cuda, expected", [
    ("fp16", (6, 1), "11.8", "compute capability >= 7.0"),   # Pascal: auto_cast would switch itself off
    ("fp16", (7, 0), "11.8", None),                          # V100
    ("bf16", (7, 5), "12.6", "compute capability >= 8.0"),   # T4
    ("bf16", (8, 0), "10.2", "CUDA >= 11"),
    ("bf16", (8, 6), "12.6", None),                          # Ampere
    ("bf16", (9, 0), "12.9", None),                          # Hopper
    ("off", (3, 7), "10.2", None),
])
def test_which_gpu_runs_which_amp(kind, capability, cuda, expected):
    reason = amp_unsupported_reason(kind, capability, cuda)
    assert reason is None if expected is None else expected in reason


def test_bf16_on_a_gpu_without_it_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(paddle.device.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(paddle.device.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(paddle.version, "cuda", lambda: "12.6")
    with pytest.raises(UserError) as bf16:
        check_amp_supported("bf16", "gpu")
    message = str(bf16.value)
    assert "\n" not in message and "trainer.amp='bf16'" in message and "Tesla V100" in message
    assert "7.0" in message and "use trainer.amp=fp16" in message
    check_amp_supported("fp16", "gpu")  # fp16 runs on a V100
    monkeypatch.setattr(paddle.device.cuda, "get_device_capability", lambda device=None: (6, 0))
    with pytest.raises(UserError, match="trainer.amp='fp16'.*use trainer.amp=off"):
        check_amp_supported("fp16", "gpu")
    with pytest.raises(UserError, match="needs a GPU"):
        check_amp_supported("bf16", "cpu")


# --- the training loop with the scaler forced on -------------------------------------------------

def run_with_scaler(tmp_path, monkeypatch, overflow_steps, overrides=(), **scaler_kwargs):
    """Train through the real loop with a forced LossScaler; the loss is infinite at the given
    (1-based) training steps, as an fp16 overflow makes it."""
    from convitlab.run.launch import run_training

    scaler = forced_scaler(**scaler_kwargs)
    monkeypatch.setattr(trainer, "amp_settings", lambda kind, device: (None, scaler))
    real = trainer.soft_target_cross_entropy
    calls = {"n": 0}

    def loss_with_overflows(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * math.inf if calls["n"] in overflow_steps else loss

    monkeypatch.setattr(trainer, "soft_target_cross_entropy", loss_with_overflows)
    return run_training(compose_train(*QUICK, *overrides), tmp_path), scaler


def test_overflow_steps_are_skipped_counted_and_kept_out_of_the_loss(tmp_path, monkeypatch):
    row, scaler = run_with_scaler(tmp_path, monkeypatch, {2, 4})
    assert row["status"] == "completed" and row["skipped_steps"] == 2
    metrics = read_csv(tmp_path / "metrics.csv")
    assert [m["skipped_steps"] for m in metrics] == ["1", "1"]
    assert all(math.isfinite(float(m["train_loss"])) for m in metrics)  # the infinite losses are not in it
    assert read_csv(tmp_path / "result.csv")[0]["skipped_steps"] == "2"
    assert scaler.loss_scale == 2.0 ** 14  # halved twice from 2**16
    # a resume continues the count (LoopState) and the scale (the checkpoint's scaler state)
    import json
    import pickle
    state = json.loads((tmp_path / "checkpoints" / "epoch_0002" / "state.json").read_text())
    assert state["skipped_steps"] == 2
    with open(tmp_path / "checkpoints" / "epoch_0002" / "rng.pkl", "rb") as f:
        assert pickle.load(f)["scaler"]["scale"].tolist() == [2.0 ** 14]


def test_a_run_whose_every_step_overflows_is_diverged(tmp_path, monkeypatch):
    row, scaler = run_with_scaler(tmp_path, monkeypatch, set(range(1, 100)), init_loss_scaling=4.0)
    assert row["status"] == "diverged" and row["skipped_steps"] == 3  # 4 -> 2 -> 1 -> 0.5: below 1
    assert "loss scale of 0.5 in epoch 1" in row["error"]
    assert read_csv(tmp_path / "result.csv")[0]["status"] == "diverged"


def test_an_epoch_of_overflows_at_a_high_scale_is_not_divergence(tmp_path, monkeypatch):
    """The first steps at 2**16 often overflow: a short epoch made only of them is no divergence."""
    row, _ = run_with_scaler(tmp_path, monkeypatch, {1, 2, 3})
    assert row["status"] == "completed" and row["skipped_steps"] == 3
    first, second = read_csv(tmp_path / "metrics.csv")
    assert first["skipped_steps"] == "3" and first["train_loss"] == "nan"  # nothing trained in epoch 1
    assert second["skipped_steps"] == "0" and math.isfinite(float(second["train_loss"]))


def test_amp_settings_on_the_cpu_refuses_and_off_needs_nothing():
    assert amp.amp_settings("off", "cpu") == (None, None)
    with pytest.raises(UserError, match="trainer.amp='fp16' needs a GPU"):
        amp.amp_settings("fp16", "cpu")
