"""convitlab: what a convolutional inductive bias buys a Vision Transformer."""
from convitlab.runtime import configure_threads_before_paddle

configure_threads_before_paddle()

__version__ = "0.1.0"
