"""convitlab: what a convolutional inductive bias buys a Vision Transformer."""
from convitlab.runtime import configure_paddle_threads

configure_paddle_threads()

__version__ = "0.1.0"
