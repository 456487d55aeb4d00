"""Export a trained model to Paddle Inference: `python src/export.py run=<run dir> out=<folder>`
(the run's best weights, model and data), or `python src/export.py model=<name> ckpt=<file>
[data keys] out=<folder>`. Writes the static graph, its weights and export.json (README: Deploying);
with format=onnx, model.onnx and export.json (the onnx extra: paddle2onnx, onnxruntime).
"""
import os

# Before Paddle and the model load: the exported graph is Paddle's ops, and to_static with
# convitlab's compiled CPU kernels on is known to fail (convitlab/deploy/export.py).
os.environ["CONVITLAB_CPU_KERNELS"] = "0"
# Paddle's C++ log warns on every export that PIR programs take no output tensors as inputs: not the user's concern.
os.environ.setdefault("GLOG_minloglevel", "2")

from convitlab.ops import runtime  # noqa: E402

runtime.setup()  # first: Paddle must load after it (threads, MKL's code path, Paddle's flags)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402

from convitlab.config import register_configs  # noqa: E402
from convitlab.config_errors import report_composition_errors_in_one_line  # noqa: E402
from convitlab.core.errors import exit_in_one_line  # noqa: E402
from convitlab.deploy.export import export  # noqa: E402

register_configs()
report_composition_errors_in_one_line()


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg):
    try:
        manifest = export(cfg, list(HydraConfig.get().overrides.task))
    except Exception as exc:  # noqa: BLE001  (every failure is reported in one line)
        exit_in_one_line(exc)
    names = f", {len(manifest.class_names)} class names" if manifest.class_names else ", no class names"
    where = f"{cfg.out}/{manifest.program} (ONNX opset {manifest.onnx_opset})" if manifest.format == "onnx" else cfg.out
    print(f"exported {manifest.model} ({manifest.checkpoint}) to {where}: input float32 "
          f"[batch, {manifest.in_chans}, {manifest.img_size[0]}, {manifest.img_size[1]}]{names}")
    if manifest.format == "onnx":
        print(f"run it with onnxruntime: input {manifest.input_name!r}, any batch, normalised as {cfg.out}/export.json "
              "says (checked against the model's logits at batch 1 and 2)")
    else:
        print(f"predict with: python src/predict.py model_dir={cfg.out} images=<file or folder>")


if __name__ == "__main__":
    main()
