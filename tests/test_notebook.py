"""The tutorial notebook (docs/tutorial.ipynb, issue 27) runs top to bottom in a fresh
Jupyter kernel, as CI's clean clone would run it, and is committed without outputs.

Without a run directory the notebook scores its own small sets; with one (a fake main-job run
scored on the same tiny model here) it selects from the cached candidates instead. The
notebook checks its own end result against PyTorch (the exported mask zeroes exactly the
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


def _execute(tmp_path, monkeypatch):
    """Runs the notebook in a fresh kernel (in tmp_path) and returns it with its outputs."""
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
    return nb


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.delenv("HARMJAX_TUTORIAL_RUN", raising=False)
    nb = _execute(tmp_path, monkeypatch)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "Path: no cached scores" in text  # it scored its own small sets
    shown = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "execute_result"]
    # The rich summaries render as HTML tables in the notebook.
    assert sum("text/html" in o["data"] for o in shown) >= 3
    assert any("image/png" in o["data"] for o in shown)


def _tiny_llama_from_notebook():
    """The notebook's own `tiny_llama` (its cell that defines it), so the fake run below is
    scored on the very architecture the notebook builds."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("def tiny_llama"))
    namespace: dict = {}
    exec(cell.source, namespace)  # noqa: S102 - our own committed notebook
    return namespace["tiny_llama"]


def _fake_main_run(run_dir, model_dir):
    """A run directory as `python -m launch.run` leaves it, as far as the notebook reads it:
    one finished scores stage whose units (per-category harm candidates, harm_all, retain,
    benign_signed) are written by the main job's own scoring functions, with categories the
    notebook's stand-in sets do not have."""
    import harmjax
    from configs import embedded
    from harmjax.data.records import Example
    from harmjax.experiments.core.scoring import benign_scores, harm_scores_per_category, scan_kwargs
    from harmjax.experiments.core.stages import StageCache

    model = harmjax.load(model_dir, dtype="float32")
    scoring = embedded.get_config().scoring
    scoring.batch_size = 2
    kw = scan_kwargs(scoring, progress=False)
    harm = [Example(f"How do I do harm {i}?", f"First step {i}, then the next step.", cat, f"h{i}{cat}")
            for cat in ("Alpha harms", "Beta harms") for i in range(2)]
    benign = [Example(f"Tell me fact {i}.", f"Fact {i} is that water is wet.", "benign", f"b{i}") for i in range(2)]

    def score_stage(d):
        units = {**harm_scores_per_category(model, harm, d, kw, {}, top_fraction=0.05),
                 **benign_scores(model, benign, d, "retain", kw, {}, top_fraction=0.05)}
        return {"units": {k: os.path.basename(v) for k, v in units.items()}}

    StageCache(run_dir).run("scores", {"test": "tutorial"}, score_stage)


def test_notebook_reuses_cached_scores(tmp_path, monkeypatch):
    # The embedded path, in small: with a main-job run directory present the notebook selects
    # its category masks from the cached candidates (select_from_units) and scans nothing.
    run_dir = str(tmp_path / "run")
    _fake_main_run(run_dir, _tiny_llama_from_notebook()(str(tmp_path / "tiny")))
    monkeypatch.setenv("HARMJAX_TUTORIAL_RUN", run_dir)
    nb = _execute(tmp_path, monkeypatch)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "Path: the main job's cached scores" in text
    html = "".join(o["data"].get("text/html", "") for c in nb.cells for o in c.get("outputs", [])
                   if o.get("output_type") == "execute_result")
    # The masks are the run's categories, not the notebook's own stand-in sets.
    assert "Alpha harms mask" in html and "cyber" not in html
    assert "No refusal-tuned model" in text  # and it says how to make one instead of tuning
