"""Op-level profile of one convitlab model step with paddle.profiler (CPU), printed as a table.

    .venv/bin/python experiments/perf/profile_ops.py --variant ours --img 224 --patch 16 --batch 32 --mode train
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402
import paddle.profiler as profiler  # noqa: E402

import bench  # noqa: E402  (src/bench.py: the same models and steps as the benchmark)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="convit_tiny")
    parser.add_argument("--variant", default="ours", choices=["ours", "local0", "baseline", "seed"])
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mode", default="train", choices=["infer", "train"])
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args()
    model = bench.build(args.model, args.variant, args.img, args.patch, args.num_classes)
    x = paddle.randn([args.batch, model.patch_embed.proj.weight.shape[1], args.img, args.img])  # the model's channels
    labels = paddle.randint(0, args.num_classes, [args.batch])
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())

    def step():
        if args.mode == "infer":
            with paddle.no_grad():
                model(x)
            return
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
        optimizer.clear_grad()
    model.train(args.mode == "train")
    step()
    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU], scheduler=(1, 3),
                             on_trace_ready=lambda _: None)  # the summary only, no trace file
    prof.start()
    for _ in range(3):
        step()
        prof.step()
    prof.stop()
    prof.summary(sorted_by=profiler.SortedKeys.CPUTotal, op_detail=False, thread_sep=False,
                 time_unit="ms", views=[profiler.SummaryView.OperatorView])


if __name__ == "__main__":
    main()
