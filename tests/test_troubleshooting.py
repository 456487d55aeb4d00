"""README's Troubleshooting rows not tested elsewhere, through the entry points (src/train.py,
eval.py, convert.py, compare.py as subprocesses): each bad input ends with exactly one line on
stderr naming it and what is allowed or the way out, exit code 2, no traceback, and nothing
half-written (the value rows are in test_train.py's BAD_INPUT, the data files in test_data.py).
Legitimate inputs that once failed (16-bit images, long sweep job names) simply work."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import EVAL, ROOT, TRAIN, read_csv, run
from PIL import Image

QUICK = ["schedule.epochs=1", "trainer.max_steps_per_epoch=1", "data.batch_size=16", "trainer.locality_batch_size=8",
         "trainer.progress_bar=false"]
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # also on a GPU machine: Paddle sees none


def run_without_gpu(command, cwd, timeout=300):
    return run(command, cwd, timeout, env=NO_GPU)


def assert_one_line(proc, *expected):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("error: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]


# (overrides, texts the line must contain, whether the run directory gets a failed result.csv)
BAD_INPUT = [
    # no GPU: what is missing and the CPU alternative; found after composition, so recorded as failed
    (["trainer.device=gpu"], ["trainer.device='gpu'", "no usable GPU", "trainer.device=auto|cpu"], True),
    (["trainer.amp=fp16"], ["trainer.amp='fp16' needs a GPU", "trainer.amp=off"], True),
    (["trainer.amp=bf16"], ["trainer.amp='bf16' needs a GPU", "trainer.amp=off"], True),
    # composition errors: before any run directory exists, so nothing is written
    (["trainer.epoch=3"], ["trainer.epoch is not a config key", "did you mean schedule.epochs?",
                           "the keys of trainer are device, amp"], False),
    (["optimizer.lrr=1"], ["optimizer.lrr is not a config key", "did you mean optimizer.lr?"], False),
    (["model.locality_strenght=1"], ["did you mean model.locality_strength?"], False),
    (["optimizer.lr=abc"], ["optimizer.lr='abc' is not allowed: a number"], False),
    (["data.batch_size=many"], ["data.batch_size='many' is not allowed: an int"], False),
    (["trainer.save_best=maybe"], ["trainer.save_best='maybe' is not allowed: true or false"], False),
    (["data.subset_seed=x"], ["data.subset_seed='x' is not allowed: an int or null"], False),
    (["model=convit_huge"], ["Could not find 'model/convit_huge'", "model is one of convit_base", "deit_tiny"], False),
    (["optimizer=lamb"], ["Could not find 'optimizer/lamb'", "optimizer is one of adam, adamw, sgd"], False),
    (["trainer.device=tpu"], ["trainer.device='tpu' is not allowed: one of auto, cpu, gpu"], False),
    (["data.subset=last"], ["data.subset='last' is not allowed: one of random, first"], False),
    # `+key=` composes (Hydra's own message suggests it): the schema check refuses it, recorded as failed
    (["+trainer.epoch=3"], ["trainer.epoch is not a config key", "did you mean schedule.epochs?"], True),
]


@pytest.mark.parametrize("overrides,expected,recorded", BAD_INPUT)
def test_bad_input_through_train_py_is_one_line_exit_2(tmp_path, overrides, expected, recorded):
    run_dir = tmp_path / "run"
    proc = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"] + overrides, cwd=tmp_path)
    assert_one_line(proc, *expected)
    assert not (run_dir / "checkpoints").exists()
    if recorded:
        assert read_csv(run_dir / "result.csv")[0]["status"] == "failed"
    else:
        assert not run_dir.exists()


def test_eval_py_reports_composition_errors_in_one_line_too(tmp_path):
    proc = run_without_gpu(EVAL + ["ckpt=none.pdparams", "data.batch_size=many", f"hydra.run.dir={tmp_path / 'eval'}"],
               cwd=tmp_path)
    assert_one_line(proc, "data.batch_size='many' is not allowed: an int")


def test_a_sweep_with_a_bad_value_is_refused_in_one_line_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_without_gpu(TRAIN + ["-m", "optimizer.lr=1e-3,abc", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert_one_line(proc, "optimizer.lr='abc' is not allowed: a number")
    assert [p.name for p in sweep.iterdir()] == ["multirun.yaml"]  # Hydra's record of the sweep, no job


@pytest.mark.slow
def test_a_resume_with_another_number_of_ranks_is_one_line(tmp_path):
    """A checkpoint written by 2 CPU ranks (paddle.distributed.launch, as test_distributed.py),
    resumed by one process: refused before training, in one line."""
    run_dir = tmp_path / "run"
    # The real environment: Paddle's launcher fails on an empty CUDA_VISIBLE_DEVICES.
    launch = run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                  "--log_dir", str(tmp_path / "logs"), str(ROOT / "src" / "train.py"), *QUICK,
                  f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert launch.returncode == 0, (launch.stdout + launch.stderr)[-3000:]
    (run_dir / "result.csv").unlink()  # as if killed after its last checkpoint
    proc = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert_one_line(proc, "checkpoints/epoch_0001 was written by 2 rank(s), this run has 1",
                    "resume with the same number of ranks", "trainer.resume=false")
    assert read_csv(run_dir / "result.csv")[0]["status"] == "failed"


# --- issue 24: inputs and faults that once ended in a traceback, a misleading line or wrong data ----

def only_line(proc) -> str:
    """The one line of stderr, after asserting the contract: exit 2, one line, no traceback."""
    assert_one_line(proc)
    return proc.stderr.strip()


@pytest.mark.parametrize("override, key", [("seed=-1", "seed"), ("seed=4294967296", "seed"),
                                           ("data.subset_seed=-3", "data.subset_seed"),
                                           ("data.split_seed=-1", "data.split_seed")])
def test_seeds_are_range_checked_in_the_schema(tmp_path, override, key):
    run_dir = tmp_path / "run"
    proc = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}", override], cwd=tmp_path)
    value = override.split("=")[1]
    allowed = "an int in 0..4294967295" + (" or null" if key == "data.subset_seed" else "")
    assert only_line(proc) == f"error: {key}={value} is not allowed: {allowed}"
    assert read_csv(run_dir / "result.csv")[0]["status"] == "failed"
    assert not (run_dir / "run.json").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("bad, expected", [
    (["seed=-1"], "error: seed=-1 is not allowed: an int in 0..4294967295"),
    # found while the data is built, after the directory was marked as this config's
    (["data.fraction=0.01", "data.batch_size=64"], "error: data.batch_size=64 is more than the ")])
def test_a_run_that_fails_its_checks_leaves_its_directory_to_the_corrected_command(tmp_path, bad, expected):
    run_dir = tmp_path / "run"
    quick = [o for o in QUICK if not o.startswith("data.batch_size=")]
    proc = run_without_gpu(TRAIN + quick + [f"hydra.run.dir={run_dir}", *bad], cwd=tmp_path)
    assert only_line(proc).startswith(expected)
    assert read_csv(run_dir / "result.csv")[0]["status"] == "failed" and not (run_dir / "checkpoints").exists()
    corrected = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert corrected.returncode == 0, corrected.stderr[-2000:]
    assert read_csv(run_dir / "result.csv")[0]["status"] == "completed"
    assert [row["epoch"] for row in read_csv(run_dir / "metrics.csv")] == ["1"]


def test_a_diverged_run_exits_2_with_one_line_and_so_does_its_report(tmp_path):
    """optimizer.lr=1e8 makes the tiny model's loss NaN in its second epoch (the sweep case, which
    carries on: test_checkpoint_integrity.py)."""
    run_dir = tmp_path / "run"
    command = TRAIN + ["debug=fast", "schedule.epochs=2", "optimizer.lr=1e8", f"hydra.run.dir={run_dir}"]
    for attempt in ("trained", "reported"):
        proc = run_without_gpu(command, cwd=tmp_path)
        line = only_line(proc)
        assert line.startswith(f"error: run in {run_dir} diverged (training loss became nan in epoch 2"), line
        assert line.endswith("lower optimizer.lr or set trainer.grad_clip, then run again in another hydra.run.dir "
                             "or with trainer.resume=false"), line
        assert read_csv(run_dir / "result.csv")[0]["status"] == "diverged"
        assert [row["epoch"] for row in read_csv(run_dir / "metrics.csv")] == ["1"]
    assert "not retrained" in proc.stdout


def _not_a_folder(tmp_path, kind):
    """A path where a run directory cannot be: (the path, what the line says about it)."""
    if kind == "file":
        (tmp_path / "taken").write_text("mine")
        return tmp_path / "taken", f"{tmp_path / 'taken'} is a file"
    if kind == "file as a parent":
        (tmp_path / "taken").write_text("mine")
        return tmp_path / "taken" / "run", f"{tmp_path / 'taken' / 'run'}: {tmp_path / 'taken'} is a file"
    if kind == "dangling symlink":
        (tmp_path / "link").symlink_to(tmp_path / "gone")
        return tmp_path / "link", f"{tmp_path / 'link'} is a symbolic link to {tmp_path / 'gone'}, which does not exist"
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    return tmp_path / "a", f"{tmp_path / 'a'} is a symbolic link loop (-> {tmp_path / 'b'})"


@pytest.mark.parametrize("kind", ["file", "file as a parent", "dangling symlink", "symlink loop"])
def test_a_run_directory_that_cannot_be_a_folder_is_one_line(tmp_path, kind):
    run_dir, says = _not_a_folder(tmp_path, kind)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    way_out = {"dangling symlink": "create that folder, or choose another hydra.run.dir",
               "symlink loop": "choose another hydra.run.dir, or replace the link"}.get(
                   kind, "choose another hydra.run.dir, or move it away")
    assert only_line(proc) == f"error: run directory {says}: {way_out}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created, nothing changed
    if "file" in kind:
        assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("too_long", ["name", "path", "path over PATH_MAX"])
def test_a_run_directory_name_or_path_too_long_is_refused_before_training(tmp_path, too_long):
    if too_long == "name":
        run_dir = tmp_path / ("n" * 256)
        expected = "has a folder name of 256 bytes ("
        allowed = "): at most 255 are allowed there: choose another hydra.run.dir, with shorter names"
    else:  # 4060: short enough to be created, too long for the files of a checkpoint inside it
        run_dir = tmp_path.joinpath(*["d" * 200] * 30)
        run_dir = Path(str(run_dir)[:4060 if too_long == "path" else 5000].rstrip("/"))
        expected = f"is a path of {len(str(run_dir))} bytes: at most 3995 are allowed"
        allowed = "choose another hydra.run.dir, shorter"
    proc = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    line = only_line(proc)
    assert line.startswith("error: run directory /") and expected in line and line.endswith(allowed), line
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def read_only_disk(tmp_path, tiny_run):
    """tmp_path/disk: a real read-only file system (a tmpfs remounted ro: needs root) holding a copy
    of the finished tiny run as disk/done."""
    import shutil
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], timeout=30).returncode:
        pytest.skip("mounting a file system needs root (and a kernel that lets this process mount)")
    try:
        shutil.copytree(tiny_run, disk / "done", symlinks=True)
        assert run(["mount", "-o", "remount,ro", str(disk)], timeout=30).returncode == 0
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], timeout=30, check=False)


def files_under(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*"))


@pytest.mark.parametrize("case", ["new run", "finished run again", "eval"])
def test_a_run_directory_on_a_read_only_file_system_is_one_line(tmp_path, read_only_disk, tiny_run, case):
    before = files_under(read_only_disk)
    if case == "eval":
        run_dir = read_only_disk / "eval"
        proc = run_without_gpu(EVAL + [f"ckpt={tiny_run / 'checkpoints' / 'best.pdparams'}",
                                       f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    else:
        run_dir = read_only_disk / ("new" if case == "new run" else "done")
        proc = run_without_gpu(TRAIN + QUICK + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    kept = " (its result.csv says completed: read it where it is)" if case == "finished run again" else ""
    assert only_line(proc) == (f"error: cannot write in run directory {run_dir} (Read-only file system){kept}: "
                               "choose a hydra.run.dir on a file system you can write to")
    assert files_under(read_only_disk) == before


COMPARE = [sys.executable, str(ROOT / "src" / "compare.py")]
CONVERT = [sys.executable, str(ROOT / "src" / "convert.py")]
DIGITS_IMAGE = ["data.img_size=8", "data.patch_size=2", "data.in_chans=1", "data.num_classes=10"]


def test_compare_out_an_existing_file_is_one_line(tmp_path, tiny_run):
    out = tmp_path / "table.csv"
    out.write_text("mine")
    proc = run(COMPARE + [str(tiny_run), "--out", str(out)], cwd=tmp_path)
    assert only_line(proc) == (f"error: --out {out} is a file, not a folder: give a folder for comparison.csv, "
                               "comparison.md and the plots (it is created if missing)")
    assert out.read_text() == "mine" and not list(tiny_run.glob("comparison*"))


def weights_file(tiny_run, path, name=None, value=None):
    """The tiny run's best weights at `path`, with `name` set to `value` (as paddle.save would pickle them)."""
    import pickle

    from convitlab.core.safe_pickle import load_arrays

    state = load_arrays(tiny_run / "checkpoints" / "best.pdparams")
    if name is not None:
        state[name] = value(state[name]) if callable(value) else value
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=4)
    return path


@pytest.mark.parametrize("target", ["folder", "read-only"])
def test_convert_to_a_target_it_cannot_write_is_one_line(tmp_path, tiny_run, target, request):
    if target == "folder":
        out = tmp_path / "out.pdparams"
        out.mkdir()
        expected = (f"error: target={str(out)!r} is not allowed: it is a folder (or not a regular file); give the "
                    "path of the .pdparams file to write")
    else:
        out = request.getfixturevalue("read_only_disk") / "out.pdparams"
        expected = (f"error: cannot write target={str(out)!r} (Read-only file system): give a target on a file "
                    "system you can write to")
    before = files_under(out.parent)
    proc = run(CONVERT + ["model=convit_micro", *DIGITS_IMAGE, f"source={tiny_run / 'checkpoints' / 'best.pdparams'}",
                          f"target={out}"], cwd=tmp_path)
    assert only_line(proc) == expected
    assert files_under(out.parent) == before  # no temporary left beside it


def test_convert_of_a_pdparams_holding_text_is_one_line(tmp_path, tiny_run):
    source = weights_file(tiny_run, tmp_path / "text.pdparams", "head.bias", "ten classes")
    proc = run(CONVERT + ["model=convit_micro", *DIGITS_IMAGE, f"source={source}",
                          f"target={tmp_path / 'out.pdparams'}"], cwd=tmp_path)
    assert only_line(proc) == (f"error: checkpoint {str(source)!r}: head.bias holds a str, not floating-point weights: "
                               "give a file of the model's weights (float16, float32 or float64 arrays)")
    assert not (tmp_path / "out.pdparams").exists()


def eval_failed(tmp_path, ckpt):
    """eval.py on ckpt: its one line, after checking its result.csv says failed with that line."""
    run_dir = tmp_path / "eval"
    proc = run_without_gpu(EVAL + [f"ckpt={ckpt}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    line = only_line(proc)
    result = read_csv(run_dir / "result.csv")[0]
    assert result["status"] == "failed" and result["error"] == line[len("error: "):] and not result["top1"]
    return line


@pytest.mark.parametrize("kind", ["folder", "symlink loop", "dangling symlink"])
def test_eval_ckpt_that_is_not_a_file_says_what_it_is(tmp_path, tiny_run, kind):
    ckpt = tmp_path / "weights.pdparams"
    if kind == "folder":
        ckpt.mkdir()
        says = ("is a folder, not a file: give a .safetensors, .pth, .pdparams file (a run's weights: "
                "<run dir>/checkpoints/best.pdparams)")
    elif kind == "symlink loop":
        ckpt.symlink_to(tmp_path / "other.pdparams")
        (tmp_path / "other.pdparams").symlink_to(ckpt)
        says = f"is a symbolic link loop (-> {tmp_path / 'other.pdparams'}): give a .safetensors, .pth, .pdparams file"
    else:
        ckpt.symlink_to(tmp_path / "gone.pdparams")
        says = (f"is a symbolic link to {tmp_path / 'gone.pdparams'}, which does not exist: give a .safetensors, "
                ".pth, .pdparams file")
    assert eval_failed(tmp_path, ckpt) == f"error: checkpoint {str(ckpt)!r} {says}"


@pytest.mark.parametrize("name, value, says", [
    ("head.weight", lambda w: w.astype("int64"), "holds dtype int64, not floating-point weights"),
    ("head.bias", lambda b: b > 0, "holds dtype bool, not floating-point weights"),
    ("pos_embed", lambda p: np.where(np.arange(p.size).reshape(p.shape) % 7 == 0, np.nan, p).astype(p.dtype),
     "holds 147 NaN or infinite value(s) of 1024"),
    ("head.bias", lambda b: np.full_like(b, np.inf), "holds 10 NaN or infinite value(s) of 10")])
def test_weights_that_are_not_finite_floats_are_refused_naming_the_tensor(tmp_path, tiny_run, name, value, says):
    ckpt = weights_file(tiny_run, tmp_path / "bad.pdparams", name, value)
    line = eval_failed(tmp_path, ckpt)
    assert line.startswith(f"error: checkpoint {str(ckpt)!r}: {name} {says}"), line


def test_16_bit_pngs_are_scaled_to_8_bits_not_saturated(tmp_path):
    """Real 16-bit PNGs (tests/builders.write_png_16): grey scaled by 1/257, RGB read by Pillow as
    each channel's high byte; Pillow's convert("RGB") alone made every grey pixel 255."""
    from builders import write_png_16

    from convitlab.data.sources import FileImages

    grey = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], np.uint16)
    rgb = np.stack([grey, grey[::-1], 65535 - grey], axis=-1)
    paths = [write_png_16(tmp_path / "grey.png", grey), write_png_16(tmp_path / "rgb.png", rgb)]
    assert Image.open(paths[0]).mode == "I;16" and Image.open(paths[1]).mode == "RGB"  # what Pillow makes of them
    images = FileImages(paths, [0, 0], "RGB")
    scaled = np.rint(grey / 257).astype(np.uint8)
    assert np.array_equal(np.asarray(images.load(0)), np.stack([scaled] * 3, axis=-1))
    assert np.array_equal(np.asarray(FileImages(paths, [0, 0], "L").load(0)), scaled)
    assert np.array_equal(np.asarray(images.load(1)), (rgb >> 8).astype(np.uint8))


@pytest.mark.parametrize("mode, make, expected_rgb", [
    ("I", lambda: Image.fromarray(np.array([[0, 257, 65535, 70000]], np.int32)), [0, 1, 255, 255]),
    ("F", lambda: Image.fromarray(np.array([[0, 0.5, 1, 2]], np.float32)), [0, 128, 255, 255]),
    ("P", lambda: _palette_with_transparency(), [0, 255, 0, 0]),
    ("LA", lambda: Image.fromarray(np.array([[[10, 0], [20, 255], [30, 9], [40, 0]]], np.uint8), "LA"),
     [10, 20, 30, 40]),
    ("RGBA", lambda: Image.fromarray(np.array([[[10, 0, 0, 0], [20, 0, 0, 255], [30, 0, 0, 1], [40, 0, 0, 7]]],
                                              np.uint8), "RGBA"), [10, 20, 30, 40]),
    ("CMYK", lambda: Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [0, 255, 0, 0]]],
                                              np.uint8), "CMYK"), [255, 0, 0, 255])])
def test_every_pillow_mode_is_converted_by_one_rule(tmp_path, mode, make, expected_rgb):
    """Files of each mode, saved and read back (TIFF keeps I and F), first channel of RGB compared."""
    from convitlab.data.sources import FileImages

    image = make()
    path = tmp_path / f"image.{'tif' if mode in ('I', 'F', 'CMYK') else 'png'}"
    image.save(path, **({"transparency": image.info["transparency"]} if "transparency" in image.info else {}))
    assert Image.open(path).mode == mode
    assert np.asarray(FileImages([path], [0], "RGB").load(0))[0, :, 0].tolist() == expected_rgb
    assert FileImages([path], [0], "L").load(0).mode == "L"


def _palette_with_transparency():
    image = Image.fromarray(np.array([[0, 1, 2, 3]], np.uint8), "P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    image.info["transparency"] = b"\x00\xff\xff\xff"  # index 0 transparent: Pillow warns when this goes to RGB
    return image


def test_a_run_on_16_bit_pngs_trains_through_train_py(tmp_path):
    from builders import make_16_bit_folder

    root = make_16_bit_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    proc = run_without_gpu(TRAIN + QUICK + ["data=imagefolder", f"data.root={root}", "data.img_size=8",
                                            "data.patch_size=2", "data.num_classes=2", "data.batch_size=2",
                                            "data.num_workers=0", f"hydra.run.dir={run_dir}"],
                           cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr[-2000:]
    assert read_csv(run_dir / "result.csv")[0]["status"] == "completed"


# Each changes what a run computes (none is a neutral key), and each keeps its default's effect.
LONG_NAME = ["model.drop_rate=0.0", "model.attn_drop_rate=0.0", "model.drop_path_rate=0.0",
             "optimizer.weight_decay=0.05", "optimizer.eps=1e-8", "schedule.warmup_lr=1e-6", "schedule.min_lr=1e-5",
             "trainer.label_smoothing=0.1", "trainer.ema_decay=0.999", "data.augment.random_erasing=0.0",
             "data.augment.mix_prob=1.0", "data.augment.mix_switch_prob=0.5", "data.augment.crop_padding=1",
             "trainer.locality_batch_size=8"]


def test_a_sweep_job_whose_name_is_too_long_is_named_by_a_hash_and_resumes(tmp_path):
    from convitlab.core.layout import job_folder_name

    sweep = tmp_path / "sweep"
    command = TRAIN + ["-m", "debug=fast", *LONG_NAME, "seed=0,1", f"hydra.sweep.dir={sweep}"]
    first = run_without_gpu(command, cwd=tmp_path)
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    names = {p.name: (p / "overrides.txt").read_text().strip() for p in jobs}
    for name, overrides in names.items():  # the name each would have had, kept inside
        assert len(overrides) > 255 and job_folder_name(overrides) == name
        keys = {o.split("=")[0] for o in overrides.split(",")}
        assert keys == {o.split("=")[0] for o in [*LONG_NAME, "debug", "seed"]}
    assert sorted(o for overrides in names.values() for o in overrides.split(",") if o.startswith("seed=")) == \
        ["seed=0", "seed=1"]
    assert all(name.startswith("overrides-") and len(name) == 26 for name in names)
    rows = read_csv(sweep / "summary.csv")
    assert sorted((row["seed"], row["status"]) for row in rows) == [("0", "completed"), ("1", "completed")]
    before = {p.name: (p / "metrics.csv").read_text() for p in jobs}
    again = run_without_gpu(command, cwd=tmp_path)  # the same folders: finished jobs are reported
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("not retrained") == 2
    assert {p.name: (p / "metrics.csv").read_text() for p in jobs} == before
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(names)


def test_deleting_the_lock_file_of_a_running_run_does_not_let_a_second_one_in(tmp_path):
    """The run directory itself is locked (run/lock.py): the same command after `rm .lock`
    is refused, and the first run's metrics.csv has each epoch once."""
    import signal
    import subprocess
    import time

    from helpers import started

    run_dir = tmp_path / "run"
    command = TRAIN + ["schedule.epochs=4", "trainer.max_steps_per_epoch=6", "data.batch_size=32",
                       "trainer.locality_batch_size=16", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]
    with started(command, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=NO_GPU) as first:
        deadline = time.time() + 240
        while not (run_dir / "checkpoints" / "epoch_0001").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)  # holds the directory, writes nothing meanwhile
        (run_dir / ".lock").unlink()
        before = files_under(run_dir)
        second = run_without_gpu(command, cwd=tmp_path)
        after = files_under(run_dir)
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    assert only_line(second) == (f"error: run directory {run_dir} is in use by another process (its .lock file, which "
                                 "names it, was deleted): wait for that run to end or stop it (it resumes where it "
                                 "stopped); to run alongside, choose another hydra.run.dir")
    assert after == before
    assert first.returncode == 0, err[-2000:]
    assert [row["epoch"] for row in read_csv(run_dir / "metrics.csv")] == ["1", "2", "3", "4"]
