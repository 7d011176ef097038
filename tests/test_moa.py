"""Mixture of attention heads (grin_jax.nn.moa): the dense-training layer against the explicit sum over attention
experts computed one expert at a time in float64 numpy (values and gradients); each sparse mode against a
per-token reference; top-K with K = E equals the dense mode; generation with the shared KV cache equals the
full forward in the dense and the sparse modes; config validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grin_jax import models
from grin_jax.models.config import ModelConfig
from grin_jax.nn.moa import MixtureOfAttention, MoAConfig

D, H, G, K, E = 16, 8, 2, 4, 4  # He = 2 heads per expert, R = 1


def make_layer(use_bias=True, **options):
    config = MoAConfig.from_section(dict(num_experts=E, **options), num_heads=H, num_kv_heads=G)
    layer = MixtureOfAttention(D, config, K, use_bias=use_bias, rngs=nnx.Rngs(params=0))
    layer.router[...] = layer.router[...] * 4.0  # scores far from uniform: the sparse modes select different experts
    if use_bias:  # non-zero biases so they are checked too
        keys = jax.random.split(jax.random.key(7), 4)
        layer.q.bias[...] = 0.1 * jax.random.normal(keys[0], layer.q.bias.shape)
        layer.k.bias[...] = 0.1 * jax.random.normal(keys[1], layer.k.bias.shape)
        layer.v.bias[...] = 0.1 * jax.random.normal(keys[2], layer.v.bias.shape)
        layer.o_bias[...] = 0.1 * jax.random.normal(keys[3], layer.o_bias.shape)
    return layer


def inputs(B=2, S=6, seed=1):
    x = jax.random.normal(jax.random.key(seed), (B, S, D), jnp.float32)
    return x, jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))


def _rope(x_SHK, positions_S, theta=10000.0):
    half = x_SHK.shape[-1] // 2
    inv = 1.0 / theta ** (np.arange(0, 2 * half, 2) / (2 * half))
    freqs = positions_S[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))
    rot = np.concatenate([-x_SHK[..., half:], x_SHK[..., :half]], axis=-1)
    return x_SHK * cos[:, None] + rot * sin[:, None]


def numpy_expert_outputs(layer, x_BSD):
    """[E, B, S, D] float64: a_e(x) = O_e attention(Q_e x, K, V) + b_e, one expert at a time (causal)."""
    def get(*path):
        node = layer
        for name in path:
            node = getattr(node, name)
        return np.asarray(node[...], np.float64)

    x = np.asarray(x_BSD, np.float64)
    B, S, _ = x.shape
    He, R = H // E, H // E // G
    pos = np.arange(S)
    out = np.zeros((E, B, S, D))
    for b in range(B):
        k = _rope(np.einsum("sd,dgk->sgk", x[b], get("k", "kernel")) + get("k", "bias"), pos)
        v = np.einsum("sd,dgk->sgk", x[b], get("v", "kernel")) + get("v", "bias")
        for e in range(E):
            q = _rope(np.einsum("sd,dhk->shk", x[b], get("q", "kernel")[:, e]) + get("q", "bias")[e], pos)
            heads = np.zeros((S, He, K))
            for h in range(He):
                g = h // R
                scores = q[:, h] @ k[:, g].T / math.sqrt(K)
                scores = np.where(np.tril(np.ones((S, S), bool)), scores, -np.inf)
                probs = np.exp(scores - scores.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
                heads[:, h] = probs @ v[:, g]
            out[e, b] = np.einsum("shk,hkd->sd", heads, get("o_kernel")[e]) + get("o_bias")[e]
    return out


def numpy_scores(layer, x_BSD):
    logits = np.asarray(x_BSD, np.float64).reshape(-1, D) @ np.asarray(layer.router[...], np.float64)
    s = np.exp(logits - logits.max(-1, keepdims=True))
    return s / s.sum(-1, keepdims=True)  # [T, E]


def test_dense_mode_equals_explicit_sum_over_experts():
    layer = make_layer()
    x, pos = inputs()
    y, _, aux = layer(x, pos, training=True)
    a_EBSD = numpy_expert_outputs(layer, x)
    s_TE = numpy_scores(layer, x)
    reference = np.einsum("ebsd,bse->bsd", a_EBSD, s_TE.reshape(2, 6, E))
    np.testing.assert_allclose(np.asarray(y), reference, atol=2e-5, rtol=1e-4)
    assert set(aux["losses"]) == {"mutual_information"}


def test_dense_mode_gradients_equal_the_explicit_sum():
    """Gradients w.r.t. every parameter and the input: the fused layer against a jax reference that loops over the
    experts (E separate attentions with the expert's own heads, summed with S_e)."""
    layer = make_layer()
    x, pos = inputs()
    graphdef, params = nnx.split(layer, nnx.Param)
    cotangent = jax.random.normal(jax.random.key(3), x.shape)

    def fused(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x, pos, training=True)[0] * cotangent)

    def explicit(params, x):
        m = nnx.merge(graphdef, params)
        from grin_jax.nn.attention import apply_rope, attention_mask, dot_product_attention, rope_cos_sin
        cos, sin = rope_cos_sin(pos, K, 10000.0)
        k = apply_rope(m.k(x), cos, sin)
        v = m.v(x)
        idx = jnp.broadcast_to(jnp.arange(x.shape[1]), pos.shape)
        mask = attention_mask(idx, idx, None)
        s = m.scores(x.reshape(-1, D)).reshape(x.shape[0], x.shape[1], E)
        y = 0.0
        for e in range(E):  # the reference may loop over experts: it is not jitted model code
            q = apply_rope(m.q(x)[:, :, e], cos, sin)
            heads = dot_product_attention(q, k, v, mask)
            a = jnp.einsum("bshk,hkd->bsd", heads, m.o_kernel[...][e]) + m.o_bias[...][e]
            y = y + s[..., e:e + 1] * a
        return jnp.sum(y * cotangent)

    g_fused = jax.grad(fused, argnums=(0, 1))(params, x)
    g_explicit = jax.grad(explicit, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_explicit)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    router_grad = g_fused[0]["router"][...]
    assert float(jnp.max(jnp.abs(router_grad))) > 1e-4  # the router gets a gradient


def _sparse_reference(layer, x, mode, top_k, threshold):
    a_EBSD = numpy_expert_outputs(layer, x)
    s_TE = numpy_scores(layer, x)
    B, S, _ = x.shape
    a_TED = a_EBSD.transpose(1, 2, 0, 3).reshape(B * S, E, D)
    y = np.zeros((B * S, D))
    active = []
    for t in range(B * S):
        chosen = np.argsort(-s_TE[t], kind="stable")[:top_k]
        if mode == "threshold":
            chosen = [e for e in chosen if E * s_TE[t, e] > threshold]
        active.append(len(chosen))
        for e in chosen:
            y[t] += s_TE[t, e] * a_TED[t, e]
    return y.reshape(B, S, D), np.mean(active) / E


@pytest.mark.parametrize("mode,top_k,threshold", [("top_k", 1, 1.0), ("top_k", 2, 1.0), ("top_k", 3, 1.0),
                                                  ("threshold", 4, 1.0), ("threshold", 2, 0.5)])
def test_sparse_modes_equal_a_per_token_reference(mode, top_k, threshold):
    layer = make_layer(inference=mode, inference_top_k=top_k, inference_threshold=threshold)
    x, pos = inputs()
    y, _, aux = layer(x, pos, training=False)
    reference, active = _sparse_reference(layer, x, mode, top_k, threshold)
    np.testing.assert_allclose(np.asarray(y), reference, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(float(aux["metrics"]["active_fraction"]), active, rtol=1e-6)
    assert active < 1.0 or (mode == "threshold" and threshold < 1)  # the reference selects a strict subset here


def test_top_k_with_all_experts_equals_dense_mode():
    layer = make_layer()
    x, pos = inputs()
    dense, _, _ = layer(x, pos, training=False)
    layer.config = MoAConfig.from_section(dict(num_experts=E, inference="top_k", inference_top_k=E),
                                          num_heads=H, num_kv_heads=G)
    sparse, _, aux = layer(x, pos, training=False)
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), atol=1e-5)
    assert float(aux["metrics"]["active_fraction"]) == 1.0


def tiny_moa_model(**moa):
    return ModelConfig.make(vocab_size=40, d_model=D, num_layers=2, num_heads=H, num_kv_heads=G, head_dim=K,
                            max_seq_len=32, layout="ds_moe", attention_bias=True,
                            ds_moe=dict(num_experts=4, d_hidden=8), moa=dict(num_experts=E, **moa))


@pytest.mark.parametrize("moa", [dict(), dict(inference="top_k", inference_top_k=1),
                                 dict(inference="threshold", inference_top_k=2, inference_threshold=1.0)])
def test_generation_with_the_shared_kv_cache_equals_the_full_forward(moa):
    """Prefill 5 tokens, then decode 4 one at a time through the cache of G shared KV heads: every step's logits
    equal those of the full forward on the whole sequence (same mode)."""
    config = tiny_moa_model(**moa)
    graphdef, params = models.init(config, 0)
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 40)
    full, _ = models.apply(graphdef, params, tokens)
    cache = models.init_cache(config, 2, 9)
    assert cache[0]["k"].shape == (2, 9, G, K)  # one cache of the shared heads, whatever E
    logits, _, cache = models.apply_with_cache(graphdef, params, tokens[:, :5], cache, jnp.int32(0))
    steps = [logits]
    for i in range(5, 9):
        logits, _, cache = models.apply_with_cache(graphdef, params, tokens[:, i:i + 1], cache, jnp.int32(i))
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full), atol=2e-5)
    out = models.generate(graphdef, params, tokens[:, :5], max_new_tokens=3)
    assert out.shape == (2, 8)


def test_model_aux_reports_the_moa_section():
    config = tiny_moa_model(mi_coef=0.5)
    graphdef, params = models.init(config, 0)
    tokens = jnp.zeros((2, 6), jnp.int32)
    _, aux = models.apply(graphdef, params, tokens)
    assert aux["metrics"]["moa/expert_load"].shape == (2, E)
    expected = 0.5 * aux["losses"]["moa/mutual_information"] + 5e-4 * aux["losses"]["ds_moe/mutual_information"]
    np.testing.assert_allclose(float(aux["aux_loss"]), float(expected), rtol=1e-5)
    # Round trip through the config dict (what a checkpoint stores).
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("values,key", [
    (dict(num_experts=3), "moa.num_experts"),        # does not divide 8 heads
    (dict(num_experts=8), "moa.num_experts"),        # 1 head per expert, but 2 KV heads
    (dict(inference="top_p"), "moa.inference"),
    (dict(inference_top_k=5), "moa.inference_top_k"),
    (dict(mi_coef=float("nan")), "moa.mi_coef"),
    (dict(inference_threshold=-1.0), "moa.inference_threshold"),
    (dict(heads=2), "moa: unknown key"),
])
def test_config_validation(values, key):
    with pytest.raises(ValueError, match=key):
        MoAConfig.from_section(values, num_heads=H, num_kv_heads=G)


def test_ds_moe_model_with_attention_experts_on_a_mesh_equals_one_device():
    """configs/ds_moe_tiny.py:smoke (MLP and attention experts) through the train step's loss function on a
    data=2 x model=4 mesh of fake CPU devices (the attention experts' axis sharded over 'model') equals one device:
    the loss, the MoA MI loss and every gradient to 1e-5."""
    import importlib.util
    import os

    from grin_jax import sharding
    from grin_jax.train import step as step_module
    from grin_jax.train import trainer

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "ds_moe_tiny.py")
    spec = importlib.util.spec_from_file_location("ds_moe_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.model.moa.mi_coef = 0.1
    experiment = trainer.resolve(config, check_mesh=False)
    tx, _ = trainer.make_optimizer(config.train, experiment.model)
    graphdef, state = trainer.init_state(experiment, tx)
    rng = np.random.default_rng(0)
    B, S = 4, 16
    batch = {"inputs": rng.integers(0, 256, (B, S)).astype(np.int32),
             "targets": rng.integers(0, 256, (B, S)).astype(np.int32), "loss_mask": np.ones((B, S), np.float32)}
    loss_fn = step_module.make_loss_fn(graphdef)
    key = jax.random.fold_in(state["rng"], state["step"])

    def numbers(params, batch):
        (total, (_, aux, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        return total, aux["losses"]["moa/mutual_information"], grads

    ref = jax.jit(numbers)(state["params"], batch)
    config.mesh.data, config.mesh.expert, config.mesh.model = 2, 1, 4
    mesh = sharding.make_mesh(config.mesh)
    shardings = trainer.state_shardings(experiment, tx, mesh)
    placed = jax.device_put(state["params"], shardings["params"])
    q_kernel = placed["layers"][0]["attn"]["q"]["kernel"]
    assert q_kernel.sharding.shard_shape(q_kernel.shape)[1] == 1  # 4 attention experts over 4 model shards
    with jax.set_mesh(mesh):
        got = jax.jit(numbers)(placed, jax.device_put(batch, sharding.batch_sharding(mesh)))
    assert abs(float(got[0]) - float(ref[0])) < 1e-5 and abs(float(got[1]) - float(ref[1])) < 1e-6
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(ref[2]), jax.tree.leaves(got[2])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(p))
