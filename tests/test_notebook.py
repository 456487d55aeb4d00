"""experiments/notebook/study.ipynb runs as committed, pointed at a tiny sweep this test trains
(2 models x 2 seeds, debug=fast): nbclient executes it in a real kernel, and the pivot it shows is
load_results' own, its plot an image."""
import nbformat
import pandas as pd
import pytest
from helpers import ROOT, TRAIN, run
from nbclient import NotebookClient

from convitlab.results import load_results

NOTEBOOK = ROOT / "experiments" / "notebook" / "study.ipynb"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_study_notebook_pivots_and_plots_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(TRAIN + ["-m", "debug=fast", "model=convit_micro,deit_micro", "seed=0,1", f"hydra.sweep.dir={sweep}"],
               cwd=tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (sweep / "summary.csv").is_file()

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = notebook.cells[1]
    assert "parameters" in parameters.metadata["tags"]
    assert parameters.source.startswith('study = "../demo"')  # the committed study, beside the notebook
    parameters.source = f"study = {str(sweep)!r}"
    pivot = tmp_path / "pivot.pkl"
    notebook.cells.append(nbformat.v4.new_code_cell(f"table.to_pickle({str(pivot)!r})"))  # the kernel's table, for us
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on a cell's error

    outputs = [cell.get("outputs", []) for cell in notebook.cells]
    assert outputs[2][0].text == "4 runs, 4 completed: convit_micro, deit_micro; fractions 1\n"
    assert {"text/html", "text/plain"} <= set(outputs[3][0].data)  # the pivot, shown
    assert any("image/png" in output.get("data", {}) for output in outputs[4])  # the plot
    runs = load_results(sweep)
    want = runs[runs.status == "completed"].pivot_table(index="fraction", columns="model", values="top1",
                                                        aggfunc=["mean", "std", "count"])
    shown = pd.read_pickle(pivot)
    assert shown.shape == (1, 6)  # fraction 1.0; mean, std, count of the two models
    pd.testing.assert_frame_equal(shown, want)
    assert shown["count"].to_numpy().tolist() == [[2, 2]]
