"""Op-level profile of one timm ConViT step with torch.profiler (CPU), the counterpart of
profile_ops.py; run with the Python that has torch and timm:

    /tmp/torchenv/bin/python experiments/perf/profile_timm_ops.py --img 224 --patch 16 --batch 32 --mode train
"""
import argparse

import torch
from timm_bench import import_timm


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="convit_tiny")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mode", default="train", choices=["infer", "train"])
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    timm = import_timm()
    model = timm.create_model(args.model, img_size=args.img, patch_size=args.patch, num_classes=1000)
    x = torch.randn(args.batch, 3, args.img, args.img)
    labels = torch.randint(0, 1000, (args.batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        if args.mode == "infer":
            with torch.no_grad():
                model(x)
            return
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.train(args.mode == "train")
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    # self time: each op's own time, without the ops it calls (a backward node's matmuls count as mm)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
