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
mesh_data = 1
""", tmp_path)
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    assert os.path.exists(tmp_path / "quickstart" / "summary.json")


def _synthetic_granularity_table(path) -> None:
    """A sweep-runner-like results table from a known law plus noise: 3 sizes x G in {1, 2, 4, 8} x 2 seeds at two
    token counts (so every coefficient is identified), plus dense baselines and one failed trial."""
    import csv

    import numpy as np

    from grin_jax.scaling import flops as sflops
    from grin_jax.scaling.law import Coefficients, loss as law_loss

    truth = Coefficients(a=20.0, alpha=0.25, b=30.0, beta=0.25, g=5.0, gamma=0.5, c=0.47)
    rng = np.random.default_rng(0)
    rows = []
    for d_model in (64, 96, 128):
        for tokens in (300_000, 600_000):
            for seed in (0, 1):
                for ffn, granularity in (("moe", 1), ("moe", 2), ("moe", 4), ("moe", 8), ("dense", 1)):
                    if ffn == "moe":
                        n = sflops.param_count(d_model, 2, 8)
                        loss = law_loss(n, tokens, granularity, truth)
                        flops = sflops.flops(d_model, 2, 8, granularity, tokens)
                    else:
                        n = 12 * d_model ** 2 * 2
                        loss = law_loss(n * 4, tokens, 1, truth) + 0.05  # any plausible baseline
                        flops = 72 * d_model ** 2 * 2 * tokens
                    rows.append({"trial": f"d{d_model}-{ffn}-G{granularity}-s{seed}-D{tokens}",
                                 "model.d_model": d_model, "model.layout": ffn, "model.moe.granularity": granularity,
                                 "train.seed": seed, "N": n, "D": tokens, "G": granularity,
                                 "loss": float(loss * np.exp(rng.normal(0, 0.005))), "flops": flops,
                                 "status": "done"})
    rows.append({"trial": "broken", "model.d_model": 64, "model.layout": "moe", "model.moe.granularity": 16,
                 "train.seed": 0, "status": "failed"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_granularity(tmp_path):
    table = tmp_path / "results.csv"
    _synthetic_granularity_table(table)
    notebook = run_notebook("granularity.ipynb", f"""
results_csv = {str(table)!r}
expansion_rate = 8.0
c = 0.47
n_boot = 4
average_seeds = False
""", tmp_path)
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    images = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 2
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "48 MoE, 12 dense" in text and "best G =" in text and "gamma" in text
    assert "fit over 48 points (single runs)" in text


def test_routing_gradients(tmp_path):
    notebook = run_notebook("routing_gradients.ipynb", """
problems = 2
mc_samples = 200
scales = (0.5, 2.0)
eps_grid = (0.01, float("inf"))
head = "quad"
top_k = 2
tokens = 5000
seed = 0
""", tmp_path)
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    images = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 3
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "router gradient for" in text and "sparsemixer_v2 eps=inf" in text


def test_peer_notebook(tmp_path, monkeypatch):
    """notebooks/peer.ipynb: two PEER LMs (query BatchNorm on and off) trained a few steps, evaluated over two
    validation batches: the histogram and the bar chart, and a table of usage and unevenness for both settings.
    The kernel compiles with XLA's backend optimisation off (half the CPU compile time of the four steps)."""
    monkeypatch.setenv("XLA_FLAGS", (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip())
    notebook = run_notebook("peer.ipynb", f"""
variant = "smoke"
steps = 3
batch_size = 4
seq_len = 32
eval_batches = 2
workdir = {str(tmp_path / 'peer')!r}
mesh_data = 1
seed = 0
""", tmp_path)
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    images = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 2
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "usage" in text and "unevenness" in text and "tiny" in text
    rows = [line for line in text.splitlines() if line.startswith(("with BN", "without BN"))]
    assert len(rows) == 4 and all("%" in row or "not quoted" in row for row in rows)   # ours, then the paper's
    assert any(line.startswith("with BN") and "1.06" in line for line in rows)
    for name in ("batchnorm", "none"):
        assert os.path.exists(tmp_path / "peer" / name / "summary.json")


def test_ds_moe(tmp_path):
    notebook = run_notebook("ds_moe.ipynb", f"""
variant = "smoke"
steps = 4
alphas = (0.0, 0.1)
eval_batches = 1
thresholds = (1.0,)
workdir = {str(tmp_path / 'ds_moe')!r}
""", tmp_path)
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    assert "alpha=0.1: MLP" in text and "experts over the threshold" in text
    assert os.path.exists(tmp_path / "ds_moe" / "alpha_0.1" / "summary.json")


def test_sharding_walkthrough(tmp_path):
    """notebooks/sharding.ipynb on the 8 fake CPU devices of tests/conftest.py (run alone, the notebook sets them up
    itself): both CPU strategies of the MoE layer and a scanned, rematerialised, accumulated train step on the
    fsdp x expert x model mesh equal one device; FSDP over 8 devices holds 1/8 of every D-sharded array."""
    import re

    notebook = run_notebook("sharding.ipynb", """
num_layers = 1
batch_size = 8
seq_len = 16
fast_compile = True
""", tmp_path)
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    number = r"([0-9.]+(?:e[+-]\d+)?)"
    diffs = dict(re.findall(r"moe.parallel='(\w+)': .*max abs diff to one device " + number
                            + r"; dropped fraction 0.000", text))
    assert set(diffs) == {"allgather", "alltoall"} and all(float(d) < 1e-5 for d in diffs.values()), diffs
    counts = dict(re.findall(r"moe.parallel='(\w+)'.*\n  collectives (\{.*\})", text))
    assert "'reduce-scatter': 1" in counts["allgather"] and "all-to-all" not in counts["allgather"]  # strategy used
    assert "'all-to-all': 2" in counts["alltoall"] and "reduce-scatter" not in counts["alltoall"]
    assert float(re.search(r"loss: one device .*abs diff " + number, text).group(1)) < 1e-5
    assert float(re.search(r"train step max abs grad diff: " + number, text).group(1)) < 1e-5
    assert float(re.search(r"largest gradient entry " + number, text).group(1)) > 1e-3  # a real gradient
    assert re.search(r"updated layers.0.mlp.w_gate \(8, 64, 64\): P\('expert', 'fsdp', 'model'\), shard \(4, 32, 32\)",
                     text)
    rows = {label: [int(v.replace(",", "")) for v in values] for label, *values in
            re.findall(r"^(one device|data=8|fsdp=8|fsdp=2,expert=2,model=2) +([\d,]+) +([\d,]+)", text, re.M)}
    assert rows["data=8"] == rows["one device"]  # pure data parallelism replicates params and optimizer state
    assert rows["one device"][0] / 9 < rows["fsdp=8"][0] < rows["one device"][0] / 7
    part, whole = re.search(r"fsdp=8, the \d+ arrays with an 'embed' dimension: ([\d,]+) of ([\d,]+) bytes",
                            text).groups()
    assert 8 * int(part.replace(",", "")) == int(whole.replace(",", ""))
