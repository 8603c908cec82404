"""The tutorial notebook (docs/tutorial.ipynb, issue 27) runs top to bottom in a fresh
Jupyter kernel, as CI's clean clone would run it, and is committed without outputs.

The notebook checks its own end result against PyTorch (the exported mask zeroes exactly the
pruned weights of a transformers model); here any error in any cell fails the test.
"""

import os

import nbclient  # the test extra installs nbclient, nbformat and ipykernel
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "docs", "tutorial.ipynb")


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the tutorial has no code cells"
    for cell in code:
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, cell.source[:80]


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    # The kernel inherits this environment: this checkout's harmjax first, CPU only, and no
    # persistent compilation cache shared with other runs.
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("HARMJAX_TUTORIAL_MODEL", "tiny")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    shown = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "execute_result"]
    # The rich summaries render as HTML tables in the notebook.
    assert sum("text/html" in o["data"] for o in shown) >= 3
    assert any("image/png" in o["data"] for o in shown)
