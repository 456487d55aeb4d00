"""What converts to ONNX and runs in onnxruntime (README.md beside this file says how it was run).

    python experiments/onnx/probe.py graphs <work>    # convitlab's venv: Paddle Inference graphs + dygraph logits
    python experiments/onnx/probe.py convert <work>   # a venv with paddle2onnx and onnxruntime: the table

`graphs` writes, for convit_micro and deit_micro on the digits' image (1x8x8, seeded weights), the
graph export.py writes (`paddle.jit.save` of Paddle's layers) with the batch of the InputSpec
given as None (export.py's), -1, or fixed at 1, 2 or 7, and the dygraph logits at batches 1, 2, 7.
`convert` converts each with paddle2onnx at several opsets, with and without paddle2onnx's own
optimisation and convitlab's repair of Expand's -1 (convitlab/deploy/onnx_export.py), and runs it
in onnxruntime at each batch: a markdown table row per case.
"""
import os
import sys
from pathlib import Path

os.environ["POLYGRAPHY_AUTOINSTALL_DEPS"] = "0"
os.environ.setdefault("GLOG_minloglevel", "2")
MODELS = ("convit_micro", "deit_micro")
DIGITS = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10)
SPECS = {"None": None, "-1": -1, "fixed 1": 1, "fixed 2": 2, "fixed 7": 7}
BATCHES = (1, 2, 7)


def graphs(work: Path) -> None:
    os.environ["CONVITLAB_CPU_KERNELS"] = "0"  # as src/export.py
    import numpy as np
    import paddle

    from convitlab.deploy.export import as_paddle_layers
    from convitlab.models import create_model

    for name in MODELS:
        paddle.seed(3)
        model = as_paddle_layers(create_model(name, **DIGITS))
        model.eval()
        inputs = {b: np.random.default_rng(b).standard_normal((b, 1, 8, 8)).astype(np.float32) for b in BATCHES}
        with paddle.no_grad():
            logits = {b: model(paddle.to_tensor(x)).numpy() for b, x in inputs.items()}
        np.savez(work / f"{name}_reference.npz", **{f"x{b}": inputs[b] for b in BATCHES},
                 **{f"y{b}": logits[b] for b in BATCHES})
        for label, batch in SPECS.items():
            spec = [paddle.static.InputSpec([batch, 1, 8, 8], "float32", "image")]
            folder = work / name / label.replace(" ", "_")
            paddle.jit.save(paddle.jit.to_static(model, input_spec=spec, full_graph=True), str(folder / "inference"))
            print("wrote", folder)


def one_line(exc) -> str:
    return " ".join(str(exc).split())[:220].replace("|", "/")


def run_all(session, reference) -> str:
    """onnxruntime at each batch: the largest difference from the dygraph logits, or the error."""
    import numpy as np

    said = []
    for batch in BATCHES:
        try:
            got = session.run(None, {session.get_inputs()[0].name: reference[f"x{batch}"]})[0]
            said.append(f"b{batch}: {np.abs(got - reference[f'y{batch}']).max():.1e}")
        except Exception as exc:  # noqa: BLE001
            said.append(f"b{batch}: {one_line(exc)[:90]}")
    return "; ".join(said)


def convert(work: Path) -> None:
    import numpy as np
    import onnx
    import onnxruntime
    import paddle2onnx

    from convitlab.deploy.onnx_export import repair_expand_shapes

    print(f"paddle2onnx {paddle2onnx.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}")
    print("| model | InputSpec batch | opset | p2o optimise | repair | onnxruntime load "
          "| batches 1, 2, 7: max abs diff |")
    print("|---|---|---|---|---|---|---|")
    cases = [("None", opset, optimise) for opset in (7, 9, 11, 13, 15, 17, 19, 21) for optimise in (True, False)]
    cases += [(spec, 17, True) for spec in SPECS if spec != "None"]
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    for name in MODELS:
        reference = np.load(work / f"{name}_reference.npz")
        for spec, opset, optimise in cases:
            folder = work / name / spec.replace(" ", "_")
            try:
                data = paddle2onnx.export(str(folder / "inference.json"), str(folder / "inference.pdiparams"), None,
                                          opset_version=opset, auto_upgrade_opset=True, enable_optimize=optimise)
            except BaseException as exc:  # noqa: BLE001  (paddle2onnx's logger calls sys.exit)
                print(f"| {name} | {spec} | {opset} | {optimise} | - | conversion failed: {one_line(exc)} | |")
                continue
            for repair in (False, True):
                model = onnx.load_model_from_string(data)
                used = model.opset_import[0].version
                note = ""
                if repair:
                    changed = repair_expand_shapes(model)
                    if not changed:
                        continue
                    note = ", ".join(f"{n} {s}" for n, s in changed)
                try:
                    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                           providers=["CPUExecutionProvider"])
                except Exception as exc:  # noqa: BLE001
                    print(f"| {name} | {spec} | {opset} (used {used}) | {optimise} | {note or 'no'} | "
                          f"{one_line(exc)} | |")
                    continue
                print(f"| {name} | {spec} | {opset} (used {used}) | {optimise} | {note or 'no'} | ok | "
                      f"{run_all(session, reference)} |")
            sys.stdout.flush()


if __name__ == "__main__":
    stage, where = sys.argv[1], Path(sys.argv[2])
    where.mkdir(parents=True, exist_ok=True)
    {"graphs": graphs, "convert": convert}[stage](where)
