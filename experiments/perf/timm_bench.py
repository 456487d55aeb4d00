"""timm's PyTorch ConViT timed like src/bench.py times ours; prints one CSV row (header first).

Runs in a separate Python with torch and timm (never convitlab's venv):
    /tmp/torchenv/bin/python experiments/perf/timm_bench.py --model convit_tiny --img-size 224 \
        --patch-size 16 --batch-size 32 --mode infer
"""
import argparse
import csv
import statistics
import sys
import time

import torch

COLUMNS = ["framework", "model", "variant", "to_static", "device", "threads", "img_size", "patch_size",
           "batch_size", "mode", "img_per_s", "ms_per_batch", "peak_mem_mb", "rss_growth_mb", "gflops_per_img",
           "achieved_gflops", "framework_version"]


def import_timm():
    # The only torchvision wheel on this machine is a CUDA build whose compiled ops cannot load
    # beside a CPU torch; torchvision then fails registering fakes for two missing ops. timm
    # only needs torchvision's Python parts, so declaring those two op schemas is enough.
    if not torch.cuda.is_available():
        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass  # a working torchvision already defined it
    import timm
    return timm


def proc_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="convit_tiny")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mode", choices=["infer", "train"], default="infer")
    parser.add_argument("--variant", default="timm", help="the row's label (bench.py: timm, timm_local0)")
    # The sizes of timm's ConVit class (embed_dim per head, as in convitlab); unset: timm's for --model.
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--embed-dim", type=int)
    parser.add_argument("--num-heads", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--mlp-ratio", type=float)
    parser.add_argument("--local-up-to-layer", type=int, help="0: the same size with locality off")
    parser.add_argument("--locality-strength", type=float)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--gflops-per-img", type=float, default=0.0, help="forward+backward if train")
    args = parser.parse_args()
    timm = import_timm()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    sizes = {k: getattr(args, k) for k in ("embed_dim", "num_heads", "depth", "mlp_ratio", "local_up_to_layer",
                                           "locality_strength") if getattr(args, k) is not None}
    # timm registers only the paper's sizes; any other (e.g. convit_micro) is its convit_tiny resized
    name = args.model if args.model in timm.list_models("convit_*") else "convit_tiny"
    model = timm.create_model(name, pretrained=False, img_size=args.img_size, patch_size=args.patch_size,
                              in_chans=args.in_chans, num_classes=args.num_classes, **sizes).to(device)
    x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    if args.mode == "infer":
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS
    except OSError:
        pass
    rss_baseline = proc_kb("VmRSS") / 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    rss_growth = proc_kb("VmHWM") / 1024 - rss_baseline
    # torch keeps no CPU allocator statistics; in this fresh process the RSS growth stands in.
    peak = torch.cuda.max_memory_allocated() / 2**20 - baseline if device == "cuda" else rss_growth
    writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerow(dict(
        framework="torch", model=args.model, variant=args.variant,
        to_static=False, device=device, threads=torch.get_num_threads(), img_size=args.img_size,
        patch_size=args.patch_size, batch_size=args.batch_size, mode=args.mode,
        img_per_s=round(args.batch_size / seconds, 2), ms_per_batch=round(1000 * seconds, 1),
        peak_mem_mb=round(peak, 1), rss_growth_mb=round(rss_growth, 1), gflops_per_img=args.gflops_per_img,
        achieved_gflops=round(args.gflops_per_img * args.batch_size / seconds, 1),
        framework_version=f"torch {torch.__version__} timm {timm.__version__}"))


if __name__ == "__main__":
    main()
