"""DS-MoE on a trained checkpoint (grin_jax.sparsity, configs/ds_moe_tiny.py): the configs and their parameter
matching, the sparsity settings, the evaluation grid command on a smoke run (dense row = top-K with K = N; active
fractions; threshold-top-K uses the count the threshold measured) and `sample` with a chosen sparsity."""

import csv
import importlib.util
import json
import os

import numpy as np
import pytest

from grin_jax import models, params, sparsity
from grin_jax.models.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ds_moe_tiny(arg=None):
    spec = importlib.util.spec_from_file_location("ds_moe_tiny", os.path.join(REPO, "configs", "ds_moe_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_configs_build_and_match_parameters():
    counts = {v: params.count_params(models.model_config_from(ds_moe_tiny(v).model)) for v in ("", "dense", "moe")}
    # The DS-MoE experts together, the dense FFN and the MoE's experts: the same parameters.
    assert counts[""]["experts"] == counts["dense"]["dense_ffn"] == counts["moe"]["experts"] > 0
    # Attention: the dense attention's parameters plus the router (D x E) and the per-expert output biases.
    m = models.model_config_from(ds_moe_tiny().model)
    extra = m.num_layers * (m.d_model * m.moa.num_experts + (m.moa.num_experts - 1) * m.d_model)
    assert counts[""]["attention"] == counts["dense"]["attention"] + extra
    for arg in ("smoke", "moe,smoke", "dense,smoke"):
        models.model_config_from(ds_moe_tiny(arg).model)
    with pytest.raises(ValueError, match="variant"):
        ds_moe_tiny("sparse")


@pytest.mark.parametrize("text,expected", [("dense", ("dense", None)), ("top_k:3", ("top_k", 3)),
                                           ("threshold:1.5", ("threshold", 1.5)),
                                           ("threshold_top_k:0", ("threshold_top_k", 0.0))])
def test_parse_setting(text, expected):
    assert sparsity.parse_setting(text) == expected


@pytest.mark.parametrize("text", ["top_k", "top_k:0", "top_k:1.5", "threshold:-1", "threshold:nan", "sparse:2",
                                  "dense:1", "threshold:inf"])
def test_parse_setting_rejects(text):
    with pytest.raises(ValueError, match="accepted values"):
        sparsity.parse_setting(text, what="--mlp_sparsity")


def test_with_sparsity_sets_every_section():
    config = ModelConfig.make(vocab_size=40, d_model=16, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=4,
                              layout="a,b", a={"kind": "ds_moe", "num_experts": 4, "d_hidden": 8},
                              b={"kind": "ds_moe", "num_experts": 4, "d_hidden": 8}, moa={"num_experts": 4})
    out = sparsity.with_sparsity(config, mlp="threshold:2", attention="top_k:1")
    for name in ("a", "b"):
        assert (out.section(name).inference, out.section(name).inference_top_k,
                out.section(name).inference_threshold) == ("threshold", 4, 2.0)
    assert (out.moa.inference, out.moa.inference_top_k) == ("top_k", 1)
    with pytest.raises(ValueError, match="top_k:5 is invalid for 4 experts"):
        sparsity.with_sparsity(config, attention="top_k:5")
    with pytest.raises(ValueError, match="threshold_top_k"):
        sparsity.with_sparsity(config, mlp="threshold_top_k:1")
    dense_model = config.replace(layout="dense", moa=None)
    with pytest.raises(ValueError, match="no ds_moe FFN sections"):
        sparsity.with_sparsity(dense_model, mlp="top_k:1")
    with pytest.raises(ValueError, match="no attention experts"):
        sparsity.with_sparsity(dense_model, attention="top_k:1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from grin_jax.train import trainer
    workdir = str(tmp_path_factory.mktemp("ds_moe") / "run")
    config = ds_moe_tiny("smoke")
    config.train.steps = 4
    trainer.train(config, workdir)
    return workdir


def test_grid_command(trained, tmp_path):
    out = str(tmp_path / "grid")
    assert sparsity.main([f"--workdir={trained}", "--max_batches=1", "--thresholds=1,2", f"--out={out}"]) == 0
    for name in ("grid.json", "grid.csv", "grid.md", "loss_vs_active.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    grid = json.load(open(os.path.join(out, "grid.json")))
    rows = {(r["mlp"], r["attention"]): r for r in grid["rows"]}
    with open(os.path.join(out, "grid.csv")) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    n, e = 8, 4  # the smoke model: 8 MLP experts, 4 attention experts
    dense = rows[("dense", "dense")]
    assert dense["mlp_active_fraction"] == dense["attention_active_fraction"] == 1.0
    # Top-K with K = N is the dense mode, for either layer type.
    np.testing.assert_allclose(rows[(f"top_k:{n}", "dense")]["loss"], dense["loss"], atol=1e-5)
    np.testing.assert_allclose(rows[("dense", f"top_k:{e}")]["loss"], dense["loss"], atol=1e-5)
    for k in (4, 2, 1):
        assert rows[(f"top_k:{k}", "dense")]["mlp_active_fraction"] == pytest.approx(k / n)
        assert rows[(f"top_k:{k}", "dense")]["attention_active_fraction"] == 1.0
    assert rows[("dense", "top_k:1")]["attention_active_fraction"] == pytest.approx(1 / e)
    # Threshold-top-K: top-K with K = the mean count over the threshold that the threshold row measured.
    for eps in (1.0, 2.0):
        measured = rows[(f"threshold:{eps:g}", "dense")]["mlp_threshold_active"]
        assert rows[(f"threshold:{eps:g}", "dense")]["mlp_active_fraction"] == pytest.approx(measured / n)
        k = min(n, max(1, round(measured)))
        row = rows[(f"threshold_top_k:{eps:g}", "dense")]
        assert row["mlp_as"] == f"top_k:{k}" and row["mlp_active_fraction"] == pytest.approx(k / n)
        if (f"top_k:{k}", "dense") in rows:  # the same setting scored twice: the same loss
            np.testing.assert_allclose(row["loss"], rows[(f"top_k:{k}", "dense")]["loss"], atol=1e-6)
    # A lower active fraction is a different model: the grid is not one number repeated.
    assert abs(rows[("dense", "top_k:1")]["loss"] - dense["loss"]) > 1e-4


def test_grid_command_rejects_bad_arguments(tmp_path, capsys):
    assert sparsity.main([f"--workdir={tmp_path}", "--thresholds=a,1"]) == 2
    assert "--thresholds='a,1' is invalid" in capsys.readouterr().err
    assert sparsity.main([f"--workdir={tmp_path}"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_sample_with_a_chosen_sparsity(trained, capsys):
    from grin_jax import sample
    dense = sample.sample_text(trained, prompt="a", max_new_tokens=6, temperature=0.0)
    sparse = sample.sample_text(trained, prompt="a", max_new_tokens=6, temperature=0.0, mlp_sparsity="top_k:1",
                                attention_sparsity="threshold:1")
    assert isinstance(dense, str) and isinstance(sparse, str)
    same = sample.sample_text(trained, prompt="a", max_new_tokens=6, temperature=0.0, mlp_sparsity="top_k:8",
                              attention_sparsity="top_k:4")
    assert same == dense  # top-K with every expert generates what the dense mode does
    assert sample.main(["sample", f"--workdir={trained}", "--mlp_sparsity=threshold_top_k:1"]) == 2
    assert "threshold-top-K needs K measured" in capsys.readouterr().err
    assert sample.main(["sample", f"--workdir={trained}", "--attention_sparsity=top:1"]) == 2
    assert "--attention_sparsity='top:1' is invalid" in capsys.readouterr().err
