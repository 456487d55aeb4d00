"""An exported model run by Paddle Inference (Config + create_predictor): no convitlab model code."""
import numpy as np
import paddle
from paddle import inference

from convitlab.core.errors import UserError
from convitlab.deploy import bundle
from convitlab.ops.runtime import cpu_threads

GPU_MEMORY_MB = 256  # Paddle Inference's initial GPU memory pool; it grows as needed


def gpu_available() -> bool:
    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


class Predictor:
    """Logits [B, num_classes] of float32 images [B, C, H, W] (normalised as export.json says)."""

    def __init__(self, folder, device: str = "auto"):
        self.manifest = bundle.read_manifest(folder)
        if device == "gpu" and not gpu_available():
            raise UserError("device='gpu' is not available: this Paddle has no usable GPU (install "
                            "paddlepaddle-gpu, or use device=auto|cpu)")
        self.device = "gpu" if device == "gpu" or (device == "auto" and gpu_available()) else "cpu"
        config = inference.Config(str(bundle.program_file(folder)), str(bundle.program_file(folder).parent /
                                                                        self.manifest.params))
        if self.device == "gpu":
            config.enable_use_gpu(GPU_MEMORY_MB, 0)
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(cpu_threads())
        config.disable_glog_info()
        self._predictor = inference.create_predictor(config)
        self._input = self._predictor.get_input_handle(self._predictor.get_input_names()[0])
        self._output = self._predictor.get_output_handle(self._predictor.get_output_names()[0])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        self._input.reshape(list(images.shape))
        self._input.copy_from_cpu(images)
        self._predictor.run()
        return self._output.copy_to_cpu()
