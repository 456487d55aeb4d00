"""compare: tables (mean, std, n, gain with its interval and test) from known numbers, the t
distribution against its tables, plots, odd inputs, each run counted once, reading that writes
nothing, evaluation and damaged rows, and the CLI."""
import contextlib
import math
import os
import shutil
import sys
from pathlib import Path

import helpers
import pandas as pd
import pytest
from scipy import stats

from convitlab.core import tables
from convitlab.core.errors import UserError
from convitlab.results import load, plots
from convitlab.results.compare import compare, compare_results
from convitlab.results.load import load_results
from convitlab.results.stats import fieller_interval, gain_test
from convitlab.results.sweeps import gather_sweep

ROOT = Path(__file__).resolve().parents[1]
COMPARE = [sys.executable, str(ROOT / "src" / "compare.py")]
PNG = b"\x89PNG\r\n\x1a\n"
MODELS = {"convit_micro": 5, "deit_micro": 0}  # model → local_up_to_layer
# The paper's Table 2 (DeiT-S, ConViT-S) as the seed-mean top-1 per fraction.
TOP1 = {("convit_micro", 0.05): 47.8, ("deit_micro", 0.05): 34.8, ("convit_micro", 0.25): 59.6,
        ("deit_micro", 0.25): 48.0, ("convit_micro", 1.0): 81.4, ("deit_micro", 1.0): 79.9}
SPREAD = {"convit_micro": (-1.0, 0.0, 1.0), "deit_micro": (-2.0, 0.0, 2.0)}  # per seed 0, 1, 2


def write_locality(run_dir, local_up_to_layer, depth=3, heads=4, epochs=3):
    rows = [{"epoch": e, "layer": layer, "head": h, "nonlocality": 3.0 - 0.1 * e * (layer < local_up_to_layer),
             "gate": 0.7 - 0.1 * h if layer < local_up_to_layer else math.nan, "window_distance": 1.0}
            for e in range(1, epochs + 1) for layer in range(depth) for h in range(heads)]
    tables.append_rows(run_dir / "locality.csv", rows, tables.LOCALITY_COLUMNS)


def sample_efficiency_sweep(root, locality=False):
    """3 fractions x 2 models x 3 seeds; convit at 0.25 seed 2 failed; one job killed before its result."""
    sweep = root / "sweep"
    for (model, fraction), mean in TOP1.items():
        for seed, offset in enumerate(SPREAD[model]):
            job = sweep / f"model={model},data.fraction={fraction},seed={seed}"
            (job / ".hydra").mkdir(parents=True)
            failed = (model, fraction, seed) == ("convit_micro", 0.25, 2)
            tables.write_result(job, {
                "run_id": job.name, "study": "sample_efficiency_digits", "model": model, "dataset": "digits",
                "fraction": fraction, "local_up_to_layer": MODELS[model], "locality_strength": 1.0, "seed": seed,
                "epochs": round(4 / fraction), "status": "failed" if failed else "completed",
                "top1": None if failed else mean + offset, "error": "RuntimeError: out of memory" if failed else None,
                "run_dir": str(job), "config_hash": f"{model}-{fraction}-{seed}"})
            if locality:
                write_locality(job, min(MODELS[model], 2))
    killed = sweep / "model=deit_micro,data.fraction=1.0,seed=3"
    (killed / ".hydra").mkdir(parents=True)
    (killed / ".hydra" / "overrides.yaml").write_text("- model=deit_micro\n- data.fraction=1.0\n- seed=3\n")
    return sweep


def test_table_mean_std_n_and_gain_by_hand(tmp_path):
    sweep = sample_efficiency_sweep(tmp_path)
    c = compare(load_results([sweep]))
    assert c.vs == "model" and c.by == ["fraction"]  # local_up_to_layer follows the model, epochs the fraction
    assert c.baseline == "deit_micro" and c.columns == ["deit_micro", "convit_micro"]
    assert c.keys == [(0.05,), (0.25,), (1.0,)]
    convit, deit = c.cell((0.05,), "convit_micro"), c.cell((0.05,), "deit_micro")
    assert (convit.mean, convit.std, convit.n) == pytest.approx((47.8, 1.0, 3))
    assert (deit.mean, deit.std, deit.n) == pytest.approx((34.8, 2.0, 3))
    assert c.gain((0.05,), "convit_micro") == pytest.approx(37.356, abs=1e-3)  # the paper's +37%
    # 0.25: the failed seed is left out → (58.6, 59.6): mean 59.1, std sqrt(0.5)
    convit = c.cell((0.25,), "convit_micro")
    assert (convit.mean, convit.std, convit.n) == pytest.approx((59.1, 0.5 ** 0.5, 2))
    assert c.gain((0.25,), "convit_micro") == pytest.approx(23.125)
    assert c.gain((0.25,), "deit_micro") is None
    assert sorted(c.left_out["status"]) == ["failed", "unfinished"]


def test_written_tables_and_left_out_report(tmp_path):
    sweep = sample_efficiency_sweep(tmp_path)
    report = compare_results([sweep], plots=False)
    table = tables.read_rows(sweep / "comparison.csv")
    assert [r["fraction"] for r in table] == [0.05, 0.25, 1.0]
    first = table[0]
    assert first["deit_micro mean"] == pytest.approx(34.8) and first["deit_micro std"] == pytest.approx(2.0)
    assert first["convit_micro n"] == 3 and first["convit_micro gain %"] == pytest.approx(37.356, abs=1e-3)
    markdown = (sweep / "comparison.md").read_text()
    assert markdown in report
    assert "| 0.05 | 34.80 ± 2.00 (3) | 47.80 ± 1.00 (3) | +37.4% [+26.4, +51.9] p<0.001 |" in markdown
    assert "left out 2 of 19 runs: 1 failed, 1 unfinished" in markdown
    assert "RuntimeError: out of memory" in markdown and "seed=3" in markdown
    assert not (sweep / "summary.csv").exists()  # gathered in memory: reading writes no summary


def test_by_vs_and_baseline_choices(tmp_path):
    rows = load_results([sample_efficiency_sweep(tmp_path)])
    flipped = compare(rows, vs="fraction", by=["model"])
    assert flipped.columns == [0.05, 0.25, 1.0] and flipped.keys == [("convit_micro",), ("deit_micro",)]
    assert flipped.gain(("deit_micro",), 1.0) == pytest.approx(100 * (79.9 / 34.8 - 1))
    flat = compare(rows, by=["model", "fraction"])
    assert flat.vs is None and len(flat.keys) == 6 and flat.columns == ["top1"] and flat.gain_columns == []
    assert flat.cell(("deit_micro", 1.0), "top1").n == 3
    against_convit = compare(rows, baseline="convit_micro")
    assert against_convit.gain((0.05,), "deit_micro") == pytest.approx(100 * (34.8 / 47.8 - 1))
    assert against_convit.columns == ["convit_micro", "deit_micro"]
    numeric = compare(rows, vs="fraction", by=["model"], baseline="1")
    assert numeric.baseline == 1.0
    with pytest.raises(UserError, match="--baseline vit: not a value of model"):
        compare(rows, baseline="vit")
    with pytest.raises(UserError, match="column 'width'.*summary.csv"):
        compare(rows, by=["width"])


def test_locality_sweep_plot(tmp_path):
    rows = [{"model": "convit_micro", "locality_strength": alpha, "local_up_to_layer": layers, "seed": seed,
             "status": "completed", "top1": 50 + 10 * alpha * (layers > 0) + seed}
            for alpha in (0.0, 0.1, 1.0) for layers in (0, 3) for seed in (0, 1)]
    tables.write_table(tmp_path / "locality_sweep.csv", rows, tables.RESULT_COLUMNS)
    report = compare_results([tmp_path / "locality_sweep.csv"], out=tmp_path / "out")
    c = compare(load_results([tmp_path / "locality_sweep.csv"]))
    assert c.vs is None and c.by == ["locality_strength", "local_up_to_layer"]
    assert c.cell((1.0, 3), "top1").mean == pytest.approx(60.5)
    assert (tmp_path / "out" / "top1_vs_locality.png").read_bytes().startswith(PNG)
    assert "skipped top1_vs_fraction.png: fraction does not vary" in report
    assert "skipped nonlocality.png" in report and "skipped gates.png" in report


def test_nonlocality_and_gate_plots(tmp_path):
    sweep = sample_efficiency_sweep(tmp_path, locality=True)
    report = compare_results([sweep], out=tmp_path / "out")
    for name in ("top1_vs_fraction.png", "nonlocality.png", "gates.png"):
        assert f"wrote {tmp_path / 'out' / name}" in report
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_locality_trends_csv_holds_what_the_locality_plots_draw(tmp_path):
    """locality_trends.csv: a row per run, layer and evaluation with the heads' mean nonlocality and
    gate (blank for an MHSA layer) and the gate's range over the heads, epochs in full-data epochs;
    nonlocality.png and gates.png draw its means over seeds."""
    sweep = sample_efficiency_sweep(tmp_path, locality=True)
    report = compare_results([sweep], out=tmp_path / "out")
    path = tmp_path / "out" / "locality_trends.csv"
    assert f"wrote {path}" in report
    trends = pd.read_csv(path)
    assert list(trends.columns) == ["model", "fraction", "seed", "layer", "epoch", "nonlocality", "gate",
                                    "gate_min", "gate_max"]
    assert len(trends) == 17 * 3 * 3  # 17 completed runs (one failed, one killed), 3 layers, 3 evaluations
    row = trends[(trends["model"] == "convit_micro") & (trends["fraction"] == 0.05) & (trends["seed"] == 1)
                 & (trends["layer"] == 0)]
    assert list(row["epoch"]) == pytest.approx([0.05, 0.10, 0.15])  # a pass over 5% is 0.05 of an epoch
    assert list(row["nonlocality"]) == pytest.approx([2.9, 2.8, 2.7])
    assert list(row["gate"]) == pytest.approx([0.55] * 3)  # heads' gates 0.7, 0.6, 0.5, 0.4
    assert list(row["gate_min"]) == pytest.approx([0.4] * 3) and list(row["gate_max"]) == pytest.approx([0.7] * 3)
    mhsa = (trends["model"] == "deit_micro") | (trends["layer"] == 2)
    assert trends.loc[mhsa, ["gate", "gate_min", "gate_max"]].isna().all().all()
    assert trends.loc[~mhsa, "gate"].notna().all()
    lines = path.read_text().splitlines()
    assert all(line.endswith(",,,") for line in lines[1:] if line.startswith("deit_micro"))  # blank, not "nan"
    c = compare(load_results([sweep]))
    cells = plots.locality_data(c)
    for (row_index, column), frame in cells.items():
        fraction, model = c.keys[row_index][0], c.columns[column]
        part = trends[(trends["model"] == model) & (trends["fraction"] == fraction)]
        expected = part.groupby(["epoch", "layer"])[["nonlocality", "gate"]].mean().reset_index()
        assert list(frame["nonlocality"]) == pytest.approx(list(expected["nonlocality"]))
        assert frame["gate"].isna().tolist() == expected["gate"].isna().tolist()


def write_metrics(run_dir, top1, passes=3):
    rows = [{"epoch": e, "train_loss": 1.0, "val_top1": top1 - 3 + e} for e in range(1, passes + 1)]
    tables.append_rows(run_dir / "metrics.csv", rows, tables.METRIC_COLUMNS)


def test_plot_data_every_cell_in_full_data_epochs(tmp_path):
    """Every table cell gets its nonlocality and gate panel (not only the first row), each x in
    full-data epochs (a pass at fraction f is f of one, or one pass when the run counted passes),
    the gates per layer with the heads' spread, and learning curves a panel per fraction."""
    sweep = sample_efficiency_sweep(tmp_path, locality=True)
    for job in sweep.iterdir():
        row = tables.read_result(job) if (job / "result.csv").exists() else None
        if row and row["status"] == "completed":
            write_metrics(job, float(row["top1"]))
    passes = sweep / "model=deit_micro,data.fraction=0.25,seed=0"  # this one counted passes
    (passes / "config.yaml").write_text("data: {fraction: 0.25}\nschedule: {scale_epochs: false}\n")
    c = compare(load_results([sweep]))
    cells = plots.locality_data(c)
    assert list(cells) == [(row, column) for row in range(3) for column in range(2)]
    for (row, column), frame in cells.items():
        if (row, column) != (1, 0):
            for epochs in frame.groupby("layer")["full_epoch"].apply(list):
                assert epochs == pytest.approx([c.keys[row][0] * e for e in (1, 2, 3)])
    # the 0.25 deit cell: two runs scaled (a pass is 0.25 epoch), the one counting passes not
    assert sorted(set(cells[(1, 0)]["full_epoch"])) == pytest.approx([0.25, 0.5, 0.75, 1.0, 2.0, 3.0])
    gates = plots.gate_data(c)
    assert list(gates) == [(row, 1) for row in range(3)]  # convit only: deit has no gate
    for frame in gates.values():
        assert sorted(frame["layer"].unique()) == [0, 1]
        assert list(frame["min"]) == pytest.approx([0.4] * 6) and list(frame["max"]) == pytest.approx([0.7] * 6)
    curves = plots.learning_curve_data(c)
    assert list(curves) == ["fraction=0.05", "fraction=0.25", "fraction=1"]
    first = curves["fraction=0.05"]
    assert set(first["line"]) == {"model=convit_micro", "model=deit_micro"}
    convit = first[first["line"] == "model=convit_micro"]
    assert list(convit["full_epoch"]) == pytest.approx([0.05, 0.10, 0.15]) and set(convit["n"]) == {3}
    assert list(convit["mean"]) == pytest.approx([45.8, 46.8, 47.8])
    assert all((frame["low"] >= 0).all() and (frame["high"] <= 100).all() for frame in curves.values())
    report = compare_results([sweep], out=tmp_path / "out")
    for name in ("learning_curves.png", "nonlocality.png", "gates.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG), report


def test_error_bars_are_the_t_interval_cut_to_possible_accuracies(tmp_path):
    rows = [{"model": "convit_micro", "fraction": fraction, "seed": seed, "status": "completed", "top1": top1}
            for fraction, values in ((0.1, (5.0, 95.0)), (1.0, (97.0, 98.0, 99.0))) for seed, top1 in enumerate(values)]
    tables.write_table(tmp_path / "runs.csv", rows, tables.RESULT_COLUMNS)
    points = plots.metric_points(compare(load_results([tmp_path / "runs.csv"])), "fraction", [])
    wide, tight = points.to_dict("records")
    # two seeds at 5% and 95%: mean 50 ± 12.71·45 reaches far past both ends; cut at 0 and 100
    assert (wide["mean"], wide["low"], wide["high"], wide["n"]) == (50.0, 0.0, 100.0, 2)
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert (tight["low"], tight["high"]) == pytest.approx((98.0 - half, min(98.0 + half, 100.0)))
    assert tight["high"] == 100.0  # 98 + 2.48 would be an accuracy above 100%


def test_old_csv_without_some_columns_still_compares(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("model,fraction,seed,top1\n" + "".join(
        f"{m},0.1,{s},{base + s}\n" for m, base in (("deit_micro", 40), ("convit_micro", 50)) for s in (0, 1, 2)))
    c = compare(load_results([old]))
    # No status column: every row counts; no local_up_to_layer: the baseline is the first model.
    assert c.vs == "model" and c.by == [] and c.baseline == "convit_micro"
    assert c.cell((), "deit_micro").mean == 41.0 and c.cell((), "deit_micro").n == 3
    assert c.gain((), "deit_micro") == pytest.approx(100 * (41 / 51 - 1))
    one = tmp_path / "one.csv"
    one.write_text("model,seed,top1,status,extra\nconvit_micro,0,50.0,completed,x\n")
    assert math.isnan(compare(load_results([one])).cell((), "top1").std)


def test_missing_metric_or_no_completed_run_is_one_line_error(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("model,seed,top1,status\nconvit_micro,0,50.0,completed\n")
    lacking = tmp_path / "lacking.csv"
    lacking.write_text("model,seed,status\nconvit_micro,1,completed\n")
    with pytest.raises(UserError, match=r"column 'top1' \(--metric\) is missing from .*lacking.csv") as err:
        compare(load_results([good, lacking]))
    assert "good.csv" not in str(err.value)
    with pytest.raises(UserError, match="'top5'"):
        compare(load_results([good]), metric="top5")
    text = tmp_path / "text.csv"
    text.write_text("model,seed,top1,status\nconvit_micro,1,about 50,completed\n")
    with pytest.raises(UserError, match=r"column 'top1' holds 'about 50', not a number, in .*text.csv"):
        compare(load_results([good, text]))
    failed = tmp_path / "failed.csv"
    failed.write_text("model,seed,top1,status,error\nconvit_micro,0,,failed,boom\n")
    with pytest.raises(UserError, match="no completed run to compare: only 1 failed"):
        compare(load_results([failed]))
    (tmp_path / "empty_sweep").mkdir()
    with pytest.raises(UserError, match="no completed run to compare: the inputs hold no result rows"):
        compare(load_results([tmp_path / "empty_sweep"]))
    with pytest.raises(UserError, match="no such file or directory"):
        load_results([tmp_path / "nowhere"])


def run(args, cwd):
    return helpers.run(COMPARE + args, cwd, timeout=120)


def test_cli_writes_tables_and_plots(tmp_path):
    sweep = sample_efficiency_sweep(tmp_path, locality=True)
    proc = run([str(sweep), "--out", "out", "--metric", "top1", "--write-summary"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {sweep / 'summary.csv'}" in proc.stdout and len(tables.read_rows(sweep / "summary.csv")) == 19
    assert "| 0.05 | 34.80 ± 2.00 (3) | 47.80 ± 1.00 (3) | +37.4% [+26.4, +51.9] p<0.001 |" in proc.stdout
    out = tmp_path / "out"
    assert (out / "comparison.csv").stat().st_size > 0 and (out / "comparison.md").stat().st_size > 0
    for name in ("top1_vs_fraction.png", "nonlocality.png", "gates.png"):
        assert (out / name).read_bytes().startswith(PNG), name
    by = run([str(sweep / "summary.csv"), "--by", "model,fraction", "--no-plots"], cwd=tmp_path)
    assert by.returncode == 0 and "| convit_micro | 0.05 | 47.80 ± 1.00 (3) |" in by.stdout
    assert not (sweep / "top1_vs_fraction.png").exists()


@pytest.mark.parametrize("args,expected", [
    (["nowhere"], "nowhere: no such file or directory"),
    (["sweep", "--metric", "accuracy"], "column 'accuracy' (--metric) is missing from"),
    (["sweep", "--vs", "colour"], "column 'colour' (--by/--vs) is missing from"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, expected):
    sample_efficiency_sweep(tmp_path)
    proc = run(args, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and expected in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_cell_never_pools_different_setups():
    """Two setups that differ only in a setting without a column (say, warm-up) must not be averaged."""
    def row(seed, setup, warmup):
        return {"model": "convit_micro", "fraction": 0.1, "seed": seed, "status": "completed", "top1": 50.0 + seed,
                "setup_hash": setup, "overrides": f"schedule.warmup_epochs={warmup} seed={seed}", "source": "x.csv"}

    repeats = [row(0, "aaaa", 2), row(1, "aaaa", 2)]
    assert compare(pd.DataFrame(repeats)).cell((), "top1").n == 2  # seeds of one setup: averaged
    with pytest.raises(UserError, match="would average 2 different setups.*warmup_epochs=5"):
        compare(pd.DataFrame(repeats + [row(2, "bbbb", 5)]))


# ---------- how sure a gain is ----------

def hand_table(column_runs, baseline_runs):
    """(seed, top1) runs of a `convit_micro` cell and a `deit_micro` baseline cell, as load_results gives them."""
    rows = [{"model": model, "local_up_to_layer": layers, "seed": seed, "top1": top1, "status": "completed",
             "source": "hand.csv"}
            for model, layers, runs in (("convit_micro", 5, column_runs), ("deit_micro", 0, baseline_runs))
            for seed, top1 in runs]
    return pd.DataFrame(rows).astype({"seed": "Int64", "top1": "float64", "local_up_to_layer": "Int64"})


def test_paired_interval_and_test_on_a_known_table():
    # Baseline without spread: the interval is 20% ± t(0.975, 2)·s/(√n·mean_b) = 20 ± 24.841%
    # and the paired differences (5, 10, 15) give t = 10/(5/√3) = 2√3, p = (1 − t/√(t² + 2))/2.
    c = compare(hand_table([(0, 55.0), (1, 60.0), (2, 65.0)], [(0, 50.0), (1, 50.0), (2, 50.0)]))
    test = c.gain_test((), "convit_micro")
    assert test.test == "paired" and test.n == 3 and test.dof == 2
    assert test.gain == pytest.approx(20.0)
    assert (test.low, test.high) == pytest.approx((20 - 24.841379, 20 + 24.841379), abs=1e-5)
    assert test.t == pytest.approx(2 * math.sqrt(3)) and test.p == pytest.approx(0.037089950, abs=1e-9)

    # Correlated seeds, by hand: Fieller's quadratic (b² ρ² − 2abρ + a² with the t-scaled (co)variances
    # of the means var_a = 25/3, var_b = 3, cov = 5) has roots 1.1182611, 1.2605335; the
    # differences (8, 10, 12) give t = 5√3, p = (1 − t/√(t² + 2))/2 = 0.0065362.
    column, baseline = [(0, 55.0), (1, 60.0), (2, 65.0)], [(1, 50.0), (0, 47.0), (2, 53.0)]  # paired by seed, not order
    c = compare(hand_table(column, baseline))
    test = c.gain_test((), "convit_micro")
    assert test.test == "paired" and test.gain == pytest.approx(20.0)
    assert (test.low, test.high) == pytest.approx((11.82611, 26.05335), abs=1e-4)
    assert test.p == pytest.approx(0.006536229, abs=1e-9)
    # The bounds are the ratios the paired t-test of column − ρ·baseline just rejects at 2.5% a side.
    a, b = (pd.Series([v for _, v in sorted(cell)]) for cell in (column, baseline))
    for bound, side in ((test.low, 1), (test.high, -1)):
        differences = a - (1 + bound / 100) * b
        t = differences.mean() / (differences.std() / math.sqrt(3))
        assert t == pytest.approx(side * 4.302653, abs=1e-5)
    assert "| 55.00 ± 5.00 (3) | 60.00 ± 5.00 (3) |" not in markdown_of(c)  # columns: baseline first
    assert "| 50.00 ± 3.00 (3) | 60.00 ± 5.00 (3) | +20.0% [+11.8, +26.1] p=0.007 |" in markdown_of(c)


def test_welch_when_the_cells_do_not_share_their_seeds():
    # Seeds 0-2 against 3-5: Welch. Equal variances 25/3 of the means: t = 10/√(50/3) = √6, dof = 4,
    # p = 1 − F4(√6) = 1/2 − 3x/4 + x³/4 with x = √6/√10.
    c = compare(hand_table([(0, 55.0), (1, 60.0), (2, 65.0)], [(3, 45.0), (4, 50.0), (5, 55.0)]))
    test = c.gain_test((), "convit_micro")
    assert test.test == "Welch" and test.n == 3
    assert test.t == pytest.approx(math.sqrt(6)) and test.dof == pytest.approx(4.0)
    assert test.p == pytest.approx(0.035241998, abs=1e-9) and test.gain == pytest.approx(20.0)
    # The interval: (60 − ρ·50)/√(v + ρ²v) = ±t(0.975, ν) at its bounds, ν Satterthwaite's at ρ = 1.2.
    v, nu = 25 / 3, (25 / 3 * (1 + 1.44)) ** 2 / ((25 / 3) ** 2 * (1 + 1.44 ** 2) / 2)
    for bound, side in ((test.low, 1), (test.high, -1)):
        rho = 1 + bound / 100
        assert (60 - rho * 50) / math.sqrt(v + rho * rho * v) == pytest.approx(side * stats.t.ppf(0.975, nu), abs=1e-9)
    assert markdown_of(c).count("†") == 2  # the cell and the caption
    # One seed missing from the column (a failed run): not the same seeds, so Welch too.
    partial = compare(hand_table([(0, 55.0), (1, 60.0)], [(0, 50.0), (1, 50.0), (2, 51.0)]))
    assert partial.gain_test((), "convit_micro").test == "Welch"


def test_a_cell_with_one_run_has_no_interval(tmp_path):
    c = compare(hand_table([(0, 60.0)], [(0, 50.0), (1, 52.0)]))
    test = c.gain_test((), "convit_micro")
    assert test.gain == pytest.approx(100 * (60 / 51 - 1)) and test.n == 1 and test.test is None
    assert math.isnan(test.low) and math.isnan(test.high) and math.isnan(test.p)
    assert "| 51.00 ± 1.41 (2) | 60.00 ± – (1) | +17.6%, n=1: no CI |" in markdown_of(c)
    tables.write_table(tmp_path / "comparison.csv", c.table())
    (row,) = tables.read_rows(tmp_path / "comparison.csv")
    assert row["convit_micro gain %"] == pytest.approx(100 * (60 / 51 - 1)) and row["convit_micro gain n"] == 1
    assert math.isnan(row["convit_micro gain CI low %"]) and row["convit_micro gain test"] is None


def test_the_csv_holds_every_number_at_full_precision(tmp_path):
    sweep = sample_efficiency_sweep(tmp_path)
    compare_results([sweep], plots=False)
    (first, second, _) = tables.read_rows(sweep / "comparison.csv")
    c = compare(load_results(sweep))
    expected = c.gain_test((0.05,), "convit_micro")
    assert first["convit_micro gain %"] == expected.gain == pytest.approx(100 * (47.8 / 34.8 - 1), abs=1e-12)
    assert (first["convit_micro gain CI low %"], first["convit_micro gain CI high %"]) == (expected.low, expected.high)
    assert (first["convit_micro gain t"], first["convit_micro gain dof"]) == (expected.t, 2.0)
    assert expected.t == pytest.approx(13 * math.sqrt(3))  # differences 14, 13, 12
    assert first["convit_micro gain p"] == expected.p and first["convit_micro gain test"] == "paired"
    assert second["convit_micro gain test"] == "Welch" and second["convit_micro n"] == 2  # seed 2 failed


def test_fieller_interval_edge_cases():
    assert fieller_interval(60.0, 50.0, 0.0, 0.0, 0.0, 4.3) == pytest.approx((1.2, 1.2))  # no spread: the point
    assert fieller_interval(60.0, 1.0, 1.0, 1.0, 0.0, 4.3) == (0.0, math.inf)  # baseline not clear of 0
    # A ratio of accuracies is never negative: two seeds at 10% and 90% against a tight baseline
    # reach far below 0 in Fieller's set, and the interval stops at a gain of -100%.
    wide = gain_test([10.0, 90.0], [50.0, 51.0], paired=True)
    assert wide.low == -100.0 and wide.high > wide.gain > -100.0
    assert gain_test([10.0, 90.0], [50.0, 51.0], paired=False).low == -100.0
    same = gain_test([50.0, 51.0, 52.0], [50.0, 51.0, 52.0], paired=True)
    assert same.gain == 0.0 and same.t == 0.0 and same.p == 0.5


def markdown_of(comparison):
    from convitlab.results.compare import markdown_table
    return markdown_table(comparison)


# ---------- each run once; reading writes nothing ----------

TABLE_005 = "| 0.05 | 34.80 ± 2.00 (3) | 47.80 ± 1.00 (3) | +37.4% [+26.4, +51.9] p<0.001 |"  # n = 3, paired


def report_table(stdout):
    """The report less its "wrote ..." lines (they name the --out folder)."""
    return [line for line in stdout.splitlines() if not line.startswith("wrote ")]


def test_inputs_named_twice_give_the_same_table_as_once(tmp_path):
    sweep = sample_efficiency_sweep(tmp_path)
    gather_sweep(sweep)  # as the sweep's end writes it
    job = sweep / "model=convit_micro,data.fraction=0.05,seed=0"
    once = run([str(sweep), "--out", "once", "--no-plots"], cwd=tmp_path)
    twice = run(["sweep", str(sweep / "summary.csv"), str(tmp_path / "." / "sweep"), str(job), str(job / "result.csv"),
                 "--out", "twice", "--no-plots"], cwd=tmp_path)
    assert once.returncode == twice.returncode == 0, once.stderr[-2000:] + twice.stderr[-2000:]
    assert TABLE_005 in once.stdout and report_table(twice.stdout) == report_table(once.stdout)
    assert (tmp_path / "twice" / "comparison.csv").read_bytes() == (tmp_path / "once" / "comparison.csv").read_bytes()
    assert "left out 2 of 19 runs" in once.stdout
    # load_results alike: 19 runs, whichever way each is named.
    named_twice = load_results(sweep, sweep / "summary.csv", [job, job / "result.csv"])
    assert len(named_twice) == 19 and named_twice["run_dir"].is_unique
    assert len(load_results(job, job / "result.csv")) == 1
    # A summary older than its jobs: the run's own result.csv wins, whichever input comes first.
    tables.write_result(job, {**tables.read_result(job), "top1": 48.8})
    for inputs in ([sweep / "summary.csv", sweep], [sweep, sweep / "summary.csv"]):
        frame = load_results(*inputs).set_index("run_dir")
        assert len(frame) == 19 and frame.loc[str(job), "top1"] == 48.8


def test_one_config_trained_in_two_directories_is_counted_once(tmp_path):
    sweep = sample_efficiency_sweep(tmp_path)
    job = sweep / "model=convit_micro,data.fraction=0.05,seed=0"
    again = sweep / "data.fraction=0.05,model=convit_micro,seed=0"  # a second sweep, its overrides in another order
    shutil.copytree(job, again)
    tables.write_result(again, {**tables.read_result(job), "run_id": again.name, "run_dir": str(again)})
    assert len(load_results(sweep)) == 20  # two directories, two trainings
    proc = run([str(sweep), "--out", "out", "--no-plots"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert TABLE_005 in proc.stdout  # not pooled: n stays 3 and the test paired
    line = (f"counted once: 2 runs of one config (config_hash convit_micro-0.05-0, seed 0): {again} is counted, "
            f"not {job}")
    assert line in proc.stdout.splitlines()


def tree(root):
    """Every path under root with its kind, size, modification time and mode."""
    return {str(path.relative_to(root)): (path.is_dir(), path.stat().st_size, path.stat().st_mtime_ns,
                                          path.stat().st_mode) for path in [root, *root.rglob("*")]}


@contextlib.contextmanager
def read_only_view(folder, view):
    """`folder` seen read-only at `view` (a read-only bind mount, where root may mount one), else
    `folder` itself: the caller then relies on its before/after comparison of the tree."""
    view.mkdir()
    mounted = os.geteuid() == 0 and helpers.run(["mount", "--bind", str(folder), str(view)]).returncode == 0
    try:
        if mounted and helpers.run(["mount", "-o", "remount,bind,ro", str(view)]).returncode == 0:
            with pytest.raises(OSError):
                (view / "probe").write_text("")
            yield view
        else:
            yield folder
    finally:
        if mounted:
            helpers.run(["umount", str(view)])


def test_a_read_only_sweep_compares_with_out_elsewhere_and_reading_writes_nothing(tmp_path):
    sweep = sample_efficiency_sweep(tmp_path, locality=True)
    before = tree(sweep)
    with read_only_view(sweep, tmp_path / "read_only") as seen:
        proc = run([str(seen), "--out", str(tmp_path / "report")], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert TABLE_005 in proc.stdout and (tmp_path / "report" / "gates.png").read_bytes().startswith(PNG)
        assert len(load_results(seen)) == 19 and len(load.load_metrics(seen)) == 0
        assert len(load.load_locality(seen)) == 18 * 3 * 3 * 4
        if seen != sweep:  # truly read-only: the default --out (the sweep itself) is refused in one line
            refused = run([str(seen), "--no-plots"], cwd=tmp_path)
            assert refused.returncode == 2 and refused.stderr == (
                f"error: cannot write into {seen} (Read-only file system): choose a folder you can write to "
                "with --out\n")
    assert tree(sweep) == before  # nothing created, changed or removed
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_results(empty).empty and run([str(empty), "--out", "report"], cwd=tmp_path).returncode == 2
    assert list(empty.iterdir()) == []  # no empty summary.csv left behind


# ---------- rows that are not training runs, or not complete ----------

def test_evaluation_rows_are_left_out_unless_asked(tmp_path):
    sweep = sample_efficiency_sweep(tmp_path)
    evaluation = tmp_path / "eval" / "best"  # eval.py of a convit checkpoint: same knobs, kind eval
    tables.write_result(evaluation, {**tables.read_result(sweep / "model=convit_micro,data.fraction=0.05,seed=0"),
                                      "kind": "eval", "top1": 90.0, "run_dir": str(evaluation)})
    proc = run([str(sweep), str(evaluation), "--out", "out", "--no-plots"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert TABLE_005 in proc.stdout
    assert "left out 1 eval row (kind=eval): --kind eval compares them" in proc.stdout.splitlines()
    asked = run([str(evaluation), "--kind", "eval", "--out", "out", "--no-plots"], cwd=tmp_path)
    assert asked.returncode == 0 and "| 90.00 ± – (1) |" in asked.stdout
    not_asked = run([str(evaluation), "--out", "out", "--no-plots"], cwd=tmp_path)
    assert not_asked.returncode == 2 and not_asked.stderr == (
        "error: no completed run to compare: left out 1 eval row (kind=eval): --kind eval compares them\n")
    every = compare(load_results(sweep, evaluation, kind="all"), kind="all")
    assert every.by == ["kind", "fraction"] and every.cell(("eval", 0.05), "convit_micro").n == 1
    assert every.cell(("train", 0.05), "convit_micro").n == 3  # never pooled with the evaluation
    bad = run([str(sweep), "--kind", "test"], cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr == "error: kind='test' is not allowed: one of train, eval, all\n"


def test_a_damaged_job_is_listed_by_its_file_and_left_out(tmp_path):
    sweep = sample_efficiency_sweep(tmp_path)
    result = sweep / "model=convit_micro,data.fraction=0.05,seed=0" / "result.csv"
    result.write_text(result.read_text()[:-40])  # cut short
    proc = run([str(sweep), "--out", "out", "--no-plots"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 0.05 | 34.80 ± 2.00 (3) | 48.30 ± 0.71 (2) |" in proc.stdout  # seeds 1 and 2 only
    damaged = [line for line in proc.stdout.splitlines() if line.startswith("- damaged: ")]
    assert len(damaged) == 1 and f"({result} is damaged: row 1 has " in damaged[0]
    assert damaged[0].endswith("fields, row 1 has no line end)")
    assert "left out 3 of 19 runs: 1 damaged, 1 failed, 1 unfinished" in proc.stdout
