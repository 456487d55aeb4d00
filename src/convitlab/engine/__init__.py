"""The training loop and what it is made of: the loop (trainer.py), optimiser and schedule,
mixed precision, EMA, metrics, the epoch protocol, checkpoints, RNG states, fine-tuning."""
