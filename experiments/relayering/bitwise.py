"""Outputs and gradients of convit_micro and convit_tiny, saved or compared bit for bit.

    python experiments/relayering/bitwise.py save <file.npz>      # before a refactor
    python experiments/relayering/bitwise.py compare <file.npz>   # after it: exit 1 on any differing bit

Each model is built from a fixed seed, run in training mode (dropout and drop-path off, so the
pass is deterministic) on a fixed batch, and its logits, loss and every parameter's gradient are
kept, as the CPU at hand and the compiled kernels (if they build) compute them.
"""
import sys

import numpy as np

from convitlab.ops import runtime

runtime.setup()
import paddle  # noqa: E402  (after runtime.setup(): threads and flags are read when Paddle loads)

from convitlab.models import create_model  # noqa: E402

CASES = {"convit_micro": dict(batch=16, img_size=8, in_chans=1, patch_size=2, num_classes=10),
         "convit_tiny": dict(batch=4, img_size=224, in_chans=3, patch_size=16, num_classes=1000)}


def arrays() -> dict:
    out = {}
    for name, case in CASES.items():
        paddle.seed(0)
        model = create_model(name, img_size=case["img_size"], in_chans=case["in_chans"],
                             patch_size=case["patch_size"], num_classes=case["num_classes"],
                             drop_rate=0.0, drop_path_rate=0.0)
        model.train()
        rng = np.random.default_rng(0)
        x = paddle.to_tensor(rng.standard_normal(
            (case["batch"], case["in_chans"], case["img_size"], case["img_size"])).astype("float32"))
        y = paddle.to_tensor(rng.integers(0, case["num_classes"], case["batch"]))
        logits = model(x)
        loss = paddle.nn.functional.cross_entropy(logits, y)
        loss.backward()
        out[f"{name}/logits"] = logits.numpy()
        out[f"{name}/loss"] = loss.numpy()
        for pname, p in model.named_parameters():
            out[f"{name}/grad/{pname}"] = p.grad.numpy()
    return out


def main(mode: str, path: str) -> int:
    now = arrays()
    if mode == "save":
        np.savez(path, **now)
        print(f"saved {len(now)} arrays to {path}")
        return 0
    before = np.load(path)
    differ = [k for k in before.files if k not in now or before[k].tobytes() != now[k].tobytes()]
    extra = sorted(set(now) - set(before.files))
    print(f"{len(before.files)} arrays compared: {len(differ)} differ, {len(extra)} new")
    for k in differ + extra:
        print("  ", k)
    return 1 if differ or extra else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
