"""Loader workers: started and ended with each pass (convitlab's Loader) against Paddle's
persistent_workers, over the short passes of a small-fraction run.

    python experiments/perf/loader_workers.py [--passes 40] [--workers 2] [--fraction 0.1]

Prints seconds per pass (reading every batch, no model) for each way, best of --repeats.
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from convitlab.ops import runtime  # noqa: E402

runtime.setup()

import paddle  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from convitlab.config import DataConfig  # noqa: E402
from convitlab.data import build_datasets, build_loaders  # noqa: E402
from convitlab.data.loaders import PREFETCH_FACTOR, _collate, _FailuresAsItems  # noqa: E402


def seconds_per_pass(loader, sampler, passes):
    """Read every batch of `passes` passes of `loader` (its sampler set to each epoch)."""
    start = time.perf_counter()
    for epoch in range(1, passes + 1):
        sampler.set_epoch(epoch)
        for _ in loader:
            pass
    return (time.perf_counter() - start) / passes


def persistent_loader(loader, workers):
    """Paddle's loader over the same items, batches and collation, with persistent_workers."""
    return paddle.io.DataLoader(_FailuresAsItems(loader._loader.dataset.dataset), batch_sampler=loader.batch_sampler,
                                num_workers=workers, collate_fn=_collate, use_shared_memory=False,
                                prefetch_factor=PREFETCH_FACTOR, persistent_workers=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(ROOT / "conf" / "data" / "digits.yaml"),
                          {"fraction": args.fraction, "batch_size": 64, "num_workers": args.workers})
    data = build_datasets(cfg, seed=0)
    loader = build_loaders(data, cfg, seed=0)[0]
    print(f"digits, data.fraction={args.fraction}: {len(data.train)} images, {len(loader)} batches of 64 a pass, "
          f"{args.workers} workers, {args.passes} passes, best of {args.repeats}")
    for name, way in (("started and ended each pass (convitlab)", loader),
                      ("persistent_workers=True (Paddle)", persistent_loader(loader, args.workers))):
        best = min(seconds_per_pass(way, loader.batch_sampler, args.passes) for _ in range(args.repeats))
        print(f"{name}: {1000 * best:.1f} ms a pass")


if __name__ == "__main__":
    main()
