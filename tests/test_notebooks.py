"""Every notebook in notebooks/ executes top to bottom (small settings) in a kernel running
this virtual environment's interpreter."""

import json
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
KERNEL_NAME = "svft-jax-test-venv"


@pytest.fixture(scope="module")
def venv_kernel(tmp_path_factory):
    """A kernelspec whose argv is *this* interpreter, so the notebooks see the same packages."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "svft-jax test venv", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


def test_notebooks_are_stored_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code and all(not cell.get("outputs") for cell in code), path.name


@pytest.mark.parametrize("name", ["quickstart", "patterns", "results"])
def test_notebook_executes(name, venv_kernel, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(venv_kernel))
    monkeypatch.setenv("SVFT_NOTEBOOK_SMALL", "1")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # First cell: prove the kernel runs this venv's interpreter.
    notebook.cells.insert(0, nbformat.v4.new_code_cell(f"import sys\nassert sys.executable == {sys.executable!r}, sys.executable"))
    client = NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors


def test_results_notebook_reads_a_sentiment_results_file(venv_kernel, monkeypatch, tmp_path):
    """With a results file present (here a synthetic one), the notebook lists and plots each method."""
    summary = [
        {"method": "svft_banded_d2", "trainable": 12345, "test_accuracy_mean": 0.81, "test_accuracy_sd": 0.01, "seeds": 3},
        {"method": "lora_r8", "trainable": 99999, "test_accuracy_mean": 0.79, "test_accuracy_sd": 0.02, "seeds": 3},
    ]
    results = tmp_path / "sentiment.json"
    results.write_text(json.dumps({"command": "synthetic", "summary": summary}))
    monkeypatch.setenv("SVFT_SENTIMENT_RESULTS", str(results))
    monkeypatch.setenv("JUPYTER_PATH", str(venv_kernel))
    monkeypatch.setenv("SVFT_NOTEBOOK_SMALL", "1")
    notebook = nbformat.read(NOTEBOOKS / "results.ipynb", as_version=4)
    NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "svft_banded_d2" in text and "lora_r8" in text and "0.8100" in text
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if "image/png" in o.get("data", {})]
    assert images, "no figure was drawn"
