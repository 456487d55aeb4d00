"""Throughput benchmark: img/s for inference and a training step, and peak memory, in one run.

Compares, inside one process and on the same model, convitlab's GPSA ("ours") with
  - "local0": the same size with locality off (local_up_to_layer=0, a DeiT), to price GPSA;
  - "baseline": GPSA as the reference code formulates it (convitlab.models.attention.ReferenceGPSA);
  - "seed": the baseline plus the NumPy host round-trips the seed notebook did in forward;
  - "seed_defaults": "seed" as the seed notebook ran it, in a subprocess with Paddle as it comes
    (CONVITLAB_PADDLE_DEFAULTS=1: one thread, MKL's own dispatch, stride kernels, glibc's
    malloc defaults) and Paddle's stock ops instead of convitlab's CPU passes (ops.backend.CPU_BACKEND);
  - "timm": timm's PyTorch ConViT, run by experiments/perf/timm_bench.py in another Python.

    python src/bench.py --models convit_tiny --resolutions 224/16 32/4 --batch-sizes 32 64 \
        --variants ours local0 baseline timm --torch-python /tmp/torchenv/bin/python \
        --output experiments/perf/<cpu kind>/results.csv

Every row also records the machine (runtime.machine_record: CPU kind, ISA flags, cores, Paddle and
its MKL) and the 2048x2048 product peak of the same run; experiments/perf/ keeps one folder per CPU kind.
"""
# argparse, not Hydra: a benchmark takes lists of sizes and variants in one process and
# configures no run (nothing to compose, record or sweep).
import argparse
import csv
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from convitlab.ops import runtime

runtime.setup()  # first: Paddle must load after it (threads, MKL's code path, Paddle's flags)

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402
from paddle.base import core  # noqa: E402

from convitlab.analysis.summary import count_flops  # noqa: E402
from convitlab.core.errors import UserError  # noqa: E402
from convitlab.engine.amp import amp_settings, backward_and_step, check_amp_supported  # noqa: E402
from convitlab.models import create_model, model_defaults  # noqa: E402
from convitlab.models.attention import ReferenceGPSA, relative_positions  # noqa: E402
from convitlab.ops import (
    backend,  # noqa: E402
    cpu_kernels,  # noqa: E402
)
from convitlab.ops.runtime import cpu_threads, machine_record, user_environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMM_SCRIPT = ROOT / "experiments" / "perf" / "timm_bench.py"
# The machine each row was measured on (runtime.machine_record), so that figures from different
# processors are never compared blindly; peak_gflops is the float32 2048x2048 product in the same run.
MACHINE = ["cpu_kind", "cpu_vendor", "cpu_family", "cpu_model", "cpu_model_name", "cpu_isa", "cores",
           "paddle_version", "paddle_mkl", "paddle_mkl_path"]
COLUMNS = ["framework", "model", "variant", "to_static", "amp", "device", "threads", "img_size", "patch_size",
           "batch_size", "mode", "img_per_s", "ms_per_batch", "peak_mem_mb", "rss_growth_mb", "gflops_per_img",
           "achieved_gflops", "framework_version", "cpu_kernels", "peak_gflops", *MACHINE]
VARIANTS = ["ours", "local0", "baseline", "seed", "seed_defaults", "timm", "timm_local0"]


class SeedGPSA(ReferenceGPSA):
    """The seed notebook's habit: grid tensors rebuilt and tiled over the batch on the host
    (NumPy) in every forward pass, then copied back to the device."""

    def batch_positions(self, batch, tokens):
        side = int(round(tokens ** 0.5))
        grid = relative_positions(side, side).numpy()
        return paddle.to_tensor(np.tile(grid[None], (batch, 1, 1, 1)))


def swap_gpsa(model, cls):
    """Replace every GPSA of `model` by `cls` with the same weights."""
    for block in model.gpsa_blocks():
        old = block.attn
        new = cls(old.head_dim * old.num_heads, old.num_heads, model.grid_size)
        new.set_state_dict(old.state_dict())
        new.train(old.training)
        block.attn = new
    return model


def build(name, variant, img, patch, num_classes):
    # no drop path: timm's sizes default to none, and the benchmark times the architecture
    overrides = dict(img_size=img, patch_size=patch, num_classes=num_classes, drop_path_rate=0.0)
    if variant == "local0":
        overrides["local_up_to_layer"] = 0
    model = create_model(name, **overrides)
    if variant == "baseline":
        swap_gpsa(model, ReferenceGPSA)
    elif variant == "seed":
        swap_gpsa(model, SeedGPSA)
    return model


def on_gpu():
    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_memory():
    """Start a peak-memory window; returns the baselines (allocator MiB, RSS MiB) to subtract."""
    try:  # Linux: writing 5 resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the RSS peak then covers the whole process so far: an upper bound
    rss = _proc_status_kb("VmRSS") / 1024
    if on_gpu():
        paddle.device.cuda.synchronize()
        paddle.device.cuda.reset_max_memory_allocated()
        return paddle.device.cuda.memory_allocated() / 2**20, rss
    # Paddle's host allocator keeps freed blocks, so after the first configuration the RSS
    # hardly grows: its own counters give each configuration's peak of live tensors.
    core.host_memory_stat_reset_peak_value("Allocated", 0)
    return core.host_memory_stat_current_value("Allocated", 0) / 2**20, rss


def peak_memory(baselines):
    """(peak tensor memory, RSS growth) in MiB since reset_peak_memory."""
    allocated, rss = baselines
    if on_gpu():
        peak = paddle.device.cuda.max_memory_allocated() / 2**20
    else:
        peak = core.host_memory_stat_peak_value("Allocated", 0) / 2**20
    return peak - allocated, _proc_status_kb("VmHWM") / 1024 - rss


def synchronize():
    if on_gpu():
        paddle.device.cuda.synchronize()


def time_steps(step, warmup, repeats):
    """Median seconds of `step` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_paddle(name, variant, img, patch, batch, mode, to_static, args):
    paddle.seed(0)
    model = build(name, variant, img, patch, args.num_classes)
    flops = 2 * count_flops(model)  # count_flops gives multiply-adds
    in_chans = model.patch_embed.proj.weight.shape[1]
    x = paddle.randn([batch, in_chans, img, img])
    labels = paddle.randint(0, args.num_classes, [batch])
    run_model = paddle.jit.to_static(model, full_graph=True) if to_static else model
    amp_dtype, scaler = amp_settings(args.amp, "gpu" if on_gpu() else "cpu")  # as training runs it

    def forward():
        with paddle.amp.auto_cast(enable=amp_dtype is not None, dtype=amp_dtype or "float16"):
            return run_model(x)

    if mode == "infer":
        model.eval()

        def step():
            with paddle.no_grad():
                forward()
    else:
        model.train()
        optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters(),
                                           weight_decay=0.05)

        def step():
            backward_and_step(F.cross_entropy(forward().astype("float32"), labels), optimizer, scaler)
        flops *= 3  # backward costs about twice the forward
    step()  # first call outside the memory window: lazy allocations, to_static tracing
    baseline = reset_peak_memory()
    calls_before = cpu_kernels.calls
    seconds = time_steps(step, args.warmup, args.repeats)
    kernel_calls = cpu_kernels.calls - calls_before  # did convitlab's compiled kernels run in the timed steps
    memory = peak_memory(baseline)
    return dict(framework="paddle", model=name, variant=variant, to_static=to_static, amp=args.amp,
                device=paddle.device.get_device(), framework_version=f"paddle {paddle.__version__}",
                cpu_kernels="on" if kernel_calls else "off",
                threads=cpu_threads(), img_size=img, patch_size=patch, batch_size=batch, mode=mode,
                img_per_s=round(batch / seconds, 2), ms_per_batch=round(1000 * seconds, 1),
                peak_mem_mb=round(memory[0], 1), rss_growth_mb=round(memory[1], 1),
                gflops_per_img=round(flops / 1e9, 3), achieved_gflops=round(flops * batch / seconds / 1e9, 1))


def bench_timm(configs, variant, args):
    """timm's ConViT via experiments/perf/timm_bench.py in a Python that has torch and timm."""
    python = args.torch_python or sys.executable
    probe = subprocess.run([python, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "import timm_bench; timm_bench.import_timm()", str(TIMM_SCRIPT.parent)],
                           capture_output=True, env=user_environment())  # timm_bench's import works around a broken torchvision
    if probe.returncode != 0:
        print(f"note: timm skipped: {python} cannot import torch and timm "
              "(pass --torch-python PATH to a Python that can)")
        return []
    rows = []
    for name, img, patch, batch, mode in configs:
        ours = build(name, "ours", img, patch, args.num_classes)  # same architecture: same FLOPs
        flops = 2 * count_flops(ours) * (3 if mode == "train" else 1)
        sizes = model_defaults(name)  # timm's ConVit at the same sizes: any convitlab size
        command = [python, str(TIMM_SCRIPT), "--model", name, "--variant", variant, "--img-size", str(img),
                   "--patch-size", str(patch), "--batch-size", str(batch), "--mode", mode,
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                   "--num-classes", str(args.num_classes), "--gflops-per-img", f"{flops / 1e9:.3f}",
                   "--in-chans", str(ours.patch_embed.proj.weight.shape[1])]
        if variant == "timm_local0":
            sizes["local_up_to_layer"] = 0
        for knob in ("embed_dim", "num_heads", "depth", "mlp_ratio", "local_up_to_layer", "locality_strength"):
            command += [f"--{knob.replace('_', '-')}", str(sizes[knob])]
        result = subprocess.run(command, capture_output=True, text=True, env=user_environment())
        if result.returncode != 0:
            print(f"note: timm {name} {img}/{patch} {mode} failed:\n{result.stderr[-2000:]}")
            continue
        rows.append(next(csv.DictReader(result.stdout.splitlines()[-2:])))
    return rows


def bench_seed_defaults(args):
    """The "seed" variant in a fresh process with Paddle's and glibc's defaults and stock layers."""
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "seed.csv"
        command = [sys.executable, str(Path(__file__).resolve()), "--seed-runtime", "--variants", "seed",
                   "--models", *args.models, "--resolutions", *[f"{i}/{p}" for i, p in args.resolutions],
                   "--batch-sizes", *map(str, args.batch_sizes), "--modes", *args.modes,
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                   "--num-classes", str(args.num_classes), "--no-peak", "--output", str(output)]
        env = {k: v for k, v in user_environment().items() if k not in ("OMP_NUM_THREADS", "MKL_DEBUG_CPU_TYPE")}
        env["CONVITLAB_PADDLE_DEFAULTS"] = "1"
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            print(f"note: seed_defaults failed:\n{result.stderr[-2000:]}")
            return []
        with open(output, newline="") as f:
            rows = list(csv.DictReader(f))
    for r in rows:
        r["variant"] = "seed_defaults"
        print(" ".join(f"{k}={r[k]}" for k in ("model", "variant", "img_size", "batch_size", "mode", "img_per_s",
                                                  "threads")), flush=True)
    return rows


def matmul_peak(size=2048, repeats=5):
    """float32 GFLOP/s of one large matrix product: the practical peak of this device."""
    a, b = paddle.randn([size, size]), paddle.randn([size, size])
    seconds = time_steps(lambda: paddle.matmul(a, b), 2, repeats)
    return 2 * size ** 3 / seconds / 1e9


def parse_resolution(text):
    img, patch = text.split("/")
    return int(img), int(patch)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["convit_tiny"])
    parser.add_argument("--resolutions", nargs="+", default=[(224, 16), (32, 4)], type=parse_resolution,
                        help="image/patch pairs")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 64],
                        help="one per resolution, or one for all")
    parser.add_argument("--modes", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["ours", "local0", "baseline", "timm"])
    parser.add_argument("--to-static", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                        help="paddle.jit.to_static the Paddle models (both: eager and static rows)")
    parser.add_argument("--amp", default="off", choices=["off", "fp16", "bf16"],
                        help="the Paddle models under trainer.amp's mixed precision (a GPU only)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--torch-python", help="a Python with torch and timm, for the timm variant")
    parser.add_argument("--no-peak", action="store_true", help="skip the matrix-product peak measurement")
    parser.add_argument("--output", default="outputs/bench/results.csv",
                        help="the CSV (a .cmd with the command goes beside it); experiments/perf/ holds the committed runs")
    parser.add_argument("--seed-runtime", action="store_true", help=argparse.SUPPRESS)  # seed_defaults' child
    args = parser.parse_args(argv)
    if len(args.batch_sizes) == 1:
        args.batch_sizes *= len(args.resolutions)
    if len(args.batch_sizes) != len(args.resolutions):
        parser.error("--batch-sizes: give one per resolution, or one for all")
    try:
        check_amp_supported(args.amp, "gpu" if on_gpu() else "cpu")
    except UserError as exc:
        parser.error(f"--amp {args.amp}: {exc}")
    return args


def check_same_cpu_kind(output, kind):
    """Refuse to write beside the results of another kind of processor (one folder per CPU kind)."""
    for other in sorted(Path(output).parent.glob("*.csv")):
        if other == Path(output):
            continue
        with open(other, newline="") as f:
            kinds = {r.get("cpu_kind") for r in csv.DictReader(f)} - {None, ""}
        if kinds - {kind}:
            raise UserError(f"--output {output}: {other} holds figures from {', '.join(sorted(kinds))}, this "
                            f"processor is {kind}: write to a folder of its own (one per CPU kind)")


def main(argv=None):
    args = parse_args(argv)
    if args.seed_runtime:  # the seed had no hand-written CPU layers
        backend.CPU_BACKEND = False
    if on_gpu():
        paddle.set_device("gpu")
    configs = [(name, img, patch, batch, mode) for name in args.models
               for (img, patch), batch in zip(args.resolutions, args.batch_sizes) for mode in args.modes]
    static_modes = {"off": [False], "on": [True], "both": [False, True]}[args.to_static]
    machine = machine_record()
    if not args.seed_runtime:
        try:
            check_same_cpu_kind(args.output, machine["cpu_kind"])
        except UserError as exc:
            sys.exit(str(exc))
    peak = None if args.no_peak else round(matmul_peak(), 1)
    rows = []
    for variant in args.variants:
        if variant.startswith("timm"):
            rows += bench_timm(configs, variant, args)
            continue
        if variant == "seed_defaults":
            rows += bench_seed_defaults(args)
            continue
        for to_static in static_modes:
            for config in configs:
                rows.append(bench_paddle(*config[:1], variant, *config[1:], to_static, args))
                print(" ".join(f"{k}={rows[-1][k]}" for k in
                               ("model", "variant", "to_static", "amp", "img_size", "batch_size", "mode",
                                "img_per_s", "peak_mem_mb", "achieved_gflops")), flush=True)
    for r in rows:  # a child's rows (seed_defaults) keep its own MKL code path; timm's have no Paddle
        r.update({k: v for k, v in machine.items() if not r.get(k) and (r["framework"] == "paddle"
                                                                        or not k.startswith("paddle"))})
        r["peak_gflops"] = peak
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    output.with_suffix(".cmd").write_text(command_line() + "\n")
    print_table(rows)
    print(f"{machine['cpu_kind']} ({machine['cpu_model_name']}; {machine['cpu_isa']}), {machine['cores']} cores; "
          f"Paddle {machine['paddle_version']}, MKL {machine['paddle_mkl']} ({machine['paddle_mkl_path']})")
    if peak:
        print(f"float32 matrix-product peak (2048x2048): {peak:.1f} GFLOP/s")
    print(f"wrote {output}")


# Variables that change what a row measures, written in front of the command when the user set them.
RESULT_VARIABLES = ("OMP_NUM_THREADS", "MKL_DEBUG_CPU_TYPE", "CONVITLAB_CPU_KERNELS", "CONVITLAB_PADDLE_DEFAULTS",
                    "CONVITLAB_MALLOC_DEFAULTS")


def command_line():
    """This run's command as a shell line, with the user's RESULT_VARIABLES in front."""
    env = user_environment()
    assignments = [f"{name}={shlex.quote(env[name])}" for name in RESULT_VARIABLES if name in env]
    return " ".join(assignments + [shlex.join([sys.executable, *sys.argv])])


def print_table(rows):
    print(f"\n{'framework':9} {'model':14} {'variant':9} {'static':6} {'res':7} {'batch':5} {'mode':5} "
          f"{'img/s':>8} {'peak MB':>8} {'GFLOP/s':>8}")
    for r in rows:
        print(f"{r['framework']:9} {r['model']:14} {r['variant']:9} {str(r['to_static']):6} "
              f"{str(r['img_size']) + '/' + str(r['patch_size']):7} {str(r['batch_size']):5} {r['mode']:5} "
              f"{float(r['img_per_s']):8.1f} {float(r['peak_mem_mb']):8.1f} {float(r['achieved_gflops']):8.1f}")


if __name__ == "__main__":
    main()
