"""Exponential moving average of the weights, evaluated instead of the raw weights when on."""
import contextlib

import paddle


class ModelEMA:
    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # (shadow, live tensor) pairs, built once: update() runs after every optimiser step.
        live = model.state_dict()
        self._float_pairs = [(self.shadow[k], v) for k, v in live.items() if paddle.is_floating_point(v)]
        self._other_pairs = [(self.shadow[k], v) for k, v in live.items() if not paddle.is_floating_point(v)]

    @paddle.no_grad()
    def update(self, model):
        """shadow ← decay · shadow + (1 − decay) · weights, in place."""
        for shadow, value in self._float_pairs:
            shadow.scale_(self.decay).add_(value * (1.0 - self.decay))
        for shadow, value in self._other_pairs:
            shadow.set_value(value)

    def state_dict(self):
        return self.shadow

    def set_state_dict(self, state):
        for name, value in state.items():
            self.shadow[name].set_value(value)

    @contextlib.contextmanager
    def swapped_into(self, model):
        """Context manager: the model carries the EMA weights inside the block."""
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.set_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.set_state_dict(saved)
