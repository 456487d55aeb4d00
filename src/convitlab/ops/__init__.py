"""The ops the models call and the backends behind them: the process's runtime (runtime.py:
threads, MKL and flags set before Paddle loads), the compiled CPU kernels (cpu_kernels.py, .cc),
the switches that choose a kernel, flash attention or Paddle's op (backend.py), attention's ops
(attention_ops.py) and the layers Linear, LayerNorm, GELU (cpu_layers.py). Nothing here knows a
model."""
