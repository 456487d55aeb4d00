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
