"""Deploying: export.py writes a Paddle Inference model whose logits are the dygraph model's;
predict.py classifies image files through paddle.inference as the dygraph model does; format=onnx
writes an ONNX model whose logits through onnxruntime are the dygraph model's, at any batch; bad
input is one line. Tiny models, real files, the real entry points."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from helpers import QUICK, ROOT, read_csv, run, trained
from PIL import Image
from sklearn.datasets import load_digits

from convitlab.core.files import file_digest as file_sha256
from convitlab.data.sources import FileImages
from convitlab.data.transforms import EvalTransform, Normalise
from convitlab.core.errors import UserError
from convitlab.deploy import onnx_export
from convitlab.deploy.bundle import MANIFEST, ONNX, PARAMS
from convitlab.deploy.inference import Predictor
from convitlab.models import create_model
from convitlab.models.weights import load_pretrained, save_pdparams

EXPORT = [sys.executable, str(ROOT / "src" / "export.py")]
PREDICT = [sys.executable, str(ROOT / "src" / "predict.py")]
DIGITS = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10)  # conf/data/digits.yaml's image


def exported(out, *arguments):
    """`python src/export.py <arguments> out=<out>`, which must succeed; out."""
    proc = run(EXPORT + list(arguments) + [f"out={out}"], cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def dygraph(name, ckpt, **image):
    """The dygraph model `name` with the weights of `ckpt`, in evaluation mode."""
    model = load_pretrained(create_model(name, **{**DIGITS, **image}), ckpt)
    model.eval()
    return model


def assert_same_logits(model, export_dir, shape):
    """paddle.inference's logits equal the dygraph model's to 1e-4 at batch 1 and 7."""
    predictor = Predictor(export_dir, "cpu")
    for batch in (1, 7):
        images = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
        with paddle.no_grad():
            want = model(paddle.to_tensor(images)).numpy()
        got = predictor(images)
        assert got.shape == want.shape == (batch, 10)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def write_pngs(folder, count=4):
    """Digits as 8-bit PNGs, grey at their 8x8 and RGB at 24x24 (predict.py resizes), plus a file
    that is not an image; the image files, in name order."""
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    for i in range(count):
        pixels = np.rint(digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"grey_{i}.png")
        Image.fromarray(np.stack([pixels] * 3, axis=-1), "RGB").resize((24, 24)).save(folder / f"rgb_{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return sorted(p for p in folder.iterdir() if p.name != "broken.png")


def dygraph_classes(model, files, size, mean=(0.5,), std=(0.5,)):
    """The class the dygraph model gives each file, read and preprocessed as evaluation does."""
    transform = EvalTransform(size, Normalise(np.asarray(mean, np.float32), np.asarray(std, np.float32), 1))
    images = FileImages(files, np.zeros(len(files)), "L")
    batch = np.stack([transform(images.load(i)) for i in range(len(files))])
    with paddle.no_grad():
        return model(paddle.to_tensor(batch)).numpy().argmax(axis=1).tolist()


def assert_predicts_like(model, export_dir, folder, size, tmp_path):
    files = write_pngs(folder)
    out = tmp_path / "predictions.csv"
    proc = run(PREDICT + [f"model_dir={export_dir}", f"images={folder}", f"out={out}", "topk=3", "batch_size=3"],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{len(files) + 1} image(s), 1 unreadable" in proc.stdout
    rows = {row["path"]: row for row in read_csv(out)}
    assert list(read_csv(out)[0]) == ["path", "top1", "top1_name", "top1_prob", "top2", "top2_name", "top2_prob",
                                      "top3", "top3_name", "top3_prob", "error"]
    broken = rows.pop(str(folder / "broken.png"))
    assert broken["top1"] == "" and broken["error"].startswith(f"cannot read image {folder / 'broken.png'}")
    assert [rows[str(f)]["error"] for f in files] == [""] * len(files)
    assert [int(rows[str(f)]["top1"]) for f in files] == dygraph_classes(model, files, size)
    assert all(rows[str(f)]["top1_name"] == rows[str(f)]["top1"] for f in files)  # digits' names: "0".."9"
    assert all(float(rows[str(f)]["top1_prob"]) >= float(rows[str(f)]["top2_prob"]) for f in files)


@pytest.fixture(scope="module")
def deit_checkpoint(tmp_path_factory):
    paddle.seed(3)
    return save_pdparams(create_model("deit_micro", **DIGITS), tmp_path_factory.mktemp("deit") / "deit.pdparams")


@pytest.fixture(scope="module")
def deit_export(deit_checkpoint, tmp_path_factory):
    """deit_checkpoint exported (model=deit_micro ckpt=): read, never changed, by the tests of predict.py."""
    return exported(tmp_path_factory.mktemp("deit_export") / "export", "model=deit_micro", f"ckpt={deit_checkpoint}")


def test_export_of_a_run_gives_the_dygraph_logits_and_classes(tiny_run, tmp_path):
    """convit_micro from a training run (run=): its best weights, its model and data."""
    out = exported(tmp_path / "export", f"run={tiny_run}")
    best = tiny_run / "checkpoints" / "best.pdparams"
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["img_size"] == [8, 8] and manifest["in_chans"] == 1 and manifest["mean"] == [0.5]
    assert manifest["class_names"] == [str(i) for i in range(10)] and manifest["framing"] == "resize"
    assert manifest["checkpoint"] == str(best) and manifest["checkpoint_sha256"] == file_sha256(best)
    assert (out / manifest["program"]).is_file() and (out / PARAMS).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]  # nothing beside it
    model = dygraph("convit_micro", best)
    assert_same_logits(model, out, (1, 8, 8))
    assert_predicts_like(model, out, tmp_path / "pngs", (8, 8), tmp_path)


def test_export_of_a_checkpoint_gives_the_dygraph_logits(deit_checkpoint, tmp_path):
    """deit_micro from a checkpoint of a named size (model=, ckpt=) on the digits' image."""
    out = exported(tmp_path / "export", "model=deit_micro", f"ckpt={deit_checkpoint}")
    assert_same_logits(dygraph("deit_micro", deit_checkpoint), out, (1, 8, 8))
    again = exported(out, "model=deit_micro", f"ckpt={deit_checkpoint}")  # an earlier export is replaced
    assert sorted(p.name for p in again.iterdir()) == sorted([MANIFEST, "inference.json", PARAMS])


@pytest.mark.slow
def test_export_of_a_finetuned_run_at_another_resolution(tiny_run, tmp_path):
    """A run fine-tuned at 16x16 from the 8x8 run's weights (pos_embed interpolated) exports at 16x16."""
    best = tiny_run / "checkpoints" / "best.pdparams"
    finetuned = trained(tmp_path / "finetune", QUICK + [f"model.pretrained={best}", "data.img_size=16"])
    out = exported(tmp_path / "export", f"run={finetuned}")
    assert json.loads((out / MANIFEST).read_text())["img_size"] == [16, 16]
    model = dygraph("convit_micro", finetuned / "checkpoints" / "best.pdparams", img_size=16)
    assert_same_logits(model, out, (1, 16, 16))
    assert_predicts_like(model, out, tmp_path / "pngs", (16, 16), tmp_path)


def test_predict_one_file_prints_one_line(deit_checkpoint, deit_export, tmp_path):
    image = write_pngs(tmp_path / "pngs", count=1)[0]
    proc = run(PREDICT + [f"model_dir={deit_export}", f"images={image}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, last = proc.stdout.strip().splitlines()
    top1 = dygraph_classes(dygraph("deit_micro", deit_checkpoint), [image], (8, 8))[0]
    assert first.startswith(f"{image}: {top1} ({top1}) ")
    assert last == "1 image(s), 0 unreadable, on the cpu: predictions.csv"
    assert len(read_csv(tmp_path / "predictions.csv")[0]) == 1 + 3 * 5 + 1  # path, top 5 (index, name, prob), error


def test_prediction_imports_no_model_code():
    code = ("import sys; import convitlab.deploy.inference, convitlab.deploy.predictions; "
            "print(sorted(m for m in sys.modules if m.startswith(('convitlab.models.', 'convitlab.ops.cpu', "
            "'convitlab.engine'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def one_line_error(proc, *expected):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize("case", ["no checkpoint", "another image size", "size not in patches", "out a file",
                                  "out not writable", "out holds other files", "no out"])
def test_bad_export_input_is_one_line_and_writes_nothing(case, tiny_run, tmp_path):
    out = tmp_path / "export"
    arguments = [f"run={tiny_run}", f"out={out}"]
    if case == "no checkpoint":
        (tiny_run / "checkpoints" / "best.pdparams").unlink()
        expected = [f"run={str(tiny_run)!r} has no checkpoints/best.pdparams", "give ckpt=<file>"]
    elif case == "another image size":
        arguments.append("data.img_size=16")
        expected = ["data.img_size=16 is not allowed: the checkpoint",
                    "takes a 4x4 grid of patches (data.img_size=8 at patch 2)"]
    elif case == "size not in patches":
        arguments.append("data.img_size=9")
        expected = ["data.img_size=9 is not allowed: sides divisible by model.patch_size=2"]
    elif case == "out a file":
        out.write_text("")
        expected = [f"out={str(out)!r} is not allowed: it is a file"]
    elif case == "out not writable":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "export"
        arguments[-1] = f"out={out}"
        expected = [f"cannot write out={str(out)!r} ({tmp_path / 'file'} is a file)"]
    elif case == "out holds other files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expected = ["is a folder holding other files than an export"]
    else:
        arguments.pop()
        expected = ["out=<folder> is required"]
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(run(EXPORT + arguments, cwd=tmp_path), *expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no export, no temporary folder
    if case == "out holds other files":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("case", ["not an export", "missing folder", "topk above classes", "out a folder",
                                  "out below a file", "no images"])
def test_bad_predict_input_is_one_line_and_writes_nothing(case, deit_export, tmp_path):
    images = write_pngs(tmp_path / "pngs", count=1)[0]
    arguments = {"model_dir": deit_export, "images": images, "out": tmp_path / "predictions.csv"}
    if case == "not an export":
        (tmp_path / "empty").mkdir()
        arguments["model_dir"] = tmp_path / "empty"
        expected = [f"model_dir={str(tmp_path / 'empty')!r} is not an export folder: it holds no inference.json",
                    "give the folder export.py wrote"]
    elif case == "missing folder":
        arguments["model_dir"] = tmp_path / "nowhere"
        expected = ["is not an export folder: it is not found"]
    elif case == "topk above classes":
        arguments["topk"] = 11
        expected = ["topk=11 is not allowed: 1..10 (the model's classes)"]
    elif case == "out a folder":
        arguments["out"] = tmp_path / "pngs"
        expected = ["is not allowed: a file path for the CSV; it is a folder"]
    elif case == "out below a file":
        arguments["out"] = images / "predictions.csv"
        expected = [f"cannot write out={str(images / 'predictions.csv')!r} ({images} is a file)"]
    else:
        (tmp_path / "none").mkdir()
        arguments["images"] = tmp_path / "none"
        expected = ["this folder holds none"]
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run(PREDICT + [f"{key}={value}" for key, value in arguments.items()], cwd=tmp_path)
    one_line_error(proc, *expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_export_of_an_image_folder_model_keeps_its_class_names_and_centre_crop(val_only_folder, tmp_path):
    """An image folder's model (3 channels, ImageNet's mean/std): its class folders name the classes, and
    predict.py frames images as evaluation does there (short side to img_size/0.875, the centre)."""
    image = dict(img_size=16, patch_size=4, in_chans=3, num_classes=2)
    paddle.seed(5)
    ckpt = save_pdparams(create_model("deit_micro", **image), tmp_path / "folder.pdparams")
    out = exported(tmp_path / "export", "model=deit_micro", f"ckpt={ckpt}", "data=imagefolder",
                   f"data.root={val_only_folder}", "data.img_size=16", "data.patch_size=4", "data.num_classes=2")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["class_names"] == ["cat", "dog"] and manifest["framing"] == "resize_and_centre_crop"
    assert manifest["in_chans"] == 3 and manifest["mean"] == [0.485, 0.456, 0.406]
    files = sorted((val_only_folder / "val").rglob("*.png"))
    proc = run(PREDICT + [f"model_dir={out}", f"images={val_only_folder / 'val'}", "topk=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_csv(tmp_path / "predictions.csv")
    assert [row["path"] for row in rows] == [str(f) for f in files]
    model = load_pretrained(create_model("deit_micro", **image), ckpt)
    model.eval()
    transform = EvalTransform((16, 16), Normalise(np.asarray(manifest["mean"], np.float32),
                                                  np.asarray(manifest["std"], np.float32), 3), centre_crop=True)
    reader = FileImages(files, np.zeros(len(files)), "RGB")
    with paddle.no_grad():
        want = model(paddle.to_tensor(np.stack([transform(reader.load(i)) for i in range(len(files))]))).numpy()
    assert [int(row["top1"]) for row in rows] == want.argmax(axis=1).tolist()
    assert [row["top1_name"] for row in rows] == [["cat", "dog"][c] for c in want.argmax(axis=1)]


# ONNX (format=onnx): the onnx extra of pyproject.toml, which make setup installs. Where it is not
# installed the tests that need it are skipped, with the reason; not in CI (CI=true), where a
# missing extra is a failure rather than a quiet skip.
ONNX_TOOLS = all(importlib.util.find_spec(name) for name in onnx_export.TOOLS)
needs_onnx = pytest.mark.skipif(not ONNX_TOOLS and os.environ.get("CI") != "true",
                                reason="the onnx extra is not installed: pip install -e '.[onnx]'")


def assert_same_onnx_logits(model, export_dir, shape):
    """model.onnx through onnxruntime gives the dygraph model's logits to 1e-4 at batch 1 and 7,
    from one session: its batch is any batch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(export_dir / ONNX), providers=["CPUExecutionProvider"])
    (image,), (logits,) = session.get_inputs(), session.get_outputs()
    assert (image.name, image.shape) == ("image", ["batch", *shape])
    assert (logits.name, logits.shape) == ("logits", ["batch", 10])
    for batch in (1, 7):
        images = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
        with paddle.no_grad():
            want = model(paddle.to_tensor(images)).numpy()
        got = session.run(None, {"image": images})[0]
        assert got.shape == want.shape == (batch, 10)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def assert_onnx_folder(out, checkpoint):
    """out holds model.onnx and export.json only; export.json says what it is."""
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, ONNX])
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["format"], manifest["program"], manifest["params"]) == ("onnx", ONNX, None)
    assert manifest["onnx_opset"] == onnx_export.OPSET and manifest["input_name"] == "image"
    assert manifest["img_size"] == [8, 8] and manifest["in_chans"] == 1 and manifest["mean"] == [0.5]
    assert manifest["class_names"] == [str(i) for i in range(10)]
    assert manifest["checkpoint"] == str(checkpoint) and manifest["checkpoint_sha256"] == file_sha256(checkpoint)


@needs_onnx
@pytest.mark.slow
def test_onnx_export_of_a_run_gives_the_dygraph_logits_at_any_batch(tiny_run, tmp_path):
    """convit_micro from a training run (run=): its best weights, its model and data; predict.py,
    which runs Paddle Inference, refuses the folder in one line."""
    out = exported(tmp_path / "export", f"run={tiny_run}", "format=onnx")
    best = tiny_run / "checkpoints" / "best.pdparams"
    assert_onnx_folder(out, best)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]  # nothing beside it
    assert_same_onnx_logits(dygraph("convit_micro", best), out, (1, 8, 8))
    image = write_pngs(tmp_path / "pngs", count=1)[0]
    proc = run(PREDICT + [f"model_dir={out}", f"images={image}"], cwd=tmp_path)
    one_line_error(proc, f"model_dir={str(out)!r} is an ONNX export (model.onnx)", "export again with format=paddle")
    assert not (tmp_path / "predictions.csv").exists()


@needs_onnx
def test_onnx_export_of_a_checkpoint_gives_the_dygraph_logits_at_any_batch(deit_checkpoint, tmp_path):
    """deit_micro from a checkpoint of a named size (model=, ckpt=) on the digits' image; the check
    export.py makes in onnxruntime refuses logits that are not the model's."""
    out = exported(tmp_path / "export", "model=deit_micro", f"ckpt={deit_checkpoint}", "format=onnx")
    assert_onnx_folder(out, deit_checkpoint)
    model = dygraph("deit_micro", deit_checkpoint)
    assert_same_onnx_logits(model, out, (1, 8, 8))

    def logits(images, shift=0.0):
        with paddle.no_grad():
            return model(paddle.to_tensor(images)).numpy() + shift

    assert onnx_export.check(out / ONNX, logits, 1, (8, 8)) < 1e-5
    with pytest.raises(UserError, match=r"^the converted model is wrong: onnxruntime's logits at batch 1 differ "
                                        r"from the model's by 0\.01; export with format=paddle instead$"):
        onnx_export.check(out / ONNX, lambda images: logits(images, 0.01), 1, (8, 8))


def test_bad_format_and_missing_onnx_tools_are_one_line_and_write_nothing(deit_checkpoint, tmp_path):
    """format= other than paddle|onnx; format=onnx where paddle2onnx cannot be imported (a package
    on PYTHONPATH that says so, as Python does for a missing one): the extra to install."""
    arguments = ["model=deit_micro", f"ckpt={deit_checkpoint}", f"out={tmp_path / 'export'}"]
    one_line_error(run(EXPORT + arguments + ["format=tflite"], cwd=tmp_path),
                   "format='tflite' is not allowed: one of paddle, onnx")
    missing = tmp_path / "without" / "paddle2onnx"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'paddle2onnx'\", "
                                         "name='paddle2onnx')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(missing.parent), os.environ.get("PYTHONPATH", "")]))
    proc = run(EXPORT + arguments + ["format=onnx"], cwd=tmp_path, env=env)
    one_line_error(proc, "format=onnx needs paddle2onnx, onnx, onnxruntime, and paddle2onnx cannot be imported",
                   "pip install -e '.[onnx]'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["without"]


@needs_onnx
def test_a_failed_conversion_is_one_line(tmp_path):
    """paddle2onnx ends the process it converts in when it fails (sys.exit, or a C++ abort): in
    its child process, its reason becomes one line."""
    program, params = tmp_path / "inference.json", tmp_path / "inference.pdiparams"
    program.write_text("{not a program")
    params.write_bytes(b"")
    with pytest.raises(UserError) as caught:
        onnx_export.convert(program, params, tmp_path / ONNX)
    message = str(caught.value)
    assert message.startswith("paddle2onnx could not convert the exported graph: ") and "\n" not in message
    assert "parse error" in message and message.endswith("export with format=paddle (Paddle Inference) instead")
    assert not (tmp_path / ONNX).exists()
    (tmp_path / ONNX).write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"^onnxruntime cannot run the converted model \(\[ONNXRuntimeError\]"):
        onnx_export.check(tmp_path / ONNX, lambda images: np.zeros((len(images), 10), np.float32), 1, (8, 8))


@needs_onnx
def test_the_expand_repair_is_made_only_where_broadcasting_makes_it_exact():
    """paddle2onnx writes Paddle's expand_as(x) as an Expand to a constant shape with the traced
    batch, -1; the repair makes it 1 where an elementwise op broadcasts the result over the batch
    (the same numbers at any batch), and leaves it where the result is used otherwise."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    def graph(consumer):
        row = helper.make_node("Constant", [], ["row"], value=numpy_helper.from_array(np.arange(4, dtype=np.float32)
                                                                                      .reshape(1, 4), "row"))
        shape = helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([-1, 4]), "shape"))
        expand = helper.make_node("Expand", ["row", "shape"], ["rows"], name="Expand.0")
        use = helper.make_node(consumer, ["x", "rows"], ["y"], **({"axis": 1} if consumer == "Concat" else {}))
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8 if consumer == "Concat" else 4])
        return helper.make_model(helper.make_graph([row, shape, expand, use], "g", [x], [y]),
                                 opset_imports=[helper.make_opsetid("", 17)])

    added = graph("Add")
    assert onnx_export.repair_expand_shapes(added) == [("Expand.0", [-1, 4])]
    session = onnxruntime.InferenceSession(added.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x + np.arange(4, dtype=np.float32))
    concatenated = graph("Concat")
    assert onnx_export.repair_expand_shapes(concatenated) == []
    assert numpy_helper.to_array(concatenated.graph.node[1].attribute[0].t).tolist() == [-1, 4]
