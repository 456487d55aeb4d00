"""Fine-tuning from published weights through train.py (model.pretrained, finetune.*).

The checkpoints are made here: a freshly initialised tiny ConViT at the published weights' input
(224x224, patch 16, 3 channels, 1000 classes), saved as timm's .safetensors and as .pdparams.
"""
import os

import numpy as np
import paddle
import pytest
from helpers import TRAIN, compose_train, kill_after_checkpoint, read_csv, run, trained, without_timings
from safetensors.numpy import save_file

from convitlab.core.errors import UserError
from convitlab.core.files import file_digest as file_sha256
from convitlab.core.safe_pickle import load_arrays
from convitlab.engine.finetune import adapt_state, backbone_lr_scale
from convitlab.models import create_model
from convitlab.models.convit import resize_pos_embed
from convitlab.models.weights import linear_weight_names, save_pdparams

# A tiny ConViT with the published checkpoints' input and head; on digits resized to 32x32 with
# patch 16 its 14x14 grid becomes 2x2, its 3-channel filters 1-channel and its head 10 classes.
TINY = dict(embed_dim=8, num_heads=4, depth=3, local_up_to_layer=2)
PUBLISHED = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000)
ON_DIGITS = ["model=convit_micro", "model.embed_dim=8", "model.depth=3", "model.local_up_to_layer=2",
             "data.img_size=32", "data.patch_size=16", "data.mean=[0.449]", "data.std=[0.226]",
             "data.batch_size=32", "data.augment.random_crop=false", "trainer.locality_batch_size=8",
             "trainer.progress_bar=false", "model.drop_path_rate=0"]
LR_ZERO = ["optimizer.lr=0", "schedule=constant", "schedule.warmup_epochs=0", "schedule.epochs=1"]


def save_safetensors(model, path):
    """The model's weights as timm writes them (.safetensors, reference layout: Linear weights [out, in])."""
    linear = linear_weight_names(model)
    save_file({name: (t.numpy().T if name in linear else t.numpy()).copy() for name, t in model.state_dict().items()},
              str(path))
    return os.fspath(path)


def published_model(seed=0):
    paddle.seed(seed)
    return create_model("convit_tiny", **TINY, **PUBLISHED)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same weights as timm's .safetensors and as convitlab's .pdparams."""
    folder = tmp_path_factory.mktemp("published")
    model = published_model()
    weights = {name: t.numpy().copy() for name, t in model.state_dict().items()}
    return {"safetensors": save_safetensors(model, folder / "tiny.safetensors"),
            "pdparams": save_pdparams(model, folder / "tiny.pdparams"), "weights": weights}


def expected_on_digits(weights):
    """The file's weights as fine-tuning on 32x32 grey digits must start from (head excepted)."""
    expected = dict(weights)
    expected["patch_embed.proj.weight"] = weights["patch_embed.proj.weight"].sum(axis=1, keepdims=True)
    expected["pos_embed"] = resize_pos_embed(paddle.to_tensor(weights["pos_embed"]), (14, 14), (2, 2)).numpy()
    return expected


@pytest.mark.parametrize("kind", ["safetensors", "pdparams"])
def test_with_lr_zero_one_epoch_leaves_the_files_weights(kind, checkpoints, tmp_path):
    from convitlab.run.launch import run_training

    path = checkpoints[kind]
    cfg = compose_train(*ON_DIGITS, *LR_ZERO, f"model.pretrained={path}")
    row = run_training(cfg, tmp_path)
    assert row["status"] == "completed"
    trained = load_arrays(tmp_path / "checkpoints" / "epoch_0001" / "model.pdparams")
    expected = expected_on_digits(checkpoints["weights"])
    assert set(trained) == set(expected)
    for name, value in trained.items():
        if name.startswith("head."):
            assert value.shape[-1] == 10 and expected[name].shape[-1] == 1000
        else:
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
    assert trained["patch_embed.proj.weight"].shape == (32, 1, 16, 16)
    result = read_csv(tmp_path / "result.csv")[0]
    assert result["pretrained"] == str(path) and result["pretrained_sha256"] == file_sha256(path)


def test_lr_zero_check_has_teeth(checkpoints, tmp_path):
    """The same run with a learning rate moves the backbone away from the file's weights."""
    from convitlab.run.launch import run_training

    cfg = compose_train(*ON_DIGITS, "optimizer.lr=1e-2", "schedule=constant", "schedule.warmup_epochs=0",
                        "schedule.epochs=1", f"model.pretrained={checkpoints['pdparams']}")
    assert run_training(cfg, tmp_path)["status"] == "completed"
    trained = load_arrays(tmp_path / "checkpoints" / "epoch_0001" / "model.pdparams")
    expected = expected_on_digits(checkpoints["weights"])
    assert np.abs(trained["blocks.0.mlp.fc1.weight"] - expected["blocks.0.mlp.fc1.weight"]).max() > 1e-4


def test_every_adapted_tensor_is_one_log_line(checkpoints, tmp_path):
    proc = run(TRAIN + ON_DIGITS + LR_ZERO + ["trainer.max_steps_per_epoch=1", f"hydra.run.dir={tmp_path}",
                                              f"model.pretrained={checkpoints['safetensors']}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "model.pretrained:" in line]
    adapted = [line for line in lines if any(w in line for w in ("resized", "adapted", "re-initialised", "skipped"))]
    assert len(adapted) == 4, lines  # pos_embed, patch filters, head weight and bias
    assert sum("re-initialised head." in line for line in adapted) == 2
    assert any("resized pos_embed" in line and "14x14" in line and "2x2" in line for line in adapted)
    assert any("patch_embed.proj.weight" in line and "summed" in line for line in adapted)
    assert not any("differ from the normalisation" in line for line in lines)  # grey ImageNet statistics given


def test_constant_pos_embed_interpolates_to_a_constant():
    model = create_model("convit_tiny", **TINY, img_size=32, patch_size=16, in_chans=1, num_classes=10)
    state = {name: t.numpy() for name, t in published_model().state_dict().items()}
    constant = np.full_like(state["pos_embed"], 0.0)
    constant[..., :] = np.linspace(-1, 1, constant.shape[-1], dtype=np.float32)  # constant over positions
    state["pos_embed"] = constant
    adapted, notes = adapt_state(model, state)
    assert adapted["pos_embed"].shape == (1, 4, 32)
    np.testing.assert_allclose(adapted["pos_embed"], np.broadcast_to(constant[:, :1], (1, 4, 32)), rtol=0, atol=1e-5)
    assert any("pos_embed" in note for note in notes)


@pytest.mark.parametrize("channel_adapt, factor", [("sum", 1.0), ("mean", 1 / 3)])
def test_grey_image_response_is_kept_by_summing_the_filters(channel_adapt, factor):
    rgb = published_model()
    grey = create_model("convit_tiny", **TINY, img_size=224, patch_size=16, in_chans=1, num_classes=1000)
    state = {name: t.numpy() for name, t in rgb.state_dict().items()}
    adapted, _ = adapt_state(grey, state, channel_adapt=channel_adapt)
    weight = paddle.to_tensor(adapted["patch_embed.proj.weight"])
    image = paddle.rand([1, 1, 224, 224])
    conv = paddle.nn.functional.conv2d
    one = conv(image, weight, stride=16)
    three = conv(image.tile([1, 3, 1, 1]), rgb.patch_embed.proj.weight, stride=16)
    np.testing.assert_allclose(one.numpy(), factor * three.numpy(), rtol=1e-4, atol=1e-5)


def test_freezing_and_backbone_scale_in_one_step(checkpoints):
    from convitlab.engine.finetune import freeze
    from convitlab.engine.optim import build_optimizer

    model = create_model("convit_tiny", **TINY, img_size=32, patch_size=16, in_chans=1, num_classes=10)
    freeze(model, freeze_patch_embed=True, freeze_blocks=1)
    cfg = compose_train("optimizer=sgd", "optimizer.lr=0.1", "optimizer.weight_decay=0").optimizer
    optimizer = build_optimizer(model, cfg, lr_scale=backbone_lr_scale(0.0))
    before = {name: t.numpy().copy() for name, t in model.state_dict().items()}
    model.train()
    loss = model(paddle.rand([4, 1, 32, 32])).square().mean()
    loss.backward()
    optimizer.step()
    after = {name: t.numpy() for name, t in model.state_dict().items()}
    moved = {name for name in before if not np.array_equal(before[name], after[name])}
    assert moved == {"head.weight", "head.bias"}  # backbone at scale 0, frozen layers without gradients
    assert model.patch_embed.proj.weight.stop_gradient and model.blocks[0].attn.qk.weight.stop_gradient
    assert not model.blocks[1].attn.qk.weight.stop_gradient
    # a scale of 0.5: the backbone's SGD step is half of what it is at scale 1
    steps = {}
    for scale in (1.0, 0.5):
        paddle.seed(3)
        m = create_model("convit_tiny", **TINY, img_size=32, patch_size=16, in_chans=1, num_classes=10)
        opt = build_optimizer(m, cfg, lr_scale=backbone_lr_scale(scale))
        start = m.blocks[1].mlp.fc1.weight.numpy().copy()
        paddle.seed(4)
        m(paddle.rand([4, 1, 32, 32])).square().mean().backward()
        opt.step()
        steps[scale] = m.blocks[1].mlp.fc1.weight.numpy() - start
    np.testing.assert_allclose(steps[0.5], 0.5 * steps[1.0], rtol=1e-3, atol=1e-8)  # float32 rounding of w
    assert np.abs(steps[1.0]).max() > 0


def bad_run(tmp_path, pretrained):
    run_dir = tmp_path / f"run_{os.path.basename(pretrained)}"
    return run(TRAIN + ON_DIGITS + LR_ZERO + ["trainer.max_steps_per_epoch=1", f"hydra.run.dir={run_dir}",
                                              f"model.pretrained={pretrained}"], cwd=tmp_path)


def one_error_line(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


def test_bad_files_are_one_line_each(checkpoints, tmp_path):
    other = create_model("convit_tiny", embed_dim=8, num_heads=4, depth=4, local_up_to_layer=1, **PUBLISHED)
    other_arch = save_safetensors(other, tmp_path / "other.safetensors")
    line = one_error_line(bad_run(tmp_path, other_arch))
    assert "other.safetensors" in line and "missing: " in line and "unexpected: " in line
    assert "blocks.1.attn.qk.weight" in line and "blocks.3." in line

    wide = create_model("convit_tiny", embed_dim=12, num_heads=4, depth=3, local_up_to_layer=2, **PUBLISHED)
    line = one_error_line(bad_run(tmp_path, save_pdparams(wide, tmp_path / "wide.pdparams")))
    assert "mis-shaped: " in line and "wide.pdparams" in line

    state = {name: t.numpy() for name, t in published_model().state_dict().items()}
    state["pos_embed"] = state["pos_embed"][:, :195]  # 195 positions: no square grid
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp_path / "notsquare.safetensors"))
    line = one_error_line(bad_run(tmp_path, tmp_path / "notsquare.safetensors"))
    assert "195 positions, not a square grid" in line

    line = one_error_line(bad_run(tmp_path, tmp_path / "absent.safetensors"))
    assert "absent.safetensors" in line and "does not exist" in line

    corrupt = tmp_path / "corrupt.pdparams"
    corrupt.write_bytes(open(checkpoints["pdparams"], "rb").read()[:200])
    line = one_error_line(bad_run(tmp_path, corrupt))
    assert "corrupt.pdparams" in line and "corrupt" in line.split("corrupt.pdparams", 1)[1]
    failed = read_csv(tmp_path / "run_corrupt.pdparams" / "result.csv")[0]
    assert failed["status"] == "failed" and "corrupt.pdparams" in failed["error"]


@pytest.mark.slow
def test_killed_and_resumed_finetune_equals_an_uninterrupted_one(checkpoints, tmp_path):
    """SIGKILL after the second checkpoint; the file is then made unreadable, so a resume that
    applied it again would fail: it continues from its checkpoint and ends as the straight run."""
    pretrained = tmp_path / "tiny.safetensors"
    pretrained.write_bytes(open(checkpoints["safetensors"], "rb").read())
    args = ON_DIGITS + ["schedule.epochs=4", "trainer.max_steps_per_epoch=4", "model.drop_path_rate=0.1",
                        "finetune.backbone_lr_scale=0.1", "finetune.freeze_blocks=1", f"model.pretrained={pretrained}"]
    straight = trained(tmp_path / "straight", args)

    killed = tmp_path / "killed"
    kill_after_checkpoint(TRAIN + args + [f"hydra.run.dir={killed}"], killed, cwd=tmp_path)
    assert not (killed / "result.csv").exists()
    digest = file_sha256(pretrained)
    pretrained.write_bytes(b"not weights")  # same path, so the same config; unreadable if read again
    resumed = run(TRAIN + args + [f"hydra.run.dir={killed}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = resumed.stdout + resumed.stderr
    assert "resuming from" in log and "not applied: the run resumes from its own checkpoint" in log
    assert without_timings(read_csv(killed / "metrics.csv")) == without_timings(read_csv(straight / "metrics.csv"))
    final = [load_arrays(d / "checkpoints" / "epoch_0004" / "model.pdparams") for d in (straight, killed)]
    for name in final[0]:
        np.testing.assert_array_equal(final[0][name], final[1][name], err_msg=name)
    assert read_csv(killed / "result.csv")[0]["pretrained_sha256"] == digest


def test_finetune_keys_are_validated():
    from convitlab.config import validate
    for override, expected in (("finetune.freeze_blocks=7", "0..model.depth=6"),
                               ("finetune.backbone_lr_scale=-1", "a number >= 0")):
        with pytest.raises(UserError, match=expected):
            validate(compose_train(override))
    # finetune.channel_adapt is a closed choice: tests/test_config.py::test_closed_choices_are_refused_while_composing


def test_finetune_preset_gives_each_model_its_own_checkpoint():
    from omegaconf.errors import InterpolationToMissingValueError

    from convitlab.config import validate
    files = {"convit_small": "/ckpt/convit_small.safetensors", "deit_small": "/ckpt/deit_small.pdparams"}
    given = [f"finetune.checkpoints.{model}={path}" for model, path in files.items()]
    for model, path in files.items():
        cfg = compose_train("experiment=finetune", f"model={model}", *given)
        validate(cfg)
        assert cfg.model.pretrained == path and cfg.model.local_up_to_layer == (10 if model == "convit_small" else 0)
        assert (cfg.data.img_size, cfg.data.patch_size, list(cfg.data.mean)) == (224, 16, [0.485, 0.456, 0.406])
        assert cfg.finetune.backbone_lr_scale == 0.1 and cfg.data.num_classes == 100
    with pytest.raises(InterpolationToMissingValueError, match="deit_small"):
        validate(compose_train("experiment=finetune", "model=deit_small", given[0]))
