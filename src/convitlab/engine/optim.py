"""Optimiser with the reference's parameter groups, and the learning-rate schedule."""
import math

import paddle

# Never weight-decayed in the reference (DeiT/ConViT): biases, norms (all 1-D) and these.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "gating_param")


def parameter_groups(model, weight_decay, no_decay_on_1d=True, lr_scale=None):
    """The decayed and the undecayed parameters; with `lr_scale(name)` (fine-tuning), each split
    further by the scale of the base learning rate it trains at."""
    by_scale = {}
    for name, param in model.named_parameters():
        if param.stop_gradient:  # frozen (ablations, fine-tuning): not optimised, not decayed
            continue
        skip = no_decay_on_1d and (param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES)
        decay, no_decay = by_scale.setdefault(lr_scale(name) if lr_scale else 1.0, ([], []))
        (no_decay if skip else decay).append(param)
    groups = []
    for scale, (decay, no_decay) in by_scale.items() or [(1.0, ([], []))]:
        extra = {} if scale == 1.0 else {"learning_rate": scale}  # Paddle: a group's scale of the base rate
        groups.append({"params": decay, "weight_decay": weight_decay, **extra})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, **extra})
    return groups


def base_learning_rate(cfg, global_batch_size: int) -> float:
    """optimizer.lr, scaled by global batch / 512 when optimizer.scale_lr (the reference rule)."""
    return cfg.lr * global_batch_size / 512 if cfg.scale_lr else cfg.lr


OPTIMIZERS = {"adamw": paddle.optimizer.AdamW, "adam": paddle.optimizer.Adam, "sgd": paddle.optimizer.Momentum}


def build_optimizer(model, cfg, grad_clip=None, lr_scale=None):
    """The optimiser of optimizer.name over the reference's parameter groups; with grad_clip, the
    norm of all gradients together is clipped before each step (Paddle's own grad_clip would clip
    each parameter group on its own); with lr_scale(name), per-parameter scales of the rate."""
    groups = parameter_groups(model, cfg.weight_decay, cfg.no_decay_on_1d, lr_scale)
    common = dict(parameters=groups, learning_rate=cfg.lr)
    if cfg.name == "adamw":
        kwargs = dict(beta1=cfg.betas[0], beta2=cfg.betas[1], epsilon=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":  # L2 through the groups' weight_decay, as torch's Adam
        kwargs = dict(beta1=cfg.betas[0], beta2=cfg.betas[1], epsilon=cfg.eps)
    else:
        kwargs = dict(momentum=cfg.momentum, use_nesterov=cfg.nesterov)
    optimizer_class = OPTIMIZERS[cfg.name]
    if not grad_clip:
        return optimizer_class(**common, **kwargs)
    return _with_global_norm_clip(optimizer_class)(max_grad_norm=grad_clip, **common, **kwargs)


def _with_global_norm_clip(optimizer_class):
    class GlobalNormClipped(optimizer_class):
        def __init__(self, max_grad_norm, **kwargs):
            super().__init__(**kwargs)
            self.max_grad_norm = max_grad_norm

        def step(self):
            # GradScaler.step unscales the gradients before calling this: the clip sees true norms.
            grads = [p for group in self._param_groups for p in group["params"]
                     if not p.stop_gradient and p.grad is not None]
            paddle.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
            super().step()

    GlobalNormClipped.__name__ = f"GlobalNormClipped{optimizer_class.__name__}"
    return GlobalNormClipped


def learning_rate_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, cfg) -> float:
    """Per-step learning rate: linear warm-up from warmup_lr, then cosine to min_lr (or constant)."""
    if step < warmup_steps:
        return cfg.warmup_lr + (base_lr - cfg.warmup_lr) * step / warmup_steps
    if cfg.name == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
