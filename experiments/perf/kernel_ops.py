"""Single ops of convit_tiny's step with convitlab's compiled CPU kernels against the Paddle ops they
replace (CONVITLAB_CPU_KERNELS switched at run time), milliseconds per call, median of repeats;
the two are timed in alternation, so a load that comes and goes reaches both alike.

    .venv/bin/python experiments/perf/kernel_ops.py > experiments/perf/<cpu kind>/kernel_ops.txt
    OMP_NUM_THREADS=1 .venv/bin/python experiments/perf/kernel_ops.py > .../kernel_ops_1thread.txt

The `kernel` column names the switch (cpu_kernels.KERNELS) each row decides.
"""
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from convitlab.ops import runtime  # noqa: E402

runtime.setup()
import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

from convitlab.models import attention  # noqa: E402
from convitlab.ops import attention_ops, backend, cpu_kernels, cpu_layers  # noqa: E402

REPEATS, WARMUP = 30, 5


def median_ms(fn):
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def forward_backward(fn, *inputs):
    """fn(*inputs) and its backward to every input, as one call."""
    for t in inputs:
        t.stop_gradient = False

    def run():  # paddle.grad: nothing accumulates into the inputs between calls
        outputs = fn(*inputs)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        paddle.grad(outputs, list(inputs), [paddle.ones_like(o) for o in outputs])
    return run


def stock_and_ours(fn, *inputs, backward=False, rounds=3):
    """(ms with Paddle's ops, ms with the kernels) of the same call: the medians of `rounds`
    alternating measurements of each."""
    call = forward_backward(fn, *inputs) if backward else (lambda: fn(*inputs))
    times = {"0": [], "all": []}
    for _ in range(rounds):
        for switch in times:
            os.environ[cpu_kernels.ENV_SWITCH] = switch
            times[switch].append(median_ms(call))
    os.environ[cpu_kernels.ENV_SWITCH] = "all"
    return statistics.median(times["0"]), statistics.median(times["all"])


def scaled_softmax(scores, scale=48 ** -0.5):
    """The content attention's softmax as attention_ops.content_attention computes it on each path."""
    if backend.use_cpu_kernel(scores, "softmax"):
        return cpu_kernels.softmax(scores, scale)
    return F.softmax(scores * scale, axis=-1)


def main():
    assert cpu_kernels.available(), "the kernels did not build here"
    rng = np.random.default_rng(0)

    def tensor(*shape):
        return paddle.to_tensor(rng.standard_normal(shape).astype("float32"))

    scores, qkv, hidden = tensor(64, 4, 65, 65), tensor(64, 65, 576), tensor(64, 65, 768)
    content, v, gate = tensor(64, 4, 64, 48), tensor(64, 4, 64, 48), paddle.full([4, 1, 1], 0.7)
    positional = F.softmax(tensor(4, 64, 64), axis=-1)
    hidden_224, tokens, tokens_224 = tensor(6272, 768), tensor(64, 65, 192), tensor(6272, 192)
    norm = cpu_layers.LayerNorm(192)
    rows = [
        ("softmax", "softmax(scores / sqrt(d)), [64, 4, 65, 65], forward", stock_and_ours(scaled_softmax, scores)),
        ("softmax", "the same, forward + backward", stock_and_ours(scaled_softmax, scores, backward=True)),
        ("head_layouts", "q/k/v head split, [64, 65, 576] -> 3 x [64, 4, 65, 48], forward",
         stock_and_ours(lambda x: attention_ops.split_heads(x, 4), qkv)),
        ("head_layouts", "the same, forward + backward",
         stock_and_ours(lambda x: attention_ops.split_heads(x, 4), qkv, backward=True)),
        ("head_layouts", "GPSA's output from C v, P and v, [64, 4, 64, 48], forward + backward",
         stock_and_ours(lambda c, values: attention_ops.gated_heads(c, gate * positional, values, gate), content, v,
                        backward=True)),
        ("gelu", "GELU, [64, 65, 768], forward", stock_and_ours(cpu_layers.GELU(), hidden)),
        ("gelu", "the same, forward + backward", stock_and_ours(cpu_layers.GELU(), hidden, backward=True)),
        ("gelu", "GELU, [6272, 768] (224/16 batch 32), forward", stock_and_ours(cpu_layers.GELU(), hidden_224)),
        ("gelu", "the same, forward + backward", stock_and_ours(cpu_layers.GELU(), hidden_224, backward=True)),
        ("layer_norm", "LayerNorm, [64, 65, 192], forward", stock_and_ours(norm, tokens)),
        ("layer_norm", "the same, forward + backward",
         stock_and_ours(lambda x, weight, bias: norm(x), tokens, norm.weight, norm.bias, backward=True)),
        ("layer_norm", "LayerNorm, [6272, 192] (224/16 batch 32), forward", stock_and_ours(norm, tokens_224)),
        ("layer_norm", "the same, forward + backward",
         stock_and_ours(lambda x, weight, bias: norm(x), tokens_224, norm.weight, norm.bias, backward=True)),
    ]
    # the demo's convit_micro (8/2 digits, width 64, 4 heads, batch 32): 16 patch tokens, 17 with the class token
    micro_scores, micro_qkv, micro_tokens = tensor(32, 4, 16, 16), tensor(32, 16, 192), tensor(32, 17, 64)
    micro_content, micro_v = tensor(32, 4, 16, 16), tensor(32, 4, 16, 16)
    micro_positional, micro_hidden, micro_norm = F.softmax(tensor(4, 16, 16), axis=-1), tensor(32, 17, 256), \
        cpu_layers.LayerNorm(64)
    rows += [
        ("softmax", "micro: softmax, [32, 4, 16, 16], forward + backward",
         stock_and_ours(scaled_softmax, micro_scores, backward=True)),
        ("head_layouts", "micro: q/k/v head split, [32, 16, 192], forward + backward",
         stock_and_ours(lambda x: attention_ops.split_heads(x, 4), micro_qkv, backward=True)),
        ("head_layouts", "micro: GPSA's output, [32, 4, 16, 16], forward + backward",
         stock_and_ours(lambda c, values: attention_ops.gated_heads(c, gate * micro_positional, values, gate),
                        micro_content, micro_v, backward=True)),
        ("gelu", "micro: GELU, [32, 17, 256], forward + backward",
         stock_and_ours(cpu_layers.GELU(), micro_hidden, backward=True)),
        ("layer_norm", "micro: LayerNorm, [32, 17, 64], forward + backward",
         stock_and_ours(lambda x, weight, bias: micro_norm(x), micro_tokens, micro_norm.weight, micro_norm.bias,
                        backward=True)),
    ]
    print("| kernel | op (convit_tiny, 32/4 batch 64 unless said) | Paddle's ops, ms | convitlab's kernels, ms "
          "| ratio |")
    print("|---|---|---|---|---|")
    for kernel, name, (stock, ours) in rows:
        print(f"| {kernel} | {name} | {stock:.3f} | {ours:.3f} | {stock / ours:.2f}× |")
    print()
    print("| kernel | slowest ratio over its rows |")
    print("|---|---|")
    for kernel in cpu_kernels.KERNELS:
        print(f"| {kernel} | {min(stock / ours for k, _, (stock, ours) in rows if k == kernel):.2f} |")
    # Subnormal operands: GPSA's positional maps at local init (224/16, a 14 x 14 grid) as exp
    # without a clip leaves them, and as the kernels' softmax writes them; the same product.
    gpsa = attention.GPSA(192, 4, (14, 14))
    gpsa.local_init()
    scores = gpsa.pos_proj(gpsa.rel_positions).transpose([2, 0, 1]).numpy().astype(np.float64)
    unclipped = np.exp(scores - scores.max(-1, keepdims=True)).astype(np.float32)  # subnormals kept
    unclipped /= unclipped.sum(-1, keepdims=True)
    tiny = np.finfo(np.float32).tiny
    values = tensor(4, 196, 32 * 48)
    with paddle.no_grad():
        maps = {"with subnormal entries": paddle.to_tensor(0.7 * unclipped),
                "as the kernels' softmax writes it": 0.7 * gpsa.positional_attention()}
        print()
        print("| GPSA's positional product at 224/16 batch 32, [4, 196, 196] x [4, 196, 1536] | subnormal entries | ms |")
        print("|---|---|---|")
        for name, gated_map in maps.items():
            array = gated_map.numpy()
            count = int(np.sum((array != 0) & (np.abs(array) < tiny)))
            print(f"| map {name} | {count} | {median_ms(lambda: paddle.matmul(gated_map, values)):.3f} |")
    print()
    print(f"{runtime.cpu_kind()}, {runtime.cpu_threads()} threads, Paddle {paddle.__version__}, "
          f"kernels built with {' '.join(cpu_kernels.compile_flags())} "
          f"(-march resolved to {cpu_kernels.resolved_target(cpu_kernels.compile_flags())})")


if __name__ == "__main__":
    main()
