"""Hugging Face PhiMoE / Mixtral <-> grin_jax: logits equal to transformers' (eval mode, float32), exact tensor
round trips in the 5.x fused and the 4.x per-expert layouts, config.json mapping."""

import dataclasses
import importlib.util
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers
from safetensors.numpy import load_file  # noqa: E402

from grin_jax import convert  # noqa: E402
from grin_jax.convert import hf as hf_conv  # noqa: E402
from grin_jax.models import apply_jit as apply, model_config_from, unflatten_params  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 16  # > sliding window 5: the window is exercised
TOL = 1e-4  # max |ours - HF| / max |HF|


def _tiny_hf_config(family, **kw):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, sliding_window=5, num_local_experts=4,
                  num_experts_per_tok=2)
    if family == "phimoe":
        common.update(attention_bias=True, lm_head_bias=True, input_jitter_noise=0.0,
                      router_jitter_noise=0.1,  # larger than GRIN's 0.01 so the mask keeps 2+ candidates often
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        common.update(kw)
        return transformers.PhimoeConfig(**common)
    common.update(head_dim=24,  # != hidden / heads: exercised
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    common.update(kw)
    return transformers.MixtralConfig(**common)


def _randomize(model, seed):
    """transformers' init (std 0.02) makes every logit nearly equal; use O(1) activations instead."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)


class HFModel:
    def __init__(self, family, path, seed, **kw):
        cls = transformers.PhimoeForCausalLM if family == "phimoe" else transformers.MixtralForCausalLM
        torch.manual_seed(seed)
        self.model = cls(_tiny_hf_config(family, **kw))
        _randomize(self.model, seed)
        self.model.eval()
        self.path = path
        self.model.save_pretrained(path)  # transformers 5.x writes the legacy 4.x per-expert layout
        self.tokens = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(seed))
        self.logits = self.logits_of(self.model)
        self.state = {k: v.detach().numpy() for k, v in self.model.state_dict().items()}  # 5.x fused layout

    def logits_of(self, model):
        with torch.no_grad():
            return model(self.tokens).logits.numpy()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "phimoe": HFModel("phimoe", str(root / "phimoe"), 0),
        "mixtral": HFModel("mixtral", str(root / "mixtral"), 1),
        "mixtral_tied": HFModel("mixtral", str(root / "mixtral_tied"), 2, tie_word_embeddings=True),
    }


def _rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("name", ["phimoe", "mixtral", "mixtral_tied"])
def test_logits_match_transformers(hf_models, name):
    ref = hf_models[name]
    config, graphdef, params = convert.import_hf(ref.path)
    logits, aux = apply(graphdef, params, jnp.asarray(ref.tokens.numpy()))
    err = _rel_err(logits, ref.logits)
    print(f"{name}: max |logit diff| = {np.max(np.abs(np.asarray(logits) - ref.logits)):.3g}, relative {err:.3g}")
    assert err < TOL
    assert aux["metrics"]["moe/max_load"].shape == (config.num_layers,)
    if name == "phimoe":
        # SparseMixer-v2's mask kept >= 2 candidates for some tokens: the eval weights are not all 1.
        assert float(np.max(aux["metrics"]["moe/mean_candidates"])) > 1.0


def test_sliding_window_mask_equals_transformers():
    """transformers 5.x `sliding_window_causal_mask_function`: a query at p sees keys p - W < j <= p."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    from grin_jax.nn import attention_mask

    positions = jnp.arange(12)[None]
    for window in (1, 3, 5, 12):
        ours = np.asarray(attention_mask(positions, positions, window))[0]
        idx = torch.arange(12)
        theirs = sliding_window_causal_mask_function(window)(torch.tensor(0), torch.tensor(0), idx[:, None],
                                                             idx[None, :]).numpy()
        np.testing.assert_array_equal(ours, theirs)
        assert ours.sum(axis=1).max() == window  # W keys including the query's own position


def test_sliding_window_off_by_one_changes_logits(hf_models):
    ref = hf_models["phimoe"]
    config, flat, _ = convert.read_hf_checkpoint(ref.path)
    graphdef, params = unflatten_params(config.replace(sliding_window=config.sliding_window + 1), flat)
    assert _rel_err(apply(graphdef, params, jnp.asarray(ref.tokens.numpy()))[0], ref.logits) > 100 * TOL


@pytest.mark.parametrize("name", ["phimoe", "mixtral", "mixtral_tied"])
def test_export_5x_round_trip(hf_models, name, tmp_path):
    ref = hf_models[name]
    config, graphdef, params = convert.import_hf(ref.path)
    convert.export_hf(str(tmp_path), config, params, layout="5.x")
    written = load_file(str(tmp_path / "model.safetensors"))
    expected = dict(ref.state)
    if config.tie_embeddings:
        assert "lm_head.weight" not in written
        expected.pop("lm_head.weight")
    assert set(written) == set(expected)
    for key, value in expected.items():
        assert written[key].dtype == value.dtype and np.array_equal(written[key], value), key
    # transformers loads the fused layout and our config.json as they are
    cls = type(ref.model)
    reloaded = cls.from_pretrained(str(tmp_path)).eval()
    np.testing.assert_array_equal(ref.logits_of(reloaded), ref.logits)


@pytest.mark.parametrize("name", ["phimoe", "mixtral"])
def test_export_4x_round_trip(hf_models, name, tmp_path):
    ref = hf_models[name]
    config, flat, hf_config = convert.read_hf_checkpoint(ref.path)
    assert hf_conv.detect_layout(hf_conv.read_safetensors_dir(ref.path)) == "4.x"
    convert.write_hf_checkpoint(str(tmp_path), config, flat, layout="4.x", base_hf_config=hf_config)
    written = load_file(str(tmp_path / "model.safetensors"))
    original = load_file(os.path.join(ref.path, "model.safetensors"))  # transformers' own 4.x file
    assert any(".block_sparse_moe.experts.3.w2.weight" in k for k in written)
    assert set(written) == set(original)
    for key in original:
        assert np.array_equal(written[key], original[key]), key
    # re-import gives identical parameters
    config2, flat2, _ = convert.read_hf_checkpoint(str(tmp_path))
    assert config2 == config
    assert set(flat2) == set(flat) and all(np.array_equal(flat2[k], flat[k]) for k in flat)
    reloaded = type(ref.model).from_pretrained(str(tmp_path)).eval()
    np.testing.assert_array_equal(ref.logits_of(reloaded), ref.logits)


def test_cli_round_trip_and_sharding(hf_models, tmp_path):
    from grin_jax.convert.__main__ import main

    ref = hf_models["phimoe"]
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    assert main(["--from-hf", ref.path, "--out", ckpt]) == 0
    assert sorted(os.listdir(ckpt)) == ["hf_config.json", "model_config.json", "params.safetensors"]
    assert main(["--to-hf", ckpt, "--out", out, "--layout", "5.x", "--max-shard-size", "100KB"]) == 0
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    state = hf_conv.read_safetensors_dir(out)
    assert set(state) == set(ref.state) and all(np.array_equal(state[k], ref.state[k]) for k in state)
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written["bos_token_id"] == ref.model.config.bos_token_id  # carried over from the source config.json
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}


def test_reused_output_directories_are_refused_unless_overwrite(hf_models, tmp_path, capsys):
    """A reused --out would mix an old conversion's files with the new one's (an old params.safetensors beside new
    shards, an old index): refused with one line naming the directory; --overwrite replaces the contents."""
    from grin_jax.convert.__main__ import main

    ref = hf_models["phimoe"]
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    assert main(["--from-hf", ref.path, "--out", ckpt, "--max-shard-size", "100KB"]) == 0   # sharded
    assert main(["--from-hf", ref.path, "--out", ckpt]) == 2                                 # reused: refused
    assert f"--out {ckpt} is not empty" in capsys.readouterr().err
    assert main(["--from-hf", ref.path, "--out", ckpt, "--overwrite"]) == 0
    assert sorted(os.listdir(ckpt)) == ["hf_config.json", "model_config.json", "params.safetensors"]  # no stale shard
    assert main(["--to-hf", ckpt, "--out", out, "--max-shard-size", "100KB"]) == 0          # an index file
    assert main(["--to-hf", ckpt, "--out", out]) == 2
    assert main(["--to-hf", ckpt, "--out", out, "--overwrite"]) == 0
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))             # no stale index
    state = hf_conv.read_safetensors_dir(out)
    assert set(state) == set(ref.state) and all(np.array_equal(state[k], ref.state[k]) for k in state)


def _load_config_file(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return model_config_from(module.get_config(arg).model)


# config.json of microsoft/GRIN-MoE (transformers 4.x era: rope_theta / rope_scaling at the top level).
GRIN_MOE_CONFIG_JSON = {
    "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "attention_bias": True,
    "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 32000, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "input_jitter_noise": 0.01, "intermediate_size": 6400,
    "lm_head_bias": True, "max_position_embeddings": 4096, "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 16, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.01,
    "sliding_window": 2047, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32064,
}
MIXTRAL_8X7B_CONFIG_JSON = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000,
}


def _used_sections(config):
    """The config without the FFN sections its layout does not use (the shipped configs carry a 'dense' section
    for their :dense variant; an imported checkpoint has only its MoE)."""
    return dataclasses.replace(config, sections=tuple((n, s) for n, s in config.sections if n in config.layout))


def test_config_json_mapping_matches_shipped_configs():
    grin = hf_conv.model_config_from_hf(GRIN_MOE_CONFIG_JSON)
    assert grin.param_dtype == "bfloat16"
    assert grin.replace(param_dtype="float32") == _used_sections(_load_config_file("grin_moe_16x3_8b"))
    mixtral = hf_conv.model_config_from_hf(MIXTRAL_8X7B_CONFIG_JSON)
    assert mixtral.replace(param_dtype="float32") == _used_sections(_load_config_file("mixtral_8x7b"))
    # and back: the architecture fields survive, in both layouts
    for layout in ("5.x", "4.x"):
        for hf, config in ((GRIN_MOE_CONFIG_JSON, grin), (MIXTRAL_8X7B_CONFIG_JSON, mixtral)):
            assert hf_conv.model_config_from_hf(hf_conv.hf_config_from_model_config(config, layout=layout,
                                                                                     base=hf)) == config


def test_config_json_errors():
    with pytest.raises(ValueError, match="rope type 'longrope'"):
        hf_conv.model_config_from_hf({**GRIN_MOE_CONFIG_JSON, "rope_scaling": {"type": "longrope"}})
    with pytest.raises(ValueError, match="model_type='llama'"):
        hf_conv.model_config_from_hf({**GRIN_MOE_CONFIG_JSON, "model_type": "llama"})
    with pytest.raises(ValueError, match="num_experts_per_tok=4 is not supported for phimoe"):
        hf_conv.model_config_from_hf({**GRIN_MOE_CONFIG_JSON, "num_experts_per_tok": 4})
    with pytest.raises(ValueError, match="no transformers PhiMoE / Mixtral equivalent"):
        hf_conv.family_of(hf_conv.model_config_from_hf(GRIN_MOE_CONFIG_JSON).replace(norm="rmsnorm"))


def test_a_truncated_safetensors_file_is_named(tmp_path, capsys):
    """A damaged or truncated .safetensors file: the error names the file (safetensors' own does not), and the CLI
    answers it in one line."""
    from grin_jax.convert.__main__ import main

    ckpt = str(tmp_path / "ckpt")
    convert.save_checkpoint(ckpt, hf_conv.model_config_from_hf(GRIN_MOE_CONFIG_JSON),
                            {"embed.embedding": np.ones((64, 64), np.float32)})
    params = os.path.join(ckpt, "params.safetensors")
    with open(params, "rb") as f:
        data = f.read()
    with open(params, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{params} is not a readable safetensors file")):
        convert.load_checkpoint(ckpt)
    assert main(["--to-hf", ckpt, "--out", str(tmp_path / "hf")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {params} is not a readable safetensors file"), lines
    hf_dir = tmp_path / "hf_in"
    hf_dir.mkdir()
    (hf_dir / "model.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(ValueError, match=re.escape(f"{hf_dir / 'model.safetensors'} is not a readable safetensors")):
        hf_conv.read_safetensors_dir(str(hf_dir))
