"""The benchmark suite (grin_jax/bench): the --quick smoke run works end to end and writes the JSON records the
README promises. No test asserts a wall-clock time."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from grin_jax.bench import cases
from grin_jax.bench.__main__ import format_table

REQUIRED = ("group", "name", "case", "mode", "backend", "load", "shape", "reps", "median_s", "ratio_to_dense",
            "cpu_ratio_to_dense", "gflops_per_s", "memory")


def test_quick_run_writes_parseable_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user would run it
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "grin_jax.bench", "--quick", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x dense" in proc.stdout and "peak_matmul" in proc.stdout
    payload = json.loads(out.read_text())
    records = payload["records"]
    assert payload["quick"] is True and records
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, (r["name"], missing)
        assert r["median_s"] > 0 and r["reps"] >= 1
        if r["baseline"] is not None:
            assert r["ratio_to_dense"] > 0
        if r["name"] != "peak_matmul" and not r["name"].startswith("peer_pytorch/"):  # eager torch: no XLA analysis
            assert r["memory"].get("peak_bytes", 0) > 0, r["name"]
    names = {r["name"] for r in records}
    backends = {r["backend"] for r in records}
    assert {"dense", "ragged_dot", "kernel", "tiled", "capacity", "sparsemixer_v2", "topk_softmax"} <= backends
    for r in records:  # the C++ kernel's own scratch is added to XLA's memory analysis
        if r["backend"] == "kernel":
            assert r["memory"]["scratch_bytes"] > 0, r["name"]
    assert {"fwd", "fwd+bwd"} <= {r["mode"] for r in records}
    assert "moe/tiled/skewed/fwd+bwd" in names and "dense_ffn/fwd+bwd" in names
    # MoE records are compared with the dense FFN of the same group and mode
    for r in records:
        if r["case"] == "moe":
            assert r["baseline"] == f"dense_ffn/{r['mode']}"
            assert r["shape"]["dense_width"] == r["shape"]["K"] * r["shape"]["F"]
    assert any("train-step" in s for s in payload["skipped"])  # not part of --quick
    # PEER: the layer (dense tables and row-sparse backward), peer-pytorch, the bandwidth it is held against, and the
    # train step at two N with both table updates, each against the smaller N with the same update
    peer = {r["name"]: r for r in records if r["group"].startswith("PEER")}
    assert {"peer/fwd+bwd", "peer_rows/fwd+bwd", "peer_pytorch/fwd+bwd", "stream_triad"} <= set(peer)
    assert peer["stream_triad"]["gbytes_per_s"] > 0 and peer["peer_rows/fwd+bwd"]["gbytes_per_s"] > 0
    assert peer["train_step/sparse/N=1024"]["baseline"] == "train_step/sparse/N=256"
    assert peer["train_step/dense/N=1024"]["ratio_to_dense"] > 0


def test_routing_inputs_have_the_documented_loads():
    key = jax.random.key(0)
    balanced = np.asarray(cases.balanced_ids(512, 64, 16))
    np.testing.assert_array_equal(np.bincount(balanced.ravel(), minlength=64), np.full(64, 512 * 16 // 64))
    skewed = np.asarray(cases.skewed_ids(key, 4096, 8, 2))
    assert all(len(set(row)) == 2 for row in skewed)  # distinct experts per token
    assert cases.load_stats(skewed)["max_load_over_mean"] > 2.0
    for ids in (balanced, skewed):
        assert all(len(set(row)) == len(row) for row in ids)


def test_granularity_shapes_keep_active_and_total_parameters():
    for g in cases.FULL.granularities:
        s = cases.granular_shape(cases.FULL, g)
        assert (s.num_experts, s.top_k, s.d_expert) == (8 * g, 2 * g, 1024 // g)
        assert s.dense_width == 2048 and s.num_experts * s.d_expert == 8192
    assert cases.granular_shape(cases.FULL, 1).useful_flops("fwd+bwd") == 3 * 6 * 8192 * 2048 * 512


def test_format_table_handles_baselines_and_missing_memory():
    records = [
        {"group": "g", "name": "peak_matmul", "reps": 1, "median_s": 0.1, "ratio_to_dense": None,
         "cpu_ratio_to_dense": None, "useful_gflop": 10.0, "gflops_per_s": 100.0, "memory": {},
         "median_cpu_s": 0.2},
        {"group": "g", "name": "moe/tiled/skewed/fwd", "reps": 3, "median_s": 0.2, "ratio_to_dense": 1.1,
         "cpu_ratio_to_dense": 1.2, "useful_gflop": 10.0, "gflops_per_s": 50.0, "median_cpu_s": 0.38,
         "memory": {"temp_bytes": 2 ** 21, "peak_bytes": 2 ** 22}},
    ]
    table = format_table(records)
    assert "## g" in table and "1.10" in table and "50" in table and "1.90" in table
