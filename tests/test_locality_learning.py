"""Nothing holds GPSA's gates or positional projections still: they learn at the demo's learning
rate, with and without EMA, and the locality a run records is measured on the weights it says
(the EMA's when trainer.ema is on)."""
import numpy as np
import paddle
import pytest
from helpers import QUICK, compose_train, read_csv, trained

from convitlab.data import build_datasets, build_loaders
from convitlab.data.mixing import smoothed_one_hot
from convitlab.engine.ema import ModelEMA
from convitlab.engine.metrics import soft_target_cross_entropy
from convitlab.engine.optim import build_optimizer
from convitlab.models.registry import build_model

DEMO_LR = 1e-3  # conf/experiment/demo.yaml
FLOAT_NOISE = 1e-6  # far above float32 rounding of values near 1, far below one Adam step at DEMO_LR


def gpsa_parameters(model) -> dict:
    # Not pos_proj.bias: it adds one constant to all of a head's positional scores, which the
    # softmax takes out, so its gradient is zero (float noise) and it rightly stays where it is.
    return {name: value.numpy().copy() for name, value in model.named_parameters()
            if name.endswith(("gating_param", "pos_proj.weight"))}


@pytest.mark.parametrize("ema", [False, True])
def test_a_few_steps_at_the_demos_learning_rate_move_every_gate_and_positional_projection(ema):
    cfg = compose_train("model=convit_micro", f"optimizer.lr={DEMO_LR}", "data.batch_size=32",
                        f"trainer.ema={str(ema).lower()}")
    paddle.seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.trainer.grad_clip)
    average = ModelEMA(model, cfg.trainer.ema_decay) if ema else None
    before = gpsa_parameters(model)
    assert len(before) == 2 * cfg.model.local_up_to_layer  # every GPSA block's gate and projection
    loader = build_loaders(build_datasets(cfg.data, cfg.seed), cfg.data, cfg.seed, max_batches=5)[0]
    loader.batch_sampler.set_epoch(1)
    model.train()
    for images, labels in loader:
        loss = soft_target_cross_entropy(model(images), smoothed_one_hot(labels.flatten(), 10, 0.1))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        if average is not None:
            average.update(model)
    after = gpsa_parameters(model)
    for name, value in before.items():
        moved = np.abs(after[name] - value).max()
        assert moved > FLOAT_NOISE, f"{name} moved by {moved} in 5 steps"
        # Adam moves each element by about lr a step: the gates are neither frozen nor shrunk.
        assert moved > 0.5 * DEMO_LR, f"{name} moved by {moved}"
    if average is not None:
        shadow = {name: average.state_dict()[name].numpy() for name in before}
        for name, value in before.items():  # the average moves too, less than the raw weights
            assert 0 < np.abs(shadow[name] - value).max() < np.abs(after[name] - value).max()


@pytest.mark.slow
@pytest.mark.parametrize("ema", [False, True])
def test_recorded_gates_are_those_of_the_weights_evaluated(tmp_path, ema):
    extra = ["trainer.ema=true", "trainer.ema_decay=0.5"] if ema else []
    run_dir = trained(tmp_path, QUICK + [f"optimizer.lr={DEMO_LR}"] + extra)
    last = max(int(row["epoch"]) for row in read_csv(run_dir / "locality.csv"))
    recorded = {(int(r["layer"]), int(r["head"])): float(r["gate"]) for r in read_csv(run_dir / "locality.csv")
                if int(r["epoch"]) == last and r["gate"] not in ("", "nan")}
    checkpoint = run_dir / "checkpoints" / f"epoch_{last:04d}"
    raw = paddle.load(str(checkpoint / "model.pdparams"))
    evaluated = paddle.load(str(checkpoint / "ema.pdparams")) if ema else raw
    expected = {(layer, head): float(gate)
                for layer in range(5)
                for head, gate in enumerate(1 / (1 + np.exp(-np.asarray(evaluated[f"blocks.{layer}.attn.gating_param"]))))}
    assert recorded.keys() == expected.keys()
    np.testing.assert_allclose([recorded[k] for k in sorted(recorded)], [expected[k] for k in sorted(expected)],
                               rtol=1e-6)
    initial = 1 / (1 + np.exp(-1.0))  # gating_param starts at 1
    assert max(abs(g - initial) for g in recorded.values()) > 1e-5  # they left their initial value
    if ema:  # and they are the average's, not the raw weights'
        raw_gates = 1 / (1 + np.exp(-np.concatenate([np.asarray(raw[f"blocks.{i}.attn.gating_param"])
                                                     for i in range(5)])))
        assert not np.allclose(raw_gates, [recorded[k] for k in sorted(recorded)], rtol=1e-6)
