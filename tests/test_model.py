"""The decoder LM: config validation, the functional API, aux losses, layer patterns, dtypes, sharding names.
(Logit equality with transformers' PhiMoE / Mixtral: test_convert.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grin_jax.models import (ModelConfig, apply, apply_jit, cross_entropy, flatten_params, init, model_config_from,
                             unflatten_params)
from grin_jax.params import count_params

TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32, sliding_window=6,
            attention_bias=True, lm_head_bias=True, layout="moe")
TINY_MOE = dict(num_experts=4, top_k=2, d_hidden=24, input_jitter=0.01, router_options={"jitter_eps": 0.3},
                load_balance_coef=0.01, z_loss_coef=0.001)


def tiny(moe=None, **kw):
    return ModelConfig.make(**{**TINY, **kw}, moe={**TINY_MOE, **(moe or {})}, dense={"d_hidden": 48})


@pytest.fixture(scope="module")
def tiny_model():
    return init(tiny(), 0)


TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, TINY["vocab_size"])


@pytest.mark.parametrize("changes, match", [
    (dict(num_heads=4, num_kv_heads=3), r"num_heads=4 is not divisible by num_kv_heads=3"),
    (dict(sliding_window=33), r"sliding_window=33 is invalid: accepted values are None or 1..max_seq_len=32"),
    (dict(moe=dict(router="top2")), r"moe.router='top2' is invalid: accepted values are \[.*'sparsemixer_v2'.*'topk"),
    (dict(moe=dict(activation="swish")), r"moe.activation='swish' is invalid"),
    (dict(norm="batchnorm"), r"norm='batchnorm' is invalid: accepted values are \['layernorm', 'rmsnorm'\]"),
    (dict(moe=dict(backend="magic")), r"backend='magic' is unknown"),
    (dict(layout="sparse"), r"model.layout='sparse' names 'sparse', which is not a section of the model config"),
    (dict(layout="moe,dense,moe"), r"model.layout='moe,dense,moe' has 3 entries: accepted are one entry per layer "
                                   r"or a pattern whose length divides num_layers=2"),
    (dict(moe=dict(kind="nope")), r"model.moe: FFN kind 'nope' is unknown: accepted kinds are \['dense', .*'moe'"),
    (dict(moe=dict(num_expert=4)), r"moe: unknown key\(s\) \['num_expert'\]: accepted keys are \['num_experts'"),
    (dict(dtype="int8"), r"dtype='int8' is invalid"),
    (dict(moe=dict(top_k=5)), r"top_k=5 is invalid: accepted values are 1..num_experts=4"),
    (dict(rope_theta=float("inf")), r"rope_theta=inf is invalid: accepted values are finite numbers > 0"),
    (dict(norm_eps=float("nan")), r"norm_eps=nan is invalid"),
    (dict(d_model=30, num_heads=4), r"d_model=30 is not divisible by num_heads=4"),
    (dict(head_dim=7), r"head_dim=7 is invalid: RoPE needs an even head dim"),
    (dict(num_layers=0), r"num_layers=0 is invalid: accepted values are integers >= 1"),
    (dict(attention_bias=1), r"attention_bias=1 is invalid: accepted values are True or False"),
    (dict(moe=dict(input_jitter=1.5)), r"input_jitter=1.5 is invalid"),
])
def test_config_errors_before_tracing(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny(**changes)


def test_model_config_from_config_dict():
    import ml_collections

    values = {**TINY, "moe": TINY_MOE, "dense": {"d_hidden": 48}}
    assert model_config_from(ml_collections.ConfigDict(values)) == tiny()
    with pytest.raises(ValueError, match=r"model.num_expert is unknown: accepted keys are \["):
        model_config_from({**values, "num_expert": 4})


def test_forward_training_aux_and_gradients(tiny_model):
    config = tiny()
    graphdef, params = tiny_model
    tokens = TOKENS

    def loss_fn(params, rng):
        logits, aux = apply(graphdef, params, tokens, training=True, rng=rng)
        return cross_entropy(logits[:, :-1], tokens[:, 1:]) + aux["aux_loss"], (logits, aux)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, (logits, aux)), grads = grad_fn(params, jax.random.key(2))
    assert logits.shape == (2, 12, config.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(float(loss))
    num_moe = config.num_layers
    assert set(aux["losses"]) == {"moe/load_balance_loss", "moe/z_loss"}
    assert aux["metrics"]["moe/expert_load"].shape == (num_moe, 4)
    np.testing.assert_allclose(np.sum(aux["metrics"]["moe/expert_load"], axis=-1), 1.0, rtol=1e-6)
    for key in ("router_grad_fraction", "max_load", "router_entropy", "dropped_fraction"):
        assert aux["metrics"]["moe/" + key].shape == (num_moe,), key
    np.testing.assert_allclose(aux["aux_loss"], 0.01 * aux["losses"]["moe/load_balance_loss"]
                               + 0.001 * aux["losses"]["moe/z_loss"], rtol=1e-6)
    flat_grads = flatten_params(grads)
    for name in ("layers.0.mlp.router", "layers.1.mlp.w_gate", "layers.0.attn.q.kernel", "embed.embedding"):
        assert np.all(np.isfinite(flat_grads[name])) and np.any(flat_grads[name] != 0), name
    # eval mode is deterministic and needs no rng
    eval_logits, _ = apply_jit(graphdef, params, tokens)
    np.testing.assert_array_equal(eval_logits, apply_jit(graphdef, params, tokens)[0])
    assert not np.allclose(eval_logits, logits)  # training: input jitter and sampled routes


def test_default_backend_is_the_cpu_kernel_and_equals_dense(tiny_model):
    """moe_backend 'auto' (the default) runs the C++ kernel on CPU, forward and backward, with the same loss and
    gradients as the dense reference backend."""
    graphdef, params = tiny_model
    assert tiny().section("moe").backend == "auto"

    def grad_fn(graphdef):
        def loss_fn(params):
            logits, aux = apply(graphdef, params, TOKENS, training=True, rng=jax.random.key(3))
            return cross_entropy(logits[:, :-1], TOKENS[:, 1:]) + aux["aux_loss"]
        return jax.jit(jax.value_and_grad(loss_fn))

    hlo = grad_fn(graphdef).lower(params).as_text()
    assert "grin_expert_mlp_fwd" in hlo and "grin_expert_mlp_bwd" in hlo
    dense_graphdef, _ = init(tiny(moe=dict(backend="dense")), 0)
    (loss, grads), (loss_ref, grads_ref) = grad_fn(graphdef)(params), grad_fn(dense_graphdef)(params)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * np.abs(b).max() + 1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def test_layout_pattern_and_dense_baseline():
    config = tiny(num_layers=4, layout="dense,moe")
    assert config.layout == ("dense", "moe", "dense", "moe") and config.layers_of("moe") == (1, 3)
    graphdef, params = init(config, 0)
    flat = flatten_params(params)
    assert flat["layers.0.mlp.w_gate"].shape == (32, 48)            # dense FFN, width top_k * d_hidden
    assert flat["layers.1.mlp.w_gate"].shape == (4, 32, 24)         # MoE
    _, aux = apply_jit(graphdef, params, jnp.zeros((1, 8), jnp.int32))
    assert aux["metrics"]["moe/expert_load"].shape == (2, 4)         # stacked over the 2 MoE layers only
    assert tiny(num_layers=4, layout=["moe", "dense", "dense", "moe"]).layers_of("moe") == (0, 3)
    # the dense baseline has the MoE's active parameters, except the routers (d_model x experts per layer)
    moe, dense = count_params(tiny()), count_params(tiny(layout="dense"))
    assert dense["total"] == dense["active"]
    assert moe["active"] - dense["active"] == tiny().num_layers * 32 * 4
    assert moe["total"] - moe["active"] == tiny().num_layers * 3 * 32 * 24 * (4 - 2)


def test_a_block_without_ffn():
    """layout entry 'none' (a kind without a section): that block is attention only (its FFN adds 0 and has no
    parameters); the model equals one whose block has a dense FFN with zero output weights."""
    config = tiny(num_layers=2, layout="dense,none")
    assert config.layout == ("dense", "none")
    graphdef, params = init(config, 0)
    flat = flatten_params(params)
    assert not any(name.startswith("layers.1.mlp.") for name in flat)
    counts, dense_counts = count_params(config), count_params(tiny(num_layers=2, layout="dense"))
    assert dense_counts["total"] - counts["total"] == 3 * 32 * 48     # one SwiGLU of width 48 fewer
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    logits, _ = apply_jit(graphdef, params, tokens)
    dense_config = tiny(num_layers=2, layout="dense")
    dense_flat = flatten_params(init(dense_config, 0)[1])
    dense_flat.update(flat)
    dense_flat["layers.1.mlp.w_down"] = jnp.zeros_like(dense_flat["layers.1.mlp.w_down"])
    reference, _ = apply_jit(*unflatten_params(dense_config, dense_flat), tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), rtol=1e-6, atol=1e-6)


def test_logical_sharding_names_and_tied_embeddings():
    graphdef, params = init(tiny(tie_embeddings=True), 0)
    specs = {name: tuple(spec) for name, spec in flatten_params(nnx.get_partition_spec(params)).items()}
    assert specs["embed.embedding"] == ("vocab", "embed")
    assert specs["layers.0.attn.q.kernel"] == ("embed", "heads", "kv")
    assert specs["layers.0.attn.k.kernel"] == ("embed", "kv_heads", "kv")
    assert specs["layers.0.attn.o.kernel"] == ("heads", "kv", "embed")
    assert specs["layers.0.mlp.w_gate"] == ("experts", "embed", "mlp")
    assert specs["layers.0.mlp.w_down"] == ("experts", "mlp", "embed")
    assert specs["layers.0.mlp.router"] == ("embed", "experts")
    assert specs["lm_head_bias"] == ("vocab",)
    assert not any(name.startswith("lm_head.") for name in specs)  # tied: no head kernel
    # tied head == an untied head whose kernel is the embedding transposed
    flat = flatten_params(params)
    untied = dict(flat)
    untied["lm_head.kernel"] = flat["embed.embedding"].T
    untied["lm_head.bias"] = untied.pop("lm_head_bias")
    untied_graphdef, untied_params = unflatten_params(tiny(), untied)
    np.testing.assert_allclose(apply_jit(graphdef, params, TOKENS)[0],
                               apply_jit(untied_graphdef, untied_params, TOKENS)[0], rtol=1e-5, atol=1e-5)


def test_bfloat16_dtypes(tiny_model):
    graphdef32, params32 = tiny_model
    config = tiny(param_dtype="bfloat16", dtype="bfloat16", activation_dtype="bfloat16")
    graphdef, params = unflatten_params(config, flatten_params(params32))  # the same weights, rounded
    assert all(v.dtype == jnp.bfloat16 for v in flatten_params(params).values())
    logits, aux = apply_jit(graphdef, params, TOKENS)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    assert aux["losses"]["moe/z_loss"].dtype == jnp.float32
    logits32, _ = apply_jit(graphdef32, params32, TOKENS)
    assert np.corrcoef(np.asarray(logits).ravel(), np.asarray(logits32).ravel())[0, 1] > 0.98


def test_config_round_trips_through_dict():
    config = tiny(sliding_window=None, head_dim=16)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.replace(moe={"top_k": 1}).section("moe").top_k == 1
    assert config.replace(moe={"top_k": 1}).section("moe").num_experts == 4
