"""ONNX export (export.py format=onnx): the Paddle Inference graph format=paddle writes, converted by
paddle2onnx in a child process, with one repair that lets onnxruntime take any batch, then checked
in onnxruntime against the dygraph model before it is kept.

Why a child process: paddle2onnx ends the process it runs in when a conversion fails (its logger
calls sys.exit, its C++ code aborts with a multi-line traceback), and its polygraphy step sets
POLYGRAPHY_AUTOINSTALL_DEPS=1, which pip-installs packages into the environment. The child runs
with that switched off and only paddle2onnx's conversion (no polygraphy); its failure is one line.

The repair (experiments/onnx/README.md): paddle2onnx 2.1.0 turns Paddle's `expand_as` (the models'
`pos_embed.expand_as(x)`) into an ONNX Expand to a constant shape taken from the traced graph, whose
dynamic batch is -1: [-1, N, D]. ONNX has no -1 in Expand's shape, and onnxruntime's shape inference
takes it as a size, which it then refuses further on (a Concat's "Inferred=-1 Declared=1", a
Reshape's "Invalid dimension value: -16"). Expand broadcasts: a 1 keeps the input's size there, so
-1 becomes 1, and the expanded pos_embed [1, N, D] is broadcast over the batch by the Add that takes
it, as the model means. Done only where every consumer is an elementwise op that broadcasts.
"""
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from convitlab.core.errors import UserError

# Opsets 9 to 21 all convert and run (experiments/onnx/README.md); from 17 on a LayerNorm is one
# ONNX op (LayerNormalization) instead of its arithmetic.
OPSET = 17
BATCH = "batch"   # the name of the input's and output's first dimension
OUTPUT = "logits"  # the output's name (paddle2onnx: fetch_name_0); the input keeps export.py's, "image"
TOOLS = ("paddle2onnx", "onnx", "onnxruntime")
EXTRA = "pip install -e '.[onnx]' (the onnx extra of pyproject.toml; make setup installs it)"
# ONNX ops that broadcast their inputs elementwise: an Expand feeding only these may keep a size 1.
BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Equal", "Less", "Greater",
                "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Where", "PRelu", "BitShift", "Mod"}
CHECK_BATCHES = (1, 2)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
FAILED = "convitlab: conversion failed: "  # how the child says why, when the failure is a Python exception


def require_tools() -> None:
    """A UserError naming what to install when paddle2onnx, onnx or onnxruntime cannot be imported."""
    for name in TOOLS:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001  (ImportError; paddle2onnx raises ValueError for an old Paddle)
            raise UserError(f"format=onnx needs {', '.join(TOOLS)}, and {name} cannot be imported "
                            f"({' '.join(str(exc).split())}): {EXTRA}") from None


def repair_expand_shapes(model) -> list:
    """Replace the -1 sizes of the constant shapes of `model`'s Expand nodes by 1 (see the module's
    docstring) where every consumer broadcasts; [(node name, old shape)] of those changed."""
    from onnx import numpy_helper

    graph = model.graph
    constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    outputs = {value.name for value in graph.output}
    changed = []
    for node in graph.node:
        if node.op_type != "Expand" or len(node.input) < 2:
            continue
        shape_name = node.input[1]
        if shape_name in constants:
            attribute = next((a for a in constants[shape_name].attribute if a.name == "value"), None)
            tensor = attribute.t if attribute is not None else None
        else:
            tensor = initializers.get(shape_name)
        if tensor is None:
            continue
        shape = numpy_helper.to_array(tensor)
        if not (shape < 0).any():
            continue
        uses = consumers.get(node.output[0], [])
        shared = len(consumers.get(shape_name, [])) > 1  # the constant is read by another node too
        if node.output[0] in outputs or not uses or not set(uses) <= BROADCASTING or shared:
            continue  # left as it is: export.py's check in onnxruntime says what becomes of it
        tensor.CopyFrom(numpy_helper.from_array(np.where(shape < 0, 1, shape).astype(shape.dtype), tensor.name))
        changed.append((node.name, shape.tolist()))
    return changed


def drop_unused_constants(model) -> int:
    """Remove the constants no node reads (paddle2onnx leaves some; onnxruntime warns of each on
    every load); how many."""
    graph = model.graph
    read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    unused = [node for node in graph.node if node.op_type == "Constant" and not set(node.output) & read]
    for node in unused:
        graph.node.remove(node)
    tensors = [tensor for tensor in graph.initializer if tensor.name not in read]
    for tensor in tensors:
        graph.initializer.remove(tensor)
    return len(unused) + len(tensors)


def name_batch_and_output(model) -> None:
    """Call the first dimension of the input and output `batch` (paddle2onnx: DynamicDimension.<i>),
    and the output OUTPUT."""
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH
    if len(graph.output) != 1 or graph.output[0].name == OUTPUT:
        return
    old = graph.output[0].name
    for node in graph.node:
        node.output[:] = [OUTPUT if name == old else name for name in node.output]
        node.input[:] = [OUTPUT if name == old else name for name in node.input]
    graph.output[0].name = OUTPUT


def convert_here(program, params, out, opset: int) -> list:
    """In this process: paddle2onnx's conversion of Paddle Inference's `program` and `params`,
    repaired, without unused constants, its batch and output named, checked by onnx's checker and
    written to `out`; the repairs made."""
    os.environ["POLYGRAPHY_AUTOINSTALL_DEPS"] = "0"
    import onnx
    import paddle2onnx

    # save_file=None: paddle2onnx returns the model instead of writing it, and runs no polygraphy step
    data = paddle2onnx.export(str(program), str(params), None, opset_version=opset, auto_upgrade_opset=True,
                              enable_onnx_checker=True, enable_optimize=True, verbose=False)
    model = onnx.load_model_from_string(data)
    repairs = repair_expand_shapes(model)
    drop_unused_constants(model)
    name_batch_and_output(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return repairs


def convert_in_child(argv) -> None:
    """The child process's main: convert_here(program, params, out, opset); a Python exception is
    one line starting with FAILED and exit code 1 (paddle2onnx's own failures end it themselves)."""
    try:
        convert_here(argv[0], argv[1], argv[2], int(argv[3]))
    except Exception as exc:  # noqa: BLE001
        print(f"{FAILED}{type(exc).__name__}: {' '.join(str(exc).split())}", flush=True)
        sys.exit(1)


def why_it_failed(output: str, returncode: int) -> str:
    """The line of the child's output that says why the conversion failed: its own (FAILED), or
    paddle2onnx's first error line, or the last line."""
    lines = [ANSI.sub("", line).strip() for line in output.splitlines()]
    lines = [line for line in lines if line]
    own = next((line[len(FAILED):] for line in lines if line.startswith(FAILED)), None)
    if own:
        return own[:300]
    said = next((line for line in lines if "error" in line.lower() and "Traceback" not in line), None)
    said = said or (lines[-1] if lines else f"exit code {returncode}")
    return re.sub(r"^(\d{4}-\d\d-\d\d \S+\s+)?(\[[^\]]*\]\s*)+", "", said)[:300]  # less its time and [tags]


def convert(program, params, out, opset: int = OPSET) -> int:
    """convert_here in a child process (see the module's docstring); the opset of the model written
    (`opset`, or the one paddle2onnx raised it to for an op that needs it), or a UserError with the
    reason it failed."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, POLYGRAPHY_AUTOINSTALL_DEPS="0",
               PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    code = "import sys; from convitlab.deploy.onnx_export import convert_in_child; convert_in_child(sys.argv[1:])"
    with tempfile.TemporaryFile() as output:
        proc = subprocess.run([sys.executable, "-c", code, str(program), str(params), str(out), str(opset)],
                              stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env)
        output.seek(0)
        text = output.read().decode(errors="replace")
    if proc.returncode != 0 or not Path(out).is_file():
        raise UserError(f"paddle2onnx could not convert the exported graph: {why_it_failed(text, proc.returncode)}; "
                        "export with format=paddle (Paddle Inference) instead")
    import onnx

    model = onnx.load(str(out))
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def check(onnx_file, reference, in_chans: int, size, threads: int = 1) -> float:
    """Run `onnx_file` in onnxruntime at CHECK_BATCHES random images and compare its logits with
    `reference(images)`'s (the dygraph model's); the largest difference, or a UserError."""
    import onnxruntime

    images = {batch: np.random.default_rng(batch).standard_normal((batch, in_chans, *size)).astype(np.float32)
              for batch in CHECK_BATCHES}
    wanted = {batch: reference(x) for batch, x in images.items()}
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # fatal only: an error comes back as the exception, said in one line
    options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        worst = 0.0
        for batch in CHECK_BATCHES:
            got = session.run(None, {input_name: images[batch]})[0]
            want = wanted[batch]
            if got.shape != want.shape:
                raise UserError(f"onnxruntime's output at batch {batch} is {list(got.shape)}, the model's "
                                f"{list(want.shape)}")
            worst = max(worst, float(np.abs(got - want).max()))
            if not worst <= 1e-3 * max(1.0, float(np.abs(want).max())):
                raise UserError(f"onnxruntime's logits at batch {batch} differ from the model's by {worst:.3g}")
    except UserError as exc:
        raise UserError(f"the converted model is wrong: {exc}; export with format=paddle instead") from None
    except Exception as exc:  # noqa: BLE001  (onnxruntime's errors: one line)
        message = " ".join(str(exc).split())[:300]
        raise UserError(f"onnxruntime cannot run the converted model ({message}); export with format=paddle "
                        "instead") from None
    return worst
