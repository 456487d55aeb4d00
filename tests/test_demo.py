"""The path `make demo` takes, shrunk: the demo preset's joblib sweep over models, fractions and two
seeds, then compare.py on its folder, with a gain, its interval and its p-value in every row."""
import sys

import pytest
from helpers import ROOT, TRAIN, read_csv, run

COMPARE = [sys.executable, str(ROOT / "src" / "compare.py")]


@pytest.mark.timeout(1200)  # the sweep may take 600 s, compare 300 s
@pytest.mark.slow
def test_demo_preset_then_compare_gives_a_gain_with_interval_and_p_per_fraction(tmp_path):
    sweep = tmp_path / "demo"
    shrink = ["schedule.epochs=1", "trainer.max_steps_per_epoch=2", "trainer.locality_batch_size=8"]
    done = run([*TRAIN, "-m", "experiment=demo", *shrink, "seed=0,1", "data.fraction=0.1,1.0",
                f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_csv(sweep / "summary.csv")
    assert len(rows) == 8 and {r["status"] for r in rows} == {"completed"}
    # The demo's recipe, as its preset says: no random crop, batch 32, and the protocol's images.
    assert {r["random_crop"] for r in rows} == {"False"} and {r["batch_size"] for r in rows} == {"32"}
    assert {(float(r["fraction"]), r["epochs"]) for r in rows} == {(0.1, "10"), (1.0, "1")}

    shown = run([*COMPARE, str(sweep), "--no-plots"], cwd=tmp_path, timeout=300)
    assert shown.returncode == 0, shown.stderr
    table = read_csv(sweep / "comparison.csv")
    assert [float(r["fraction"]) for r in table] == [0.1, 1.0]
    for row in table:  # two paired seeds per cell: a number for the gain, its interval and p
        assert row["convit_micro n"] == row["deit_micro n"] == "2"
        assert row["convit_micro gain test"] == "paired"
        for column in ("gain %", "gain CI low %", "gain CI high %", "gain p"):
            float(row[f"convit_micro {column}"])
    assert "p=" in shown.stdout or "p<" in shown.stdout


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_locality_dynamics_preset_then_compare_writes_the_trends_of_a_64_token_grid(tmp_path):
    """make locality-dynamics, shrunk: the preset trains both models on 32x32 digits with patch 4 at
    two fractions, and compare.py writes locality_trends.csv with every layer of every run."""
    sweep = tmp_path / "locality_dynamics"
    shrink = ["schedule.epochs=2", "trainer.max_steps_per_epoch=2", "trainer.locality_batch_size=8", "seed=0"]
    done = run([*TRAIN, "-m", "experiment=locality_dynamics", *shrink, f"hydra.sweep.dir={sweep}"],
               cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_csv(sweep / "summary.csv")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    assert {(r["model"], float(r["fraction"])) for r in rows} == {
        (model, fraction) for model in ("convit_micro", "deit_micro") for fraction in (0.1, 1.0)}
    assert {(r["img_size"], r["patch_size"]) for r in rows} == {("32", "4")}

    shown = run([*COMPARE, str(sweep), "--no-plots"], cwd=tmp_path, timeout=300)
    assert shown.returncode == 0, shown.stderr
    trends = read_csv(sweep / "locality_trends.csv")
    for model, fraction in {(r["model"], r["fraction"]) for r in rows}:
        mine = [r for r in trends if (r["model"], r["fraction"]) == (model, fraction)]
        evaluations = sorted({float(r["epoch"]) for r in mine})
        assert evaluations == pytest.approx([1.0, 2.0])  # full-data epochs, at 10% as at 100%
        assert sorted({int(r["layer"]) for r in mine}) == list(range(6))
        gated = {int(r["layer"]) for r in mine if r["gate"] != ""}
        assert gated == (set(range(5)) if model == "convit_micro" else set())
    # 64 tokens: a near-uniform MHSA reaches about 4.1 patches, which the demo's 4x4 grid (at most
    # 4.2 between its farthest corners, 2.0 when uniform) cannot reach on average
    deit = [float(r["nonlocality"]) for r in trends if r["model"] == "deit_micro"]
    assert min(deit) > 3.0
