"""The CPU backend and the process's runtime: threads, MKL and flags set before Paddle loads
(runtime.py), the compiled CPU kernels (cpu_kernels.py, .cc) and the layers that call them
(cpu_layers.py), behind one switch per op. Models call these ops; nothing here knows a model."""
