"""The GPU paths on a real GPU (`make test-gpu`): they run where Paddle sees a GPU and are skipped,
with the reason, everywhere else.

Written without a GPU to run them on: no GPU with Paddle was reachable when they were written,
so they have not run yet. Every branch they exercise is also tested on the CPU by forcing it
(test_amp.py: the fp16 scaler forced on; test_rng.py: fabricated per-GPU states;
test_attention_paths.py: the fused call under Paddle 3.0's semantics; test_gpu_slots.py: the
joblib GPU slots with a patched GPU count; test_distributed.py: to_static under DataParallel);
these check that a real GPU agrees.
"""
import shutil

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from helpers import QUICK, TRAIN, read_csv, run
from omegaconf import OmegaConf

from convitlab.core.errors import UserError
from convitlab.engine import amp, rng
from convitlab.engine.checkpoint import Checkpointer
from convitlab.models import create_model
from convitlab.ops import backend
from convitlab.ops.runtime import select_device
from convitlab.run.callbacks import GpuPerJob

GPUS = paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0
WHY = ("this Paddle is the CPU build (make setup EXTRAS=gpu,cluster,dev installs the GPU build)"
       if not paddle.is_compiled_with_cuda() else "Paddle sees no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason=f"needs a GPU: {WHY}")]
GPU_QUICK = [*QUICK, "schedule.scale_epochs=false", "trainer.device=gpu"]


@pytest.fixture(autouse=True)
def on_gpu(monkeypatch):
    monkeypatch.delenv("FLAGS_selected_gpus", raising=False)
    previous = paddle.device.get_device()
    paddle.set_device("gpu:0")
    yield
    paddle.set_device(previous)


def capability():
    return tuple(paddle.device.cuda.get_device_capability())[:2]


def small_convit(**kwargs):
    """Head size 48 (the paper's), 32x32 images of 4x4 patches: what the flash kernel takes."""
    paddle.seed(0)
    return create_model("convit_tiny", img_size=32, patch_size=4, num_classes=10, depth=4, local_up_to_layer=2,
                        **kwargs)


def comparable_convit():
    """small_convit in training mode with no stochastic depth or dropout: two passes through it
    compute the same function, so the fused and explicit paths are compared like with like."""
    model = small_convit(drop_path_rate=0.0, drop_rate=0.0, attn_drop_rate=0.0)
    model.train()
    return model


def batch(size=8):
    paddle.seed(1)
    return paddle.randn([size, 3, 32, 32]), paddle.randint(0, 10, [size])


# --- device selection ---------------------------------------------------------------------------

def test_device_selection(monkeypatch):
    assert select_device("auto") == "gpu" and paddle.device.get_device() == "gpu:0"
    monkeypatch.setenv("FLAGS_selected_gpus", str(GPUS - 1))  # what a launcher or a joblib slot sets
    assert select_device("gpu") == "gpu" and paddle.device.get_device() == f"gpu:{GPUS - 1}"
    x = paddle.ones([2])
    assert x.place.is_gpu_place() and x.place.gpu_device_id() == GPUS - 1
    assert select_device("cpu") == "cpu" and paddle.device.get_device() == "cpu"


# --- mixed precision ----------------------------------------------------------------------------

def amp_training(kind, steps=5):
    """A few training steps under trainer.amp=kind as the trainer runs them; returns the dtypes
    the attention saw, the losses, the weights before and after, the model, optimiser and scaler."""
    dtype, scaler = amp.amp_settings(kind, "gpu")
    model = small_convit()
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=model.parameters())
    x, labels = batch()
    seen, real = [], backend.use_fused_attention

    def spy(qkv, head_dim):
        seen.append(qkv.dtype)
        return real(qkv, head_dim)

    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    losses = []
    backend.use_fused_attention = spy
    try:
        for _ in range(steps):
            with paddle.amp.auto_cast(dtype=dtype):
                logits = model(x)
            loss = F.cross_entropy(logits.astype("float32"), labels)
            losses.append(float(loss))
            amp.backward_and_step(loss, optimizer, scaler)
    finally:
        backend.use_fused_attention = real
    return seen, losses, before, model, optimizer, scaler


def test_fp16_training_step_and_an_overflow():
    seen, losses, before, model, optimizer, scaler = amp_training("fp16")
    assert set(seen) == {paddle.float16}  # the attention ran in float16: auto_cast is on
    assert all(np.isfinite(losses)) and scaler.skipped_steps < len(losses)  # the first ones may overflow at 2**16
    assert any(not np.array_equal(p.numpy(), before[n]) for n, p in model.named_parameters())
    skipped_before, scale = scaler.skipped_steps, scaler.loss_scale
    weights = {n: p.numpy().copy() for n, p in model.named_parameters()}
    x, labels = batch()
    with paddle.amp.auto_cast(dtype="float16"):
        loss = F.cross_entropy(model(x).astype("float32"), labels) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()  # Paddle's own update raised TypeError here with NumPy >= 2.4
    optimizer.clear_grad()
    assert scaler.last_step_skipped and scaler.skipped_steps == skipped_before + 1
    assert scaler.loss_scale == scale / 2 and scaler._scale.numpy().tolist() == [scale / 2]
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(p.numpy(), weights[n], err_msg=n)


def test_bf16_training_step_or_its_refusal():
    reason = amp.amp_unsupported_reason("bf16", capability(), paddle.version.cuda(), paddle.is_compiled_with_rocm())
    if reason is not None:  # this GPU would silently run float32: refused in one line
        with pytest.raises(UserError, match="trainer.amp='bf16' is not supported"):
            amp.check_amp_supported("bf16", "gpu")
        return
    seen, losses, before, model, _, scaler = amp_training("bf16")
    assert scaler is None and set(seen) == {paddle.bfloat16}
    assert all(np.isfinite(losses))
    assert any(not np.array_equal(p.numpy(), before[n]) for n, p in model.named_parameters())


@pytest.mark.timeout(600)  # two runs, 300 s each at most
def test_fp16_run_end_to_end_and_its_resume(tmp_path):
    run_dir = tmp_path / "run"
    args = TRAIN + GPU_QUICK + ["trainer.amp=fp16", "model.drop_path_rate=0.1", f"hydra.run.dir={run_dir}"]
    first = run(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    row = read_csv(run_dir / "result.csv")[0]
    assert row["status"] == "completed" and row["skipped_steps"] != ""
    (run_dir / "result.csv").unlink()  # as if killed after epoch 1
    shutil.rmtree(run_dir / "checkpoints" / "epoch_0002")
    again = run(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "resuming from" in log and "random state not restored" not in log
    assert read_csv(run_dir / "result.csv")[0]["status"] == "completed"


# --- fused (flash) attention ----------------------------------------------------------------------

def forward_backward(model, x, labels, fused, monkeypatch):
    monkeypatch.setattr(backend, "FUSED_ATTENTION", fused)
    model.clear_gradients()
    paddle.seed(2)  # each pass draws the same random numbers, if any op of the model draws one
    with paddle.amp.auto_cast(dtype="float16"):
        logits = model(x)
    F.cross_entropy(logits.astype("float32"), labels).backward()
    grads = {n: p.grad.astype("float32").numpy() for n, p in model.named_parameters() if p.grad is not None}
    return logits.astype("float32").numpy(), grads


def test_flash_attention_matches_the_explicit_path_in_fp16(monkeypatch):
    probe = paddle.zeros([1, 4, 3 * 48], dtype="float16")
    if capability() < backend.FLASH_MIN_CAPABILITY:
        assert not backend.use_fused_attention(probe, 48)  # checked: the explicit path is taken
        pytest.skip(f"flash attention needs compute capability >= 8.0; this GPU has {capability()}")
    assert backend.use_fused_attention(probe, 48)
    calls, real = [], F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    # Training mode (the fused call's training path) with nothing random in it: the default
    # drop_path_rate 0.1 alone moved the logits of two explicit passes apart by 0.78 on the CPU.
    model = comparable_convit()
    x, labels = batch()
    fused_out, fused_grads = forward_backward(model, x, labels, True, monkeypatch)
    assert len(calls) == 4 and all("scale" not in c for c in calls)
    explicit_out, explicit_grads = forward_backward(model, x, labels, False, monkeypatch)
    assert len(calls) == 4  # the explicit pass made none
    np.testing.assert_allclose(fused_out, explicit_out, rtol=2e-2, atol=2e-2)
    assert fused_grads.keys() == explicit_grads.keys()
    for name, expected in explicit_grads.items():
        error = np.linalg.norm(fused_grads[name] - expected) / max(np.linalg.norm(expected), 1e-6)
        assert error < 3e-2, (name, error)


def test_flash_attention_drops_nothing_in_eval(monkeypatch):
    if capability() < backend.FLASH_MIN_CAPABILITY:
        pytest.skip(f"flash attention needs compute capability >= 8.0; this GPU has {capability()}")
    model = small_convit(attn_drop_rate=0.5)
    model.eval()
    x, _ = batch()
    with paddle.no_grad(), paddle.amp.auto_cast(dtype="float16"):
        first, second = model(x).astype("float32").numpy(), model(x).astype("float32").numpy()
        monkeypatch.setattr(backend, "FUSED_ATTENTION", False)
        explicit = model(x).astype("float32").numpy()
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, explicit, rtol=2e-2, atol=2e-2)


# --- RNG states -----------------------------------------------------------------------------------

def dropout_mask():
    return (F.dropout(paddle.ones([4096]), 0.5, training=True) == 0).numpy()


def test_the_cuda_rng_state_is_restored(tmp_path):
    paddle.seed(11)
    saved = rng.capture()
    assert saved["gpu"] is not None and saved["gpu_index"] == 0
    expected = dropout_mask()
    dropout_mask()
    assert rng.restore(saved) == []
    np.testing.assert_array_equal(dropout_mask(), expected)

    # through a checkpoint, as a resume reads it
    model = paddle.nn.Linear(2, 2)
    optimizer = paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters())
    checkpoints = Checkpointer(tmp_path)
    folder = checkpoints.save(1, model, optimizer, {}, [rng.capture()])
    expected = dropout_mask()
    dropout_mask()
    checkpoints.load(folder, model, optimizer)
    np.testing.assert_array_equal(dropout_mask(), expected)

    # the layout written before format 2 (paddle.get_rng_state() on a GPU: the CUDA states)
    old = {"cpu": paddle.get_rng_state(), "cuda": paddle.get_cuda_rng_state()}
    expected = dropout_mask()
    assert rng.restore(old) == ["the CPU generator (an older GPU checkpoint has none)"]
    np.testing.assert_array_equal(dropout_mask(), expected)


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs: a rank's random stream moving to another GPU")
def test_a_rank_stream_moves_to_another_gpu():
    paddle.seed(12)
    saved = rng.capture()  # on GPU 0
    expected = dropout_mask()
    paddle.set_device(f"gpu:{GPUS - 1}")
    assert rng.restore(saved) == []
    np.testing.assert_array_equal(dropout_mask(), expected)


# --- parallel jobs --------------------------------------------------------------------------------

def test_a_jobs_cached_memory_is_released_when_it_ends():
    x = paddle.zeros([64, 1024, 1024])  # 256 MiB
    del x
    before = paddle.device.cuda.memory_reserved()
    assert before >= 256 * 2**20  # kept by the allocator after the tensor is gone
    GpuPerJob().on_job_end(OmegaConf.create({}))
    assert paddle.device.cuda.memory_reserved() < before


@pytest.mark.timeout(1000)  # the sweep may take 900 s
def test_joblib_jobs_each_take_a_free_gpu(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(TRAIN + ["-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={min(GPUS, 2)}", "debug=fast",
                        "seed=0,1,2", "trainer.device=gpu", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [p.read_text() for p in sweep.glob("*/train.log")]
    assert len(logs) == 3 and all("one job per GPU" in log for log in logs)
    assert {row["status"] for row in read_csv(sweep / "summary.csv")} == {"completed"}
