"""PEER (grin_jax/ffn/peer.py): product-key top-k against brute force (ties included), parity with peer-pytorch,
chunked == unchunked (values, gradients, no [T, H, K, D] intermediate), config validation, a 'moe,peer' model
trained two steps with its retrieval metrics logged."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import grin_jax.ffn.peer as peer  # registers the kind (until grin_jax.ffn._load_builtin_kinds imports it)
from grin_jax import models, params as _params, presets
from grin_jax.train import trainer


# ------------------------------------------------------------------------------------------------ product keys
def brute_force(q1, q2, k1, k2, k):
    """lax.top_k over all N = n^2 scores (the half scores summed in float32, flat index i1 * n + i2)."""
    s1, s2 = q1 @ k1.T, q2 @ k2.T
    full = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], -1)
    return jax.lax.top_k(full, k)


@pytest.mark.parametrize("n,k,half", [(4, 4, 3), (16, 5, 8), (64, 16, 16), (256, 16, 8)])
def test_product_key_topk_equals_brute_force(n, k, half):
    keys = jax.random.split(jax.random.key(n + k), 4)
    q1, q2 = (jax.random.normal(keys[i], (24, half)) for i in range(2))
    k1, k2 = (jax.random.normal(keys[2 + i], (n, half)) for i in range(2))
    scores, idx = jax.jit(peer.product_key_topk, static_argnums=4)(q1, q2, k1, k2, k)
    ref_scores, ref_idx = brute_force(q1, q2, k1, k2, k)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(ref_scores), rtol=1e-6, atol=1e-6)
    # and the scores are the product-key scores [q1; q2] . [k1[i1]; k2[i2]] to float32 precision
    direct = (jnp.einsum("tq,tkq->tk", q1, k1[idx // n], precision="highest")
              + jnp.einsum("tq,tkq->tk", q2, k2[idx % n], precision="highest"))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(direct), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k", [(4, 4), (16, 8), (256, 16)])
def test_product_key_topk_ties_in_lax_top_k_order(n, k):
    """Small integers: exact float32 sums, many equal scores (also duplicated sub-keys and all-equal halves);
    the indices equal lax.top_k's over the full vector (equal scores: lower flat index first)."""
    rng = np.random.default_rng(n)
    q1 = rng.integers(-2, 3, (40, 3)).astype(np.float32)
    q2 = rng.integers(-2, 3, (40, 3)).astype(np.float32)
    k1 = rng.integers(-1, 2, (n, 3)).astype(np.float32)
    k2 = rng.integers(-1, 2, (n, 3)).astype(np.float32)
    k2[n // 2:] = k2[: n - n // 2]          # duplicated sub-keys
    q1[:5] = 0.0                            # a half of all-equal scores
    q2[5:10] = 0.0
    q1[10:12] = q2[10:12] = 0.0             # every one of the N scores equal
    scores, idx = peer.product_key_topk(q1, q2, k1, k2, k)
    ref_scores, ref_idx = brute_force(jnp.asarray(q1), jnp.asarray(q2), jnp.asarray(k1), jnp.asarray(k2), k)
    assert np.sum(np.diff(np.asarray(ref_scores), axis=-1) == 0) > 40 * (k - 1) // 2   # ties are really there
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(ref_scores))
    np.testing.assert_array_equal(np.asarray(idx[10]), np.arange(k))


def test_product_key_topk_gradient_reaches_queries_and_keys():
    keys = jax.random.split(jax.random.key(0), 4)
    args = [jax.random.normal(keys[i], (6, 4) if i < 2 else (8, 4)) for i in range(4)]

    def f(*a):
        return jnp.sum(jnp.sin(peer.product_key_topk(*a, 3)[0]))

    def g(*a):
        return jnp.sum(jnp.sin(brute_force(*a, 3)[0]))

    for a, b in zip(jax.grad(f, argnums=(0, 1, 2, 3))(*args), jax.grad(g, argnums=(0, 1, 2, 3))(*args)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ peer-pytorch parity
def _torch_to_ours(torch_peer, config):
    """peer-pytorch weights -> our parameter values (see docs/peer.md for the mapping)."""
    H, D, Q = config.heads, config.d_model, config.d_key
    w = torch_peer.to_queries[0].weight.detach().numpy()           # [2 * H * Q/2, D], rows (p, h, e)
    w_query = w.reshape(2, H, Q // 2, D).transpose(3, 1, 0, 2).reshape(D, H, Q)
    sub_keys = torch_peer.keys.detach().numpy().transpose(0, 2, 1, 3)  # [H, n, 2, Q/2] -> [H, 2, n, Q/2]
    shape = (config.num_pools, config.num_experts, D) if not config.shared_experts else (config.num_experts, D)
    w_in = torch_peer.weight_down_embed.weight.detach().numpy().reshape(shape)
    w_out = torch_peer.weight_up_embed.weight.detach().numpy().reshape(shape)
    return {"w_query": w_query, "sub_keys": sub_keys, "w_in": w_in, "w_out": w_out}


@pytest.mark.parametrize("separate,non_competing", [(False, False), (True, False), (False, True)])
def test_parity_with_peer_pytorch(separate, non_competing):
    import torch
    import PEER_pytorch  # the test extra installs peer-pytorch: a missing peer fails, never skips
    torch.manual_seed(0)
    D, H, n, k, dim_key = 32, 4, 16, 4, 8
    tp = PEER_pytorch.PEER(D, heads=H, num_experts=n * n, num_experts_per_head=k, activation=torch.nn.GELU,
                           dim_key=dim_key, separate_embed_per_head=separate, pre_rmsnorm=False,
                           non_competing_scores=non_competing)
    config = peer.PEERConfig(d_model=D, num_experts=n * n, heads=H, top_k=1 if non_competing else k,
                             d_key=2 * dim_key, shared_keys=False, shared_experts=not separate,
                             score_activation="relu" if non_competing else "softmax", expert_activation="gelu",
                             chunk_tokens=None)
    module = peer.PEERFFN(config, rngs=nnx.Rngs(0))
    for name, value in _torch_to_ours(tp, config).items():
        assert getattr(module, name)[...].shape == value.shape, name
        getattr(module, name)[...] = jnp.asarray(value)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, D)).astype(np.float32)
    cot = rng.standard_normal((2, 9, D)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = tp(xt)
    (yt * torch.tensor(cot)).sum().backward()

    graphdef, state = nnx.split(module)

    def f(x):
        y, _ = nnx.merge(graphdef, state)(x)
        return jnp.sum(y * cot), y

    (_, y), dx = jax.value_and_grad(f, has_aux=True)(jnp.asarray(x))
    for ours, theirs in [(y, yt.detach().numpy()), (dx, xt.grad.numpy())]:
        ours = np.asarray(ours)
        assert np.max(np.abs(ours - theirs)) <= 1e-5 * np.max(np.abs(theirs))
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.max(np.abs(theirs)))


# ------------------------------------------------------------------------------------------------ chunking
def test_chunked_equals_unchunked_and_bounds_the_gathered_rows():
    B, S, D, H, K, C = 2, 7, 16, 2, 3, 4
    base = dict(d_model=D, num_experts=8 * 8, heads=H, top_k=K, d_key=8, shared_experts=False)
    modules = [peer.PEERFFN(peer.PEERConfig(**base, chunk_tokens=c), rngs=nnx.Rngs(3)) for c in (None, C)]
    x = jax.random.normal(jax.random.key(4), (B, S, D))
    cot = jax.random.normal(jax.random.key(5), (B, S, D))
    results = []
    for m in modules:
        graphdef, state = nnx.split(m)

        def f(state, x, graphdef=graphdef):
            y, aux = nnx.merge(graphdef, state)(x)
            return jnp.sum(y * cot), (y, aux["metrics"])

        (value, (y, metrics)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(state, x)
        results.append((y, metrics, grads))
        jaxpr = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1), has_aux=True))(state, x))
        full = f"f32[{B * S},{H},{K},{D}]"
        assert (full in jaxpr) == (m.config.chunk_tokens is None)
        if m.config.chunk_tokens is not None:
            assert f"f32[{C},{H},{K},{D}]" in jaxpr
    (y0, m0, g0), (y1, m1, g1) = results
    np.testing.assert_allclose(np.asarray(y0), np.asarray(y1), rtol=1e-5, atol=1e-6)
    for key in m0:
        np.testing.assert_allclose(float(m0[key]), float(m1[key]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        assert np.any(np.asarray(a) != 0)


def test_retrieval_metrics():
    idx = jnp.array([[[0, 1], [1, 2]], [[0, 3], [0, 3]]], jnp.int32)   # T=2, H=2, K=2, P=8
    m = peer.retrieval_metrics(idx, 8)
    assert float(m["usage"]) == 4 / 8
    z = np.array([3, 2, 1, 2, 0, 0, 0, 0]) / 8
    assert np.isclose(float(m["unevenness"]), np.sum(z[z > 0] * np.log(z[z > 0] * 8)), rtol=1e-6)
    assert np.isclose(float(m["head_overlap"]), (1 / 2 + 2 / 2) / 2)
    assert float(peer.retrieval_metrics(idx[:, :1], 8)["head_overlap"]) == 0.0


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("key,value,match", [
    ("num_experts", 200, "perfect squares"), ("num_experts", 0, "perfect squares"),
    ("num_experts", True, "perfect squares"), ("heads", 0, "integers >= 1"), ("top_k", 17, "1..sqrt"),
    ("d_key", 7, "even integers"), ("score_activation", "sigmoid", "softmax"),
    ("expert_activation", "tanh", "gelu"), ("shared_keys", 1, "True or False"),
    ("query_norm", "batchnorm", "running"), ("query_norm", "layernorm", "none"),
    ("chunk_tokens", 0, "None"), ("chunk_tokens", 2.0, "None")])
def test_config_validation(key, value, match):
    with pytest.raises(ValueError, match=f"peer.{key}") as error:
        peer.PEERConfig(d_model=64, **{"num_experts": 16 ** 2, key: value})
    assert match in str(error.value)


def test_config_section_round_trip_and_defaults():
    c = peer.PEERConfig.from_section({"num_experts": 32 ** 2, "heads": 4}, d_model=64)
    assert (c.top_k, c.d_key, c.score_activation, c.shared_keys, c.shared_experts) == (16, 64, "softmax", True, True)
    assert peer.PEERConfig.from_section(c.to_section(), d_model=64) == c
    assert c.loss_weights == {}
    with pytest.raises(ValueError, match="peer: unknown key.*accepted keys"):
        peer.PEERConfig.from_section({"experts": 4}, d_model=64)


# ------------------------------------------------------------------------------------------------ in a model
def test_peer_tiny_config_builds():
    import importlib.util
    spec = importlib.util.spec_from_file_location("peer_tiny", os.path.join(os.path.dirname(__file__), "..",
                                                                             "configs", "peer_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for arg, layout in [(None, ("moe", "peer", "peer", "moe")), ("smoke", ("moe", "peer"))]:
        model = models.model_config_from(module.get_config(arg).model)
        assert model.layout == layout and model.section("peer").num_experts in (128 ** 2, 32 ** 2)


def test_moe_peer_model_trains_two_steps_and_logs_usage(tmp_path):
    config = presets.tiny("smoke", name="peer")
    config.model.layout = "moe,peer"
    config.model.peer = dict(num_experts=16 ** 2, heads=2, top_k=4, d_key=32, chunk_tokens=64)
    model = models.model_config_from(config.model)
    assert [model.layer_config(i)[1] for i in range(2)] == ["moe", "peer"]
    counts = _params.count_params(model)
    assert counts["peer_experts"] == 2 * 256 * 64 and counts["peer_experts_active"] == 2 * 4 * 2 * 64
    assert counts["peer_router"] == 64 * 2 * 32 + 2 * 16 * 16
    from kind_checks import train_steps
    last = train_steps(config, tmp_path)
    assert 0 < last["train/peer/usage"] <= 1
    assert last["train/peer/unevenness"] >= 0 and 0 <= last["train/peer/head_overlap"] <= 1
    _, _, params, _ = trainer.load_trained(str(tmp_path))
    flat = models.flatten_params(params)
    assert flat["layers.1.mlp.w_in"].shape == (256, 64) and flat["layers.1.mlp.sub_keys"].shape == (2, 16, 16)


def test_moe_peer_model_on_a_mesh_equals_one_device():
    """On a (2, 2, 2) mesh of fake devices (PEER's expert tables sharded over the expert axis by the 'peer_experts'
    rule, the rest replicated; the layer is plain XLA, partitioned by the compiler) the loss and gradients equal one
    device's."""
    from kind_checks import assert_mesh_equals_one_device
    config = presets.tiny("smoke", name="peer")
    config.model.layout = "moe,peer"
    config.model.peer = dict(num_experts=16 ** 2, heads=2, top_k=4, d_key=32, chunk_tokens=64)
    assert_mesh_equals_one_device(config)
