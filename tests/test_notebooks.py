"""Notebooks run headless with small parameters (the cell tagged 'parameters' is replaced)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name: str, parameters: str, tmp_path) -> nbformat.NotebookNode:
    notebook = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    tagged[0].source = parameters
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()
    return notebook


def test_quickstart(tmp_path):
    notebook = run_notebook("quickstart.ipynb", f"""
steps = 8
batch_size = 4
seq_len = 32
workdir = {str(tmp_path / 'quickstart')!r}
sample_tokens = 16
""", tmp_path)
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    assert os.path.exists(tmp_path / "quickstart" / "summary.json")
