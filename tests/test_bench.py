"""src/bench.py end to end on the micro model: it runs and writes sane rows (no timing claims)."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import bench  # noqa: E402  (the script's own functions; the reference formulation is the package's)

from convitlab.models import ReferenceGPSA, create_model  # noqa: E402


def test_bench_writes_positive_rows_for_every_variant(tmp_path):
    output = tmp_path / "bench.csv"
    command = [sys.executable, str(ROOT / "src" / "bench.py"), "--models", "convit_micro",
               "--resolutions", "8/2", "--batch-sizes", "4", "--repeats", "1", "--warmup", "0",
               "--num-classes", "10", "--variants", "ours", "local0", "baseline", "seed", "seed_defaults",
               "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bench.COLUMNS
    timed = [r for r in rows if r["mode"] != "matmul"]
    assert {(r["variant"], r["mode"]) for r in timed} == {
        (v, m) for v in ("ours", "local0", "baseline", "seed", "seed_defaults") for m in ("infer", "train")}
    assert {r["threads"] for r in timed if r["variant"] == "seed_defaults"} == {"1"}  # Paddle's default
    for r in timed:
        assert float(r["img_per_s"]) > 0 and float(r["gflops_per_img"]) > 0
        assert float(r["peak_mem_mb"]) >= 0
    assert float(next(r for r in rows if r["mode"] == "matmul")["achieved_gflops"]) > 0
    assert output.with_suffix(".cmd").read_text().strip()


def test_baseline_formulations_compute_the_same_model():
    """The benchmark's baseline (the package's reference formulation) and seed GPSA are the same
    function as ours, only slower."""
    paddle.seed(0)
    model = create_model("convit_micro")
    model.eval()
    x = paddle.randn([2, 1, 8, 8])
    expected = model(x).numpy()
    for cls in (ReferenceGPSA, bench.SeedGPSA):
        np.testing.assert_allclose(bench.swap_gpsa(model, cls)(x).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_bench_mixed_precision_needs_a_gpu_and_says_so(tmp_path):
    """--amp runs the models as trainer.amp does; where there is no GPU it is refused in one line."""
    command = [sys.executable, str(ROOT / "src" / "bench.py"), "--models", "convit_micro", "--resolutions", "8/2",
               "--batch-sizes", "4", "--repeats", "1", "--warmup", "0", "--num-classes", "10", "--variants", "ours",
               "--no-peak", "--amp", "fp16", "--output", str(tmp_path / "bench.csv")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        assert result.returncode == 0, result.stderr[-3000:]
        with open(tmp_path / "bench.csv", newline="") as f:
            assert {r["amp"] for r in csv.DictReader(f)} == {"fp16"}
    else:
        assert result.returncode == 2 and "--amp fp16: trainer.amp='fp16' needs a GPU" in result.stderr
        assert not (tmp_path / "bench.csv").exists()
