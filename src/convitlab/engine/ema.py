"""Exponential moving average of the weights, evaluated instead of the raw weights when on."""
import paddle


class ModelEMA:
    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @paddle.no_grad()
    def update(self, model):
        for name, value in model.state_dict().items():
            if paddle.is_floating_point(value):
                self.shadow[name].set_value(self.decay * self.shadow[name] + (1 - self.decay) * value)
            else:
                self.shadow[name].set_value(value)

    def state_dict(self):
        return self.shadow

    def set_state_dict(self, state):
        for name, value in state.items():
            self.shadow[name].set_value(value)

    def swapped_into(self, model):
        """Context manager: the model carries the EMA weights inside the block."""
        return _Swap(model, self.shadow)


class _Swap:
    def __init__(self, model, weights):
        self.model, self.weights = model, weights

    def __enter__(self):
        self.saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.set_state_dict(self.weights)
        return self.model

    def __exit__(self, *exc):
        self.model.set_state_dict(self.saved)
