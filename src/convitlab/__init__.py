"""convitlab: what a convolutional inductive bias buys a Vision Transformer.

Importing it has no side effects; code that runs Paddle calls convitlab.ops.runtime.setup() first.
"""
__version__ = "0.1.0"
