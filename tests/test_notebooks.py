"""Every notebook in notebooks/ executes top to bottom (small settings) in a kernel running
this virtual environment's interpreter, and prints what its computation should give: the
losses, ranks and parameter counts below are checked against values derived independently."""

import json
import math
import pathlib
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from tests.stack import needs_flax_models

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


def _execute(name, venv_kernel, monkeypatch, **env):
    """Run notebooks/<name>.ipynb in the venv kernel (small settings); return (printed text, figures)."""
    monkeypatch.setenv("JUPYTER_PATH", str(venv_kernel))
    monkeypatch.setenv("SVFT_NOTEBOOK_SMALL", "1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # First cell: prove the kernel runs this venv's interpreter.
    notebook.cells.insert(0, nbformat.v4.new_code_cell(f"import sys\nassert sys.executable == {sys.executable!r}, sys.executable"))
    NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    return text, figures


@needs_flax_models
def test_quickstart_notebook_trains_and_merges_exactly(venv_kernel, monkeypatch):
    """The printed losses: ln 2 before training (a zero head gives uniform logits), lower after
    3 steps on the same 16 snippets; the merged model reloads identically (the notebook asserts
    logits equal to 1e-5 and prints the files it reloaded)."""
    text, _ = _execute("quickstart", venv_kernel, monkeypatch)
    match = re.search(r"loss on the 16 training snippets: before ([\d.]+), after ([\d.]+)", text)
    assert match, text[-2000:]
    before, after = float(match.group(1)), float(match.group(2))
    assert before == pytest.approx(math.log(2), abs=1e-4)
    assert after < before - 1e-3
    assert "reloaded identically: [" in text and "flax_model.msgpack" in text


def test_patterns_notebook_shows_svft_outranks_lora_at_a_smaller_budget(venv_kernel, monkeypatch):
    """On the 32×32 weight of the small setting: plain SVFT trains d = 32 values and reaches
    full rank 32; LoRA rank 1 trains 2d = 64 values for rank 1 (the paper's §3 argument)."""
    text, figures = _execute("patterns", venv_kernel, monkeypatch)
    assert "plain SVFT: 32 values -> rank 32; LoRA rank 1: 64 values -> rank 1" in text, text[-2000:]
    assert len(figures) == 2  # the Ω images and the rank-vs-budget curves


def test_results_notebook_reads_a_sentiment_results_file(venv_kernel, monkeypatch, tmp_path):
    """With a results file present (here a synthetic one), the notebook lists and plots each method.
    (One run covers the notebook: the committed file takes the same code path.)"""
    summary = [
        {"method": "svft_banded_d2", "trainable": 12345, "test_accuracy_mean": 0.81, "test_accuracy_sd": 0.01, "seeds": 3},
        {"method": "lora_r8", "trainable": 99999, "test_accuracy_mean": 0.79, "test_accuracy_sd": 0.02, "seeds": 3},
    ]
    results = tmp_path / "sentiment.json"
    results.write_text(json.dumps({"command": "synthetic", "summary": summary}))
    text, images = _execute("results", venv_kernel, monkeypatch, SVFT_SENTIMENT_RESULTS=str(results))
    assert "svft_banded_d2" in text and "lora_r8" in text and "0.8100" in text
    assert "command: synthetic" in text
    assert "0.7900 ± 0.0200  (3 seeds)" in text  # lora_r8's row, as the file gives it
    assert len(images) == 1, "no figure was drawn"


@pytest.mark.slow  # tests/test_nnx.py runs the same workflow in CI
def test_nnx_notebook_trains_an_nnx_model_through_split_apply_update(venv_kernel, monkeypatch):
    """The NNX workflow notebook: without layouts the ambiguous kernels are refused; training
    raises the accuracy well above its start; the written-back model predicts the same."""
    text, _ = _execute("nnx", venv_kernel, monkeypatch)
    before = float(re.search(r"before: accuracy ([\d.]+)", text).group(1))
    after = float(re.search(r"after:  accuracy ([\d.]+)", text).group(1))
    assert after > before + 0.2, text[-2000:]
    written = float(re.search(r"written-back model accuracy: ([\d.]+)", text).group(1))
    assert written == pytest.approx(after, abs=1e-3)  # "after" is printed with 3 decimals
    assert "without layouts: parameter 'mix/kernel/value'" in text  # the ambiguous Einsum kernel is refused


@pytest.mark.slow  # tests/test_nnx_inplace.py and tests/test_nnx_tunix.py run the same steps in CI
def test_nnx_inplace_notebook_trains_m_only_and_round_trips(venv_kernel, monkeypatch):
    """SVFT in place on a Tunix Llama3: the loss falls, the frozen weights and factors are
    bit-identical, the reloaded adapter and the merged model give the adapted logits."""
    pytest.importorskip("tunix", reason="google-tunix (the `nnx` extra) needs Python ≥ 3.12 and jax ≥ 0.11")
    # PYTHONPATH: the kernel imports this checkout's svft_jax (also where another is installed)
    text, _ = _execute("nnx_inplace", venv_kernel, monkeypatch, PYTHONPATH=str(NOTEBOOKS.parent))
    match = re.search(r"loss: before ([\d.]+), after ([\d.]+)", text)
    assert match, text[-2000:]
    assert float(match.group(2)) < float(match.group(1))
    assert "adapted weights: 14" in text and "frozen weights and factors unchanged: True" in text
    reloaded = float(re.search(r"reloaded logits max difference: ([\d.e+-]+)", text).group(1))
    merged = float(re.search(r"logits max difference ([\d.e+-]+)\n", text).group(1))
    assert reloaded < 1e-4 and merged < 1e-4 and "LoRAParams left: 0" in text
