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
    # DS-MoE: the layer's top-K rows (and the reference FFNs) against its dense mode, the LM's likewise; speed-ups
    q = cases.QUICK
    ds = {r["name"]: r for r in records if r["group"].startswith("DS-MoE")}
    layer = {"ds_moe/dense", f"ds_moe/top-{q.ds_top_k}/tiled", f"swiglu_ffn/width={4 * q.ds_d_model}"}
    lm = {"ds_moe_lm/dense", f"ds_moe_lm/top-{q.ds_model_top_k}+attn-top-1", "ds_moe_lm/top-1+attn-top-1"}
    assert layer | lm | {f"ds_moe/top-{k}" for k in q.ds_top_ks} <= set(ds)
    for r in ds.values():
        if r["name"] not in ("peak_matmul", "ds_moe/dense", "ds_moe_lm/dense"):
            assert r["baseline"] == ("ds_moe_lm/dense" if r["case"] == "ds_moe_lm" else "ds_moe/dense"), r["name"]
    assert ds[f"ds_moe/top-{q.ds_top_k}"]["shape"]["K"] == q.ds_top_k
    assert f"speed-up ds_moe/dense / ds_moe/top-{q.ds_top_k}: " in proc.stdout
    assert f"speed-up ds_moe_lm/dense / ds_moe_lm/top-{q.ds_model_top_k}+attn-top-1: " in proc.stdout
    threshold = [r for r in ds.values() if r["name"].startswith("ds_moe/threshold~")]
    assert len(threshold) == 1 and 0 < threshold[0]["mean_active"] < q.ds_experts


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


def test_ds_moe_shapes_and_model_overrides():
    full = cases.FULL
    assert 4 * full.ds_d_model // full.ds_experts == 64 and full.ds_top_k in full.ds_top_ks
    assert 0.25 <= full.ds_model_top_k / full.ds_experts <= 0.35  # ~30 % of the experts active
    assert all(b * s == full.ds_tokens for b, s in full.ds_model_shapes)
    dense = cases.ds_moe_model_config(cases.QUICK, 64)
    assert dense.section("ds_moe").inference == "dense" and dense.max_seq_len == 64
    assert dense.section("ds_moe").d_hidden == 4 * cases.QUICK.ds_d_model // cases.QUICK.ds_experts
    # overrides merge into the ModelConfig.make keywords (a section's keys one by one); the sparsity comes last
    sparse = cases.ds_moe_model_config(cases.QUICK, 64, top_k=3,
                                       model_overrides={"num_layers": 4, "ds_moe": {"mi_coef": 0.0,
                                                                                    "inference": "dense"}})
    section = sparse.section("ds_moe")
    assert sparse.num_layers == 4 and section.mi_coef == 0.0 and section.num_experts == cases.QUICK.ds_experts
    assert (section.inference, section.inference_top_k) == ("top_k", 3)
    assert sparse.moa.inference == "dense"  # the attention experts: dense unless attention_top_k is given
    both = cases.ds_moe_model_config(cases.QUICK, 64, top_k=3, attention_top_k=1)
    assert (both.moa.inference, both.moa.inference_top_k) == ("top_k", 1)


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
    assert "speed-up" not in table
    records[1].update(report_speedup=True, baseline="dense", ratio_to_dense=0.25, cpu_ratio_to_dense=0.5)
    assert "speed-up dense / moe/tiled/skewed/fwd: 4.00x (cpu 2.00x)" in format_table(records)


def test_phimoe_peer_has_our_shape_and_steps():
    """The train-step group's PyTorch peer: transformers' PhimoeForCausalLM built from grin_tiny:smoke's model config
    has exactly our parameter count, and one call runs a whole AdamW step (the parameters move)."""
    import importlib.util
    import os

    import torch  # the test extra (as tests/test_convert.py): the peer must run in CI, not be skipped

    from grin_jax import params
    from grin_jax.train import trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("grin_tiny", os.path.join(root, "configs", "grin_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model_config = trainer.resolve(module.get_config("smoke"), check_mesh=False).model
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, model_config.vocab_size)
    variants, missing = cases.phimoe_train_step_variant(model_config, tokens, 1e-3)
    assert missing is None and len(variants) == 1
    variant = variants[0]
    assert variant.baseline == "train_step/grin_tiny" and variant.meta["shape"]["tokens"] == 16
    step = variant.fn.lower().compile()
    torch_model = variant.fn.fn.model
    assert sum(p.numel() for p in torch_model.parameters()) == params.count_params(model_config)["total"]
    before = [p.detach().clone() for p in torch_model.parameters()]
    step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, torch_model.parameters()))


def test_train_step_flops_and_tokens_per_second_lines():
    """train_step_flops: 6 per active non-embedding parameter and token, plus the causal attention core, by hand for
    grin_tiny's shape; format_table prints tokens/s for train-step records."""
    import types

    model = types.SimpleNamespace(num_heads=4, head_dim=32, num_layers=4)
    counts = {"active": 1_057_539, "embedding_active": 33_152}
    tokens = 16 * 256
    expected = 6 * 1_024_387 * tokens + 3 * 2 * 2 * 4 * 32 * 128.5 * tokens * 4
    assert cases.train_step_flops(model, counts, 16, 256) == expected
    assert 6.9e6 < expected / tokens < 7.0e6
    base = {"group": "g", "reps": 3, "median_cpu_s": 0.4, "baseline": None, "ratio_to_dense": None,
            "cpu_ratio_to_dense": None, "useful_gflop": 0.0, "gflops_per_s": 0.0, "memory": {}}
    records = [dict(base, name="train_step/grin_tiny", mode="train_step", shape={"tokens": 4096}, median_s=0.4),
               dict(base, name="moe/fwd", mode="fwd", shape={"tokens": 4096}, median_s=0.1)]
    table = format_table(records)
    assert "tokens/s train_step/grin_tiny: 10,240" in table and "tokens/s moe/fwd" not in table


def test_main_job_loop_group_times_the_trainer_loop_against_a_phimoe_loop():
    """The main-job loop group (grin_tiny:smoke): trainer.LoopSteps runs the trainer's own loop (its data pipeline,
    a metrics record per step at log_every=1, finite losses), sizes.loop_steps steps per call; the PyTorch peer
    trains PhiMoE on the same pipeline's batches (its loss falls from ~ln 256) and masks attention to each packed
    document, as grin-jax does: a packed row's second document gets the logits it gets alone."""
    import dataclasses

    import torch

    from grin_jax.bench import harness
    from grin_jax.train import metrics

    sizes = dataclasses.replace(cases.QUICK, train_step=True)
    (group,) = cases.main_job_loop_groups(sizes, jax.random.key(0))
    assert [v.name for v in group.variants] == ["peak_matmul", "loop/grin_tiny", "loop/transformers_phimoe"]
    records = {r["name"]: r for r in harness.run_group(group, reps=2, log=lambda s: None)}
    steps = 3 * sizes.loop_steps  # the warm-up call and two timed ones
    loop = group.variants[1].fn
    assert loop.step == steps
    logged = metrics.read_jsonl(os.path.join(loop.run.workdir, "metrics.jsonl"))
    assert [r["step"] for r in logged] == list(range(1, steps + 1))  # each call reads its last step
    assert all(np.isfinite(r["train/loss"]) for r in logged)
    peer = group.variants[2].fn.fn
    assert len(peer.losses) == steps and np.isfinite(peer.losses).all() and peer.losses[0] > 4.0
    assert records["loop/transformers_phimoe"]["baseline"] == "loop/grin_tiny"
    assert records["loop/grin_tiny"]["shape"]["tokens"] == sizes.loop_steps * 4 * 32
    assert "tokens/s loop/grin_tiny" in format_table(list(records.values()))

    model = peer.model.eval()
    ids = torch.randint(0, 256, (1, 12))
    packed_positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=packed_positions, use_cache=False).logits[0, 5:]
        alone = model(input_ids=ids[:, 5:], position_ids=packed_positions[:, 5:], use_cache=False).logits[0]
        unmasked = model(input_ids=ids, use_cache=False).logits[0, 5:]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    assert (packed - unmasked).abs().max() > 1e-3  # the check can fail: without the packing they differ
