"""src/bench.py end to end on the micro model: it runs and writes sane rows (no timing claims)."""
import csv
import os
import sys
from pathlib import Path

import numpy as np
import paddle
from helpers import run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import bench  # noqa: E402  (the script's own functions; the reference formulation is the package's)
from convitlab.models import ReferenceGPSA, create_model  # noqa: E402
from convitlab.ops import runtime  # noqa: E402


def test_bench_writes_positive_rows_for_every_variant(tmp_path):
    output = tmp_path / "bench.csv"
    command = [sys.executable, str(ROOT / "src" / "bench.py"), "--models", "convit_micro",
               "--resolutions", "8/2", "--batch-sizes", "4", "--repeats", "1", "--warmup", "0",
               "--num-classes", "10", "--variants", "ours", "local0", "baseline", "seed", "seed_defaults",
               "--output", str(output)]
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bench.COLUMNS
    timed = rows
    assert {(r["variant"], r["mode"]) for r in timed} == {
        (v, m) for v in ("ours", "local0", "baseline", "seed", "seed_defaults") for m in ("infer", "train")}
    assert {r["threads"] for r in timed if r["variant"] == "seed_defaults"} == {"1"}  # Paddle's default
    for r in timed:
        assert float(r["img_per_s"]) > 0 and float(r["gflops_per_img"]) > 0
        assert float(r["peak_mem_mb"]) >= 0
    # every row names the machine and the product peak measured in the same run
    machine = runtime.machine_record()
    assert len({r["peak_gflops"] for r in rows}) == 1 and float(rows[0]["peak_gflops"]) > 0
    for r in rows:
        assert r["cpu_kind"] == runtime.cpu_kind() and r["cores"] == str(runtime.available_cores())
        assert r["paddle_version"] == paddle.__version__ == r["framework_version"].split()[1]
        assert r["cpu_isa"] == machine["cpu_isa"] and r["paddle_mkl"] == machine["paddle_mkl"]
        assert bool(r["paddle_mkl_path"]) == bool(machine["paddle_mkl"])  # the child (seed_defaults) reads its own
    # the compiled CPU kernels ran in ours' timed steps (a compiler is here), not in the seed's stock runtime
    assert {r["cpu_kernels"] for r in timed if r["variant"] == "ours"} == {"on"}
    assert {r["cpu_kernels"] for r in timed if r["variant"] == "seed_defaults"} == {"off"}
    assert f"{sys.executable} {ROOT / 'src' / 'bench.py'} --models convit_micro" in output.with_suffix(".cmd").read_text()


def test_kernels_off_is_in_the_rows_and_in_the_recorded_command(tmp_path):
    """An A/B run with CONVITLAB_CPU_KERNELS=0 says so in its rows and in its .cmd, which re-runs it."""
    output = tmp_path / "off.csv"
    command = [sys.executable, str(ROOT / "src" / "bench.py"), "--models", "convit_micro", "--resolutions", "8/2",
               "--batch-sizes", "4", "--repeats", "1", "--warmup", "0", "--num-classes", "10", "--modes", "infer",
               "--variants", "ours", "--no-peak", "--output", str(output)]
    result = run(command, env={**os.environ, "CONVITLAB_CPU_KERNELS": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output, newline="") as f:
        assert [r["cpu_kernels"] for r in csv.DictReader(f)] == ["off"]
    assert f"CONVITLAB_CPU_KERNELS=0 {sys.executable} " in output.with_suffix(".cmd").read_text()


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
    result = run(command)
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        assert result.returncode == 0, result.stderr[-3000:]
        with open(tmp_path / "bench.csv", newline="") as f:
            assert {r["amp"] for r in csv.DictReader(f)} == {"fp16"}
    else:
        assert result.returncode == 2 and "--amp fp16: trainer.amp='fp16' needs a GPU" in result.stderr
        assert not (tmp_path / "bench.csv").exists()


def test_bench_keeps_each_cpu_kind_in_its_own_folder(tmp_path):
    """Figures from another kind of processor are never mixed into the same folder."""
    (tmp_path / "other.csv").write_text("model,cpu_kind,img_per_s\nconvit_tiny,Elsewhere family 0 model 0,1.0\n")
    command = [sys.executable, str(ROOT / "src" / "bench.py"), "--models", "convit_micro", "--resolutions", "8/2",
               "--batch-sizes", "4", "--repeats", "1", "--warmup", "0", "--variants", "ours", "--no-peak",
               "--output", str(tmp_path / "results.csv")]
    result = run(command, timeout=300)
    assert result.returncode == 1 and not (tmp_path / "results.csv").exists()
    assert result.stderr.strip().splitlines() == [
        f"--output {tmp_path / 'results.csv'}: {tmp_path / 'other.csv'} holds figures from Elsewhere family 0 "
        f"model 0, this processor is {runtime.cpu_kind()}: write to a folder of its own (one per CPU kind)"]


def test_a_static_graph_row_says_the_kernels_did_not_run(tmp_path):
    """paddle.jit.to_static(full_graph=True) builds a static program of Paddle's ops: the column
    counts the kernels' calls in the timed steps, so it says off."""
    output = tmp_path / "static.csv"
    command = [sys.executable, str(ROOT / "src" / "bench.py"), "--models", "convit_micro", "--resolutions", "8/2",
               "--batch-sizes", "4", "--repeats", "1", "--warmup", "0", "--num-classes", "10", "--modes", "infer",
               "--variants", "ours", "--to-static", "both", "--no-peak", "--output", str(output)]
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output, newline="") as f:
        assert {(r["to_static"], r["cpu_kernels"]) for r in csv.DictReader(f)} == {("False", "on"), ("True", "off")}
