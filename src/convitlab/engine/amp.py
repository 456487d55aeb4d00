"""Mixed precision on a GPU (trainer.amp=fp16|bf16): what a device supports, and a loss scaler
that survives a gradient overflow.

Paddle's auto_cast turns itself off with a warning when the GPU cannot run the requested type
(float16 below compute capability 7.0; bfloat16 below 8.0 or with CUDA < 11), so a run would
train in float32 while its config says fp16/bf16: such a run is refused instead
(check_amp_supported).

Paddle's GradScaler.update() (3.0-3.3) prints `float(self._scale)` of a shape-[1] tensor when it
lowers the scale after an inf/nan step; NumPy >= 2.4 refuses that conversion, so with it fp16
training would fail at its first overflow. LossScaler does the same update without the
conversion, and keeps what the training loop needs: whether the last step was skipped, the
skipped steps, and the scale as a Python number (no device sync to read it).
"""
import logging

import numpy as np
import paddle

from convitlab.core.errors import UserError

log = logging.getLogger(__name__)

AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
INITIAL_LOSS_SCALE = 2.0 ** 16
# Below a scale of 1 the scaled gradients are no larger than the true ones: an overflow there is
# not the scaling's doing (the loss or its gradients are not finite whatever the scale), so the
# scaler cannot explain it and the run has diverged. From 2**16, 17 overflows in a row get there.
MIN_LOSS_SCALE = 1.0


def amp_unsupported_reason(amp: str, capability, cuda_version, rocm: bool = False):
    """Why a GPU of this compute capability (major, minor) and CUDA version (e.g. "12.6") cannot
    run trainer.amp=`amp`, or None when it can. The rules are the ones under which Paddle's
    auto_cast (3.0-3.3) silently switches itself off."""
    if amp == "off" or rocm:  # ROCm: Paddle enables both types
        return None
    major, minor = (int(v) for v in tuple(capability)[:2])
    if amp == "fp16" and major < 7:
        return f"float16 needs compute capability >= 7.0, this GPU has {major}.{minor}"
    if amp == "bf16":
        if major < 8:
            return f"bfloat16 needs compute capability >= 8.0 (Ampere or newer), this GPU has {major}.{minor}"
        try:
            cuda_major = int(str(cuda_version).split(".")[0])
        except ValueError:
            cuda_major = 0
        if cuda_major < 11:
            return f"bfloat16 needs CUDA >= 11, this Paddle is built with CUDA {cuda_version}"
    return None


def check_amp_supported(amp: str, device: str) -> None:
    """UserError (one line) unless this process's device can run trainer.amp=`amp`."""
    if amp == "off":  # else fp16 or bf16: config.Precision and bench.py's --amp choices allow nothing else
        return
    if device != "gpu":
        raise UserError(f"trainer.amp={amp!r} needs a GPU: use trainer.amp=off on the CPU")
    capability = paddle.device.cuda.get_device_capability()
    reason = amp_unsupported_reason(amp, capability, paddle.version.cuda(), paddle.is_compiled_with_rocm())
    if reason is not None:
        name = paddle.device.cuda.get_device_name()
        other = "trainer.amp=fp16" if amp == "bf16" and amp_unsupported_reason("fp16", capability, None) is None \
            else "trainer.amp=off"
        raise UserError(f"trainer.amp={amp!r} is not supported on {name}: {reason} (Paddle would silently "
                        f"train in float32); use {other}")


def _as_bool(flag) -> bool:
    """A found-inf flag (Python bool or a one-element tensor) as a bool, whatever the NumPy."""
    if isinstance(flag, paddle.Tensor):
        return bool(np.asarray(flag.numpy()).reshape(-1).any())
    return bool(flag)


class LossScaler(paddle.amp.GradScaler):
    """paddle.amp.GradScaler (dynamic loss scaling for float16) whose scale update works with
    any NumPy, and which records the steps it skips.

    After step(): `last_step_skipped` (the gradients held an inf/nan, the update was not
    applied), `skipped_steps` (since construction) and `loss_scale` (a Python float: no sync).
    """

    def __init__(self, init_loss_scaling: float = INITIAL_LOSS_SCALE, **kwargs):
        super().__init__(init_loss_scaling=init_loss_scaling, **kwargs)
        self.last_step_skipped = False
        self.skipped_steps = 0
        self.loss_scale = float(init_loss_scaling) if self.is_enable() else 1.0

    def step(self, optimizer) -> None:
        super().step(optimizer)
        # Paddle's optimiser already read the flag on the host to decide whether to skip.
        self.last_step_skipped = bool(self.is_enable() and _as_bool(self._cache_found_inf))
        self.skipped_steps += self.last_step_skipped

    def _update(self):  # private API: paddle.amp.AmpScaler._update
        # GradScaler._update's logic, without its float() of a shape-[1] tensor.
        if not self._enable:
            return
        if _as_bool(self._cache_found_inf):
            self._incr_count = 0
            self._decr_count += 1
            if self._decr_count >= self._decr_every_n_nan_or_inf:
                self._scale = self._scale * self._decr_ratio
                self.loss_scale *= float(self._decr_ratio)
                self._decr_count = 0
                log.debug("gradient overflow: step skipped, loss scale lowered to %g", self.loss_scale)
        else:
            self._decr_count = 0
            self._incr_count += 1
            if self._incr_count >= self._incr_every_n_steps:
                self._scale = self._scale * self._incr_ratio
                self.loss_scale *= float(self._incr_ratio)
                self._incr_count = 0

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        if self.is_enable():
            # the scale (shape-[1] tensor, array or number) as a Python float, whatever the NumPy
            scale = self._scale.numpy() if isinstance(self._scale, paddle.Tensor) else self._scale
            self.loss_scale = float(np.asarray(scale, dtype=np.float64).reshape(-1)[0])

    def overflow_unexplained(self) -> bool:
        """The scale fell below MIN_LOSS_SCALE: overflows the scaling cannot account for."""
        return self.is_enable() and self.loss_scale < MIN_LOSS_SCALE


def backward_and_step(objective, optimizer, scaler) -> bool:
    """One optimiser step on `objective` (through the loss scaler when there is one), gradients
    cleared after; True when the scaler skipped it (a gradient overflow: no update, scale halved)."""
    if scaler is not None:
        scaler.scale(objective).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        objective.backward()
        optimizer.step()
    optimizer.clear_grad()
    return scaler is not None and scaler.last_step_skipped


def amp_settings(amp: str, device: str):
    """(auto_cast dtype or None, LossScaler or None) for trainer.amp on `device`."""
    check_amp_supported(amp, device)
    if amp == "off":
        return None, None
    return AMP_DTYPES[amp], (LossScaler() if amp == "fp16" else None)
