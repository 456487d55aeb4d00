"""The training protocol at several fractions, against values computed by hand.

digits: 1,437 training images; per class 142, 146, 142, 146, 145, 145, 145, 143, 139, 144. Default: batch 64 (drop_last), 50 epochs,
2 warm-up epochs, evaluation every epoch; all three count full-data epochs.
"""
import pytest
from helpers import compose_train

from convitlab.data import build_datasets
from convitlab.engine.protocol import plan


@pytest.mark.parametrize("fraction, images, epochs, eval_every, warmup_steps", [
    # f = 0.05: floor(0.05 * n_c) = 7 per class, 6 for the class of 139: 69 images, 1 step of 64.
    # 50 / 0.05 = 1000 passes; evaluated every 1 / 0.05 = 20; warm-up 2 / 0.05 = 40 passes = 40 steps.
    (0.05, 69, 1000, 20, 40),
    # f = 0.3: 41 to 43 per class, 425 images, 6 steps. 50 / 0.3 = 166.7 -> 167 passes; every
    # round(3.33) = 3; warm-up 2 / 0.3 * 6 = 40 steps.
    (0.3, 425, 167, 3, 40),
    # f = 1: 1,437 images, 22 steps; 50 passes, every pass evaluated, warm-up 2 * 22 = 44 steps.
    (1.0, 1437, 50, 1, 44),
])
def test_protocol_scales_every_length_by_one_over_fraction(fraction, images, epochs, eval_every, warmup_steps):
    cfg = compose_train(f"data.fraction={fraction}")
    data = build_datasets(cfg.data, cfg.seed)
    assert len(data.subset_indices) == images
    protocol = plan(cfg, images // 64)
    assert (protocol.epochs, protocol.eval_every, protocol.warmup_steps) == (epochs, eval_every, warmup_steps)
    evaluated = [e for e in range(1, epochs + 1) if protocol.evaluates(e)]
    assert evaluated[-1] == epochs  # the last pass is always evaluated
    assert len(evaluated) == {0.05: 50, 0.3: 56, 1.0: 50}[fraction]  # 167 // 3 = 55, plus the last
    # About as many images as the full-data run's 50 * 22 * 64 = 70,400 (each pass drops its last
    # partial batch): 1000 * 64 and 167 * 6 * 64.
    assert protocol.total_steps * 64 == {0.05: 64_000, 0.3: 64_128, 1.0: 70_400}[fraction]


def test_explicit_lengths_count_full_data_epochs_too():
    cfg = compose_train("data.fraction=0.1", "schedule.epochs=10", "schedule.warmup_epochs=0.5",
                        "trainer.eval_every=2")
    protocol = plan(cfg, steps_per_epoch=2)
    assert (protocol.epochs, protocol.eval_every, protocol.warmup_steps) == (100, 20, 10)


def test_scale_epochs_false_counts_passes_over_the_subset():
    cfg = compose_train("data.fraction=0.1", "schedule.scale_epochs=false", "trainer.eval_every=3")
    protocol = plan(cfg, steps_per_epoch=2)
    assert (protocol.epochs, protocol.eval_every, protocol.warmup_steps) == (50, 3, 4)
