"""PEER (grin_jax/ffn/peer.py): product-key top-k against brute force (ties included), parity with peer-pytorch,
chunked == unchunked (values, gradients, no [T, H, K, D] intermediate), config validation, a 'moe,peer' model
trained two steps with its retrieval metrics logged; padding counts in no metric; the evaluation's usage and
unevenness (the router score accumulated over the evaluation set) against brute force; the query BatchNorm: masked
batch statistics and the momentum rule in training, running averages at eval, running statistics as train state
(not parameters, not optimised), through training, checkpoints and load_trained, and on a data-parallel mesh equal
to one device."""

import dataclasses
import math
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
@pytest.mark.parametrize("kernel", [False, True])
def test_product_key_topk_equals_brute_force(n, k, half, kernel):
    keys = jax.random.split(jax.random.key(n + k), 4)
    q1, q2 = (jax.random.normal(keys[i], (24, half)) for i in range(2))
    k1, k2 = (jax.random.normal(keys[2 + i], (n, half)) for i in range(2))
    topk = jax.jit(peer.product_key_topk, static_argnums=4, static_argnames="kernel")
    scores, idx = topk(q1, q2, k1, k2, k, kernel=kernel)
    ref_scores, ref_idx = brute_force(q1, q2, k1, k2, k)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(ref_scores), rtol=1e-6, atol=1e-6)
    # and the scores are the product-key scores [q1; q2] . [k1[i1]; k2[i2]] to float32 precision
    direct = (jnp.einsum("tq,tkq->tk", q1, k1[idx // n], precision="highest")
              + jnp.einsum("tq,tkq->tk", q2, k2[idx % n], precision="highest"))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(direct), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k", [(4, 4), (16, 8), (256, 16)])
@pytest.mark.parametrize("kernel", [False, True])
def test_product_key_topk_ties_in_lax_top_k_order(n, k, kernel):
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
    scores, idx = peer.product_key_topk(q1, q2, k1, k2, k, kernel=kernel)
    ref_scores, ref_idx = brute_force(jnp.asarray(q1), jnp.asarray(q2), jnp.asarray(k1), jnp.asarray(k2), k)
    assert np.sum(np.diff(np.asarray(ref_scores), axis=-1) == 0) > 40 * (k - 1) // 2   # ties are really there
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(ref_scores))
    np.testing.assert_array_equal(np.asarray(idx[10]), np.arange(k))


@pytest.mark.parametrize("kernel", [False, True])
def test_product_key_topk_gradient_reaches_queries_and_keys(kernel):
    keys = jax.random.split(jax.random.key(0), 4)
    args = [jax.random.normal(keys[i], (6, 4) if i < 2 else (8, 4)) for i in range(4)]

    def f(*a):
        return jnp.sum(jnp.sin(peer.product_key_topk(*a, 3, kernel=kernel)[0]))

    def g(*a):
        return jnp.sum(jnp.sin(brute_force(*a, 3)[0]))

    for a, b in zip(jax.grad(f, argnums=(0, 1, 2, 3))(*args), jax.grad(g, argnums=(0, 1, 2, 3))(*args)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [None, 3])
def test_kernel_scores_gradient_equals_the_dense_one(groups):
    """kernel=True's sparse gradient of the selected scores (ProductKeyScoresBwd, through the k selected sub-key
    pairs) against XLA's through the dense half scores, shared sub-keys and one pair per group (PEER's per-head
    keys, queries [..., G, A]); rows retrieve the same sub-key several times (k > 1 with n = 6), the cotangent is
    not uniform, and each half has its own width."""
    n, k, A, B = 6, 5, 4, 3
    r = jax.random.split(jax.random.key(groups or 0), 5)
    lead = (2, 7) if groups is None else (7, groups)
    kshape = (n,) if groups is None else (groups, n)
    q1, q2 = jax.random.normal(r[0], (*lead, A)), jax.random.normal(r[1], (*lead, B))
    k1, k2 = jax.random.normal(r[2], (*kshape, A)), jax.random.normal(r[3], (*kshape, B))
    cot = jax.random.normal(r[4], (*lead, k))
    results = {}
    for kernel in (False, True):
        f = lambda *a, kernel=kernel: peer.product_key_topk(*a, k, kernel=kernel)  # noqa: E731
        (scores, ids), vjp = jax.vjp(f, q1, q2, k1, k2)
        results[kernel] = scores, ids, vjp((cot, np.zeros(ids.shape, jax.dtypes.float0)))
    (s_x, i_x, g_x), (s_k, i_k, g_k) = results[False], results[True]
    np.testing.assert_array_equal(np.asarray(i_k), np.asarray(i_x))
    np.testing.assert_allclose(np.asarray(s_k), np.asarray(s_x), rtol=1e-6, atol=1e-6)
    assert np.any(np.diff(np.sort(np.asarray(i_x) // n, axis=-1), axis=-1) == 0)   # repeated sub-keys in a row
    for name, a, b in zip(("q1", "q2", "keys1", "keys2"), g_x, g_k):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.max(np.abs(np.asarray(a))) > 0.1


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
                             query_norm="none", chunk_tokens=None)  # peer-pytorch has no query BatchNorm
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
    base = dict(d_model=D, num_experts=8 * 8, heads=H, top_k=K, d_key=8, shared_experts=False, query_norm="none",
                backend="xla")  # the take-then-einsum path (the kernel gathers no rows at all)
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


# ------------------------------------------------------------------------------------------------ evaluation metrics
def np_accumulated(mass):
    """The paper's usage and unevenness of an accumulated router score mass (numpy, float64)."""
    m = np.asarray(mass, np.float64).reshape(-1)
    z = m[m > 0] / m.sum()
    return np.mean(m > 0), np.sum(z * np.log(z * m.size))


def test_padding_counts_in_no_metric_nor_score_mass():
    """The layer's router score mass (aux['sums']) and its per-batch retrieval metrics count the real tokens only:
    equal to numpy over the real tokens' own ids and gates (route), unchanged by other values on the padding
    tokens, different without the mask; in training mode too."""
    module = bn_module()
    x, mask = bn_batch()
    real = mask.reshape(-1) > 0
    P = BN_N
    for training in (False, True):
        m = bn_module()
        y, aux = m(jnp.asarray(x), training=training, token_mask_BS=jnp.asarray(mask))
        q_module = bn_module()
        idx, gates = q_module.route(jnp.asarray(x.reshape(-1, BN_D)), training=training,
                                    mask_T=jnp.asarray(mask.reshape(-1)))
        idx, gates = np.asarray(idx), np.asarray(gates)
        expected = np.zeros(P)
        np.add.at(expected, idx[real].reshape(-1), gates[real].reshape(-1))
        mass = np.asarray(aux["sums"]["router_score_mass"])
        assert mass.shape == (P,)
        np.testing.assert_allclose(mass, expected, rtol=1e-5, atol=1e-6)
        assert mass.sum() == pytest.approx(real.sum() * BN_H, rel=1e-5)   # softmax: each head's gates sum to 1
        reference = peer.retrieval_metrics(jnp.asarray(idx[real]), P)
        for key in ("usage", "unevenness", "head_overlap"):
            assert float(aux["metrics"][key]) == pytest.approx(float(reference[key]), rel=1e-6, abs=1e-7), key
        # other values on the padding tokens: the same mass and metrics; without the mask: not the same
        xf = x.copy()
        xf[mask == 0] = 100.0
        _, aux_f = bn_module()(jnp.asarray(xf), training=training, token_mask_BS=jnp.asarray(mask))
        np.testing.assert_allclose(np.asarray(aux_f["sums"]["router_score_mass"]), mass, rtol=1e-5, atol=1e-6)
        for key in ("usage", "unevenness", "head_overlap"):
            assert float(aux_f["metrics"][key]) == pytest.approx(float(aux["metrics"][key]), rel=1e-5, abs=1e-7)
        _, aux_all = bn_module()(jnp.asarray(x), training=training)
        assert float(jnp.sum(aux_all["sums"]["router_score_mass"])) == pytest.approx(mask.size * BN_H, rel=1e-5)
    # every token masked: no mass, usage 0
    _, aux_none = module(jnp.asarray(x), token_mask_BS=jnp.zeros((3, 5)))
    assert float(jnp.sum(aux_none["sums"]["router_score_mass"])) == 0.0 and float(aux_none["metrics"]["usage"]) == 0


def test_accumulated_metrics():
    assert peer.accumulated_metrics(np.ones(16)) == {"usage": 1.0, "unevenness": 0.0}
    one = peer.accumulated_metrics(np.eye(1, 16)[0] * 3.0)
    assert one["usage"] == 1 / 16 and one["unevenness"] == pytest.approx(math.log(16))
    mass = np.array([[0.5, 0.0, 2.0, 1.5], [0.0, 0.0, 1.0, 3.0]])     # [H, N]: the H * N experts of a layer
    got = peer.accumulated_metrics(mass)
    assert got["usage"] == 5 / 8 and got["unevenness"] == pytest.approx(np_accumulated(mass)[1], rel=1e-12)
    empty = peer.accumulated_metrics(np.zeros(4))
    assert empty["usage"] == 0.0 and math.isnan(empty["unevenness"])
    with pytest.raises(ValueError, match="finite values >= 0"):
        peer.accumulated_metrics(np.array([1.0, -1.0]))


def eval_corpus(tmp_path, config):
    """A small 'text' corpus evaluated whole (its train split as the eval split): a dozen batches of 4 x 32
    tokens, the last one padded."""
    import json
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "x", "(", ")", ":", "\n"]
    lines = [json.dumps({"text": " ".join(rng.choice(words, rng.integers(5, 40)))}) for _ in range(40)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    config.data.name, config.data.paths = "text", str(tmp_path / "docs.jsonl")
    config.data.data_dir, config.data.eval_split = str(tmp_path / "data_dir"), "train"


def test_evaluation_usage_and_unevenness_equal_brute_force_over_the_eval_set(tmp_path, monkeypatch):
    """evaluate() adds up each PEER layer's router score mass over the evaluation set's real tokens (the eval step
    returns it per batch) and reports the paper's usage and unevenness, per layer and their mean: equal to numpy
    over the layers' own top-k ids and gates, recorded from an eager forward of the same batches, for a shared pool
    ([N]) and a pool per head ([H, N]); the padding of the last batch does not count (each real token brings mass H:
    softmax gates). A model without PEER evaluates as before: no sums, no extra keys."""
    from grin_jax import data as data_lib
    from grin_jax.train import evaluate as ev
    config = presets.tiny("smoke", name="peer_eval")
    eval_corpus(tmp_path, config)
    config.model.layout = "peer,peer2"
    config.model.peer = dict(num_experts=32 ** 2, heads=2, top_k=4, d_key=16, chunk_tokens=None)
    config.model.peer2 = dict(kind="peer", num_experts=32 ** 2, heads=2, top_k=2, d_key=16, shared_experts=False,
                              chunk_tokens=None)
    model = models.model_config_from(config.model)
    graphdef, variables = models.init(model, 0)
    tokenizer = data_lib.make_tokenizer(config.data)
    result = ev.evaluate(jax.jit(trainer.make_eval_step(graphdef)), variables, config, tokenizer, max_batches=None,
                         keep_sums=True)

    recorded = []
    route = peer.PEERFFN.route

    def recording(self, x_TD, **kwargs):
        idx, gates = route(self, x_TD, **kwargs)
        recorded.append((np.asarray(idx), np.asarray(gates)))
        return idx, gates

    monkeypatch.setattr(peer.PEERFFN, "route", recording)
    masses = {"peer": np.zeros(32 ** 2), "peer2": np.zeros(2 * 32 ** 2)}
    real_tokens = padding = 0
    for batch in data_lib.eval_batches(config.data, batch_size=config.train.batch_size, tokenizer=tokenizer):
        recorded.clear()
        models.apply(graphdef, variables, jnp.asarray(batch["inputs"]), positions_BS=jnp.asarray(batch["positions"]),
                     segment_ids_BS=jnp.asarray(batch["segment_ids"]))
        real = batch["loss_mask"].reshape(-1) > 0
        real_tokens, padding = real_tokens + real.sum(), padding + (~real).sum()
        for name, (idx, gates) in zip(("peer", "peer2"), recorded):
            np.add.at(masses[name], idx[real].reshape(-1), gates[real].reshape(-1))
    assert padding > 0 and result["tokens"] == real_tokens
    sums = result["sums"]
    assert sums["peer/router_score_mass"].shape == (1, 32 ** 2)
    assert sums["peer2/router_score_mass"].shape == (1, 2, 32 ** 2)             # [L, H, N]: a pool per head
    for name, mass in masses.items():
        got = sums[f"{name}/router_score_mass"]
        np.testing.assert_allclose(got.reshape(-1), mass, rtol=1e-5, atol=1e-6)
        assert got.sum() == pytest.approx(2 * real_tokens, rel=1e-5)           # padding: no mass
        usage, unevenness = np_accumulated(mass)
        assert 0.05 < usage < 1                                                  # an informative case
        assert result[f"{name}/usage"] == pytest.approx(usage, abs=1e-12)
        assert result[f"{name}/unevenness"] == pytest.approx(unevenness, rel=1e-4)
        assert result[f"{name}/usage_per_layer"] == [result[f"{name}/usage"]]
        assert result[f"{name}/unevenness_per_layer"] == [result[f"{name}/unevenness"]]

    # a model without PEER: the eval step returns no sums and evaluate() exactly the keys it always had
    config.model.layout = "moe"
    graphdef, variables = models.init(models.model_config_from(config.model), 0)
    step = jax.jit(trainer.make_eval_step(graphdef))
    batch = next(iter(data_lib.eval_batches(config.data, batch_size=4, tokenizer=tokenizer)))
    nll, no_sums = step(variables, trainer._device_batch(batch))
    assert no_sums == {} and nll.shape == batch["inputs"].shape
    plain = ev.evaluate(step, variables, config, tokenizer, max_batches=2)
    assert sorted(plain) == ["bits_per_byte", "documents", "loss", "stderr", "tokens"]


def padded_batch(B, S, seed=0):
    """(a host batch of B rows of S random byte tokens with padding at the ends of rows 1 and 6, its loss mask)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((B, S), np.float32)
    mask[1, S - 6:] = 0.0
    mask[6, S // 3:] = 0.0
    batch = {"inputs": rng.integers(0, 256, (B, S)).astype(np.int32),
             "targets": rng.integers(0, 256, (B, S)).astype(np.int32), "loss_mask": mask,
             "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy(),
             "segment_ids": mask.astype(np.int32)}
    return batch, mask


def test_eval_step_score_mass_on_a_data_parallel_mesh_equals_one_device():
    """The eval step compiled for a data=4 mesh (trainer path: compile_eval_step, rows on 4 fake devices, padding in
    some) returns the router score mass of the global batch, replicated: equal to one device's."""
    from grin_jax import sharding
    config = peer_tiny("smoke")
    config.model.peer.update(num_experts=16 ** 2, heads=2, top_k=4, chunk_tokens=64)
    experiment = trainer.resolve(config, check_mesh=False)
    graphdef, variables = models.init(experiment.model, 0)
    B, S = 8, config.data.seq_len
    batch, mask = padded_batch(B, S)
    nll, sums = jax.jit(trainer.make_eval_step(graphdef))(variables, batch)
    mass = np.asarray(sums["peer/router_score_mass"])
    assert mass.shape == (1, 16 ** 2) and mass.sum() == pytest.approx(2 * mask.sum(), rel=1e-5)
    config.mesh.data, config.mesh.expert, config.mesh.model = 4, 1, 1
    mesh = sharding.make_mesh(config.mesh)
    _, abstract = models.abstract_init(experiment.model)
    shardings = sharding.named_shardings(abstract, mesh)
    placed = jax.device_put(variables, shardings)
    step = trainer.compile_eval_step(graphdef, placed, shardings, mesh, trainer.batch_spec(B, S))
    nll_mesh, sums_mesh = step(placed, jax.device_put(batch, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(nll_mesh), np.asarray(nll), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sums_mesh["peer/router_score_mass"]), mass, rtol=1e-5, atol=1e-5)


def test_value_experts_are_a_product_key_memory():
    """expert_type='value' (the PKM control): no w_in, y = sum over heads and slots of gate * v_idx, against numpy
    from the layer's own routing; half the expert parameters."""
    base = dict(d_model=16, num_experts=8 * 8, heads=2, top_k=3, d_key=8, query_norm="none", chunk_tokens=4)
    module = peer.PEERFFN(peer.PEERConfig(**base, expert_type="value"), rngs=nnx.Rngs(1))
    assert module.w_in is None
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))
    y, _ = module(x)
    idx, gates = module.route(x.reshape(10, 16))
    v = np.asarray(module.w_out[...], np.float64)[np.asarray(idx)]                 # [T, H, K, D]
    expected = np.einsum("thk,thkd->td", np.asarray(gates, np.float64), v).reshape(2, 5, 16)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)
    singleton = peer.PEERFFN.param_counts(peer.PEERConfig(**base))["peer_experts"]
    value = peer.PEERFFN.param_counts(peer.PEERConfig(**base, expert_type="value"))["peer_experts"]
    assert value == (singleton[0] // 2, singleton[1] // 2) == (64 * 16, 2 * 3 * 16)


@pytest.mark.parametrize("activation,shared_experts,update", [
    ("gelu", True, "dense"), ("relu", False, "dense"), ("silu", True, "sparse"), ("gelu", False, "sparse")])
def test_kernel_equals_the_xla_path(activation, shared_experts, update):
    """backend='kernel' (the C++ gather-and-contract) against backend='xla' (take-then-einsum): the output and every
    gradient (parameters, input, and with the row-sparse update the sinks' row gradients) to 1e-5; in dense mode its
    backward has no [T, H, K, D] array."""
    base = dict(d_model=16, num_experts=8 * 8, heads=2, top_k=3, d_key=8, query_norm="none", chunk_tokens=5,
                expert_activation=activation, shared_experts=shared_experts, table_update=update)
    x = jax.random.normal(jax.random.key(1), (2, 7, 16))
    cot = jax.random.normal(jax.random.key(2), (2, 7, 16))
    results = {}
    for backend in ("xla", "kernel"):
        module = peer.PEERFFN(peer.PEERConfig(**base, backend=backend), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(module)
        sinks = ({n: jnp.zeros(s.shape, s.dtype) for n, s in module.row_sink_shapes(14).items()}
                 if update == "sparse" else None)

        def f(state, x, sinks):
            y, _ = nnx.merge(graphdef, state)(x, row_sinks=sinks)
            return jnp.sum(y * cot)

        results[backend] = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(state, x, sinks)
        if backend == "kernel" and update == "dense":
            assert "f32[14,2,3,16]" not in str(jax.make_jaxpr(jax.grad(f))(state, x, sinks))
    (v_xla, g_xla), (v_kernel, g_kernel) = results["xla"], results["kernel"]
    assert abs(float(v_xla) - float(v_kernel)) < 1e-5
    leaves = jax.tree_util.tree_leaves_with_path(g_xla)
    assert len(leaves) == len(jax.tree.leaves(g_kernel)) >= 5
    for (path, a), b in zip(leaves, jax.tree.leaves(g_kernel)):
        scale = max(1.0, float(jnp.max(jnp.abs(a))))
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_kernel_backend_says_where_it_does_not_apply():
    """'auto' runs the kernel on one CPU device in float32 and XLA otherwise (a multi-device mesh, bfloat16, value
    experts); 'kernel' where it does not apply raises, naming the reason."""
    from grin_jax import sharding
    config = peer.PEERConfig(d_model=16, num_experts=8 * 8, heads=2, top_k=3, query_norm="none")
    assert config.backend == "auto" and peer.kernel_unavailable(config, jnp.float32) is None
    assert "bfloat16" in peer.kernel_unavailable(config, jnp.bfloat16)
    value = peer.PEERConfig(d_model=16, num_experts=8 * 8, heads=2, top_k=3, expert_type="value")
    assert "value" in peer.kernel_unavailable(value, jnp.float32)
    with jax.set_mesh(sharding.make_mesh({"data": 2, "expert": 2, "model": 2})):
        assert "mesh of 8 devices" in peer.kernel_unavailable(config, jnp.float32)
    module = peer.PEERFFN(dataclasses.replace(value, backend="kernel"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="peer.backend='kernel' cannot run this layer: expert_type='value'"):
        module(jnp.ones((1, 4, 16)))


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("key,value,match", [
    ("num_experts", 200, "perfect squares"), ("num_experts", 0, "perfect squares"),
    ("num_experts", True, "perfect squares"), ("heads", 0, "integers >= 1"), ("top_k", 17, "1..sqrt"),
    ("d_key", 7, "even integers"), ("score_activation", "sigmoid", "softmax"),
    ("expert_activation", "tanh", "gelu"), ("shared_keys", 1, "True or False"),
    ("query_norm", "layernorm", "batchnorm"), ("query_norm", None, "none"),
    ("bn_momentum", 1.0, "[0, 1)"), ("bn_momentum", -0.1, "[0, 1)"), ("bn_momentum", float("nan"), "finite"),
    ("bn_momentum", True, "finite"), ("bn_momentum", "0.9", "finite"), ("bn_epsilon", 0.0, "> 0"),
    ("bn_epsilon", -1e-5, "> 0"), ("bn_epsilon", float("inf"), "finite"),
    ("chunk_tokens", 0, "None"), ("chunk_tokens", 2.0, "None"), ("expert_type", "mlp", "singleton"),
    ("num_experts", 4097 ** 2, "4096**2"), ("backend", "triton", "'auto', 'xla', 'kernel'")])
def test_config_validation(key, value, match):
    with pytest.raises(ValueError, match=f"peer.{key}") as error:
        peer.PEERConfig(d_model=64, **{"num_experts": 16 ** 2, key: value})
    assert match in str(error.value)


def test_config_section_round_trip_and_defaults():
    c = peer.PEERConfig.from_section({"num_experts": 32 ** 2, "heads": 4}, d_model=64)
    assert (c.top_k, c.d_key, c.score_activation, c.shared_keys, c.shared_experts) == (16, 64, "softmax", True, True)
    assert (c.query_norm, c.bn_momentum, c.bn_epsilon) == ("batchnorm", 0.99, 1e-5)  # the paper's query BatchNorm
    assert peer.PEERConfig.from_section(c.to_section(), d_model=64) == c
    assert c.loss_weights == {}
    with pytest.raises(ValueError, match="peer: unknown key.*accepted keys"):
        peer.PEERConfig.from_section({"experts": 4}, d_model=64)


# ------------------------------------------------------------------------------------------------ in a model
def peer_tiny(arg=None):
    """configs/peer_tiny.py's get_config(arg)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("peer_tiny", os.path.join(os.path.dirname(__file__), "..",
                                                                             "configs", "peer_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_peer_tiny_config_builds():
    for arg, layout in [(None, ("moe", "peer", "peer", "moe")), ("smoke", ("moe", "peer"))]:
        model = models.model_config_from(peer_tiny(arg).model)
        assert model.layout == layout and model.section("peer").num_experts in (128 ** 2, 32 ** 2)
        assert model.section("peer").query_norm == "batchnorm"  # the paper's


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
    # the final evaluation's accumulated usage and unevenness: in its eval/ record and in summary.json
    import json
    evals = [r for r in (json.loads(line) for line in open(tmp_path / "metrics.jsonl")) if "eval/loss" in r]
    summary = json.load(open(tmp_path / "summary.json"))
    assert 0 < evals[-1]["eval/peer/usage"] <= 1 and evals[-1]["eval/peer/unevenness"] >= 0
    assert evals[-1]["eval/peer/usage_per_layer"] == [evals[-1]["eval/peer/usage"]]
    for name in ("usage", "unevenness", "usage_per_layer", "unevenness_per_layer"):
        assert summary[f"validation_peer/{name}"] == evals[-1][f"eval/peer/{name}"], name
    assert not any(key.startswith("eval/moe/") or key.startswith("validation_moe") for key in [*evals[-1], *summary])
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


# ------------------------------------------------------------------------------------------------ query BatchNorm
BN_D, BN_H, BN_Q, BN_N, BN_K = 16, 2, 8, 8 * 8, 3


def bn_module(momentum=0.9, seed=0):
    """A PEER layer with query BatchNorm whose scale and bias are not the identity."""
    config = peer.PEERConfig(d_model=BN_D, num_experts=BN_N, heads=BN_H, top_k=BN_K, d_key=BN_Q,
                             query_norm="batchnorm", bn_momentum=momentum, chunk_tokens=None)
    module = peer.PEERFFN(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 100)
    module.query_norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, (BN_H, BN_Q)), jnp.float32)
    module.query_norm.bias[...] = jnp.asarray(0.3 * rng.standard_normal((BN_H, BN_Q)), jnp.float32)
    return module


def bn_batch(seed=1, B=3, S=5):
    """x [B, S, D] (not zero-mean, not unit-variance) and a mask with padding at the ends of rows 0 and 2."""
    rng = np.random.default_rng(seed)
    x = (2.0 * rng.standard_normal((B, S, BN_D)) + 0.5).astype(np.float32)
    mask = np.ones((B, S), np.float32)
    mask[0, 3:] = 0.0
    mask[2, 1:] = 0.0
    return x, mask


def np_queries(module, x_BSD):
    """The heads' queries before the norm, float64 [T, H, Q]."""
    return np.einsum("td,dhq->thq", x_BSD.reshape(-1, BN_D).astype(np.float64),
                     np.asarray(module.w_query[...], np.float64))


def np_batchnorm(module, q, mean, var):
    bn = module.query_norm
    return ((q - mean) / np.sqrt(var + bn.epsilon) * np.asarray(bn.scale[...], np.float64)
            + np.asarray(bn.bias[...], np.float64))


def np_peer_output(module, x_BSD, q_norm):
    """The layer's output (numpy, float64) from normalised queries [T, H, Q]: brute-force top-k over all N product
    keys, softmax gates, exact-GELU singleton experts (shared keys and pool)."""
    from scipy.special import erf
    n, half = math.isqrt(BN_N), BN_Q // 2
    keys = np.asarray(module.sub_keys[...], np.float64)
    s1 = np.einsum("thq,nq->thn", q_norm[..., :half], keys[0])
    s2 = np.einsum("thq,nq->thn", q_norm[..., half:], keys[1])
    full = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:2], n * n)
    idx = np.argsort(-full, axis=-1, kind="stable")[..., :BN_K]
    top = np.take_along_axis(full, idx, axis=-1)
    gates = np.exp(top - top.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    x = x_BSD.reshape(-1, BN_D).astype(np.float64)
    u = np.asarray(module.w_in[...], np.float64)[idx]                        # [T, H, K, D]
    v = np.asarray(module.w_out[...], np.float64)[idx]
    a = np.einsum("td,thkd->thk", x, u)
    a = 0.5 * a * (1.0 + erf(a / np.sqrt(2.0)))
    return np.einsum("thk,thkd->td", a * gates, v).reshape(x_BSD.shape)


def running(module):
    return np.asarray(module.query_norm.mean[...]), np.asarray(module.query_norm.var[...])


def test_query_batchnorm_training_uses_masked_batch_statistics_and_the_momentum_rule():
    module = bn_module(momentum=0.9)
    x, mask = bn_batch()
    real = mask.reshape(-1) > 0
    q = np_queries(module, x)
    mean, var = q[real].mean(0), q[real].var(0)          # padding excluded; biased variance
    assert np.all(running(module)[0] == 0) and np.all(running(module)[1] == 1)   # initial running averages
    y, _ = module(jnp.asarray(x), training=True, token_mask_BS=jnp.asarray(mask))
    expected_q = np_batchnorm(module, q, mean, var)
    np.testing.assert_allclose(np.asarray(y), np_peer_output(module, x, expected_q), rtol=1e-4, atol=1e-5)
    run_mean, run_var = 0.1 * mean, 0.9 * 1.0 + 0.1 * var   # running = m * running + (1 - m) * batch, m = 0.9
    np.testing.assert_allclose(running(module)[0], run_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(running(module)[1], run_var, rtol=1e-5, atol=1e-6)

    # a second batch: the rule again, from the updated averages; queries() is what the layer normalises
    x2, mask2 = bn_batch(seed=2)
    q2 = np_queries(module, x2)
    real2 = mask2.reshape(-1) > 0
    got = module.queries(jnp.asarray(x2.reshape(-1, BN_D)), training=True, mask_T=jnp.asarray(mask2.reshape(-1)))
    np.testing.assert_allclose(np.asarray(got), np_batchnorm(module, q2, q2[real2].mean(0), q2[real2].var(0)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(running(module)[0], 0.9 * run_mean + 0.1 * q2[real2].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(running(module)[1], 0.9 * run_var + 0.1 * q2[real2].var(0), rtol=1e-5, atol=1e-6)

    # padding does not count: other values on the padding tokens change neither the real tokens' output nor the
    # running averages; without a mask they would
    outputs = []
    for fill in (None, 100.0, "no mask"):
        m = bn_module(momentum=0.9)
        xf = x.copy()
        if fill is not None:
            xf[mask == 0] = 100.0
        y, _ = m(jnp.asarray(xf), training=True, token_mask_BS=None if fill == "no mask" else jnp.asarray(mask))
        outputs.append((np.asarray(y)[mask > 0], running(m)))
    np.testing.assert_allclose(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outputs[1][1], outputs[0][1]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert np.max(np.abs(outputs[2][1][1] - outputs[0][1][1])) > 1.0

    # a batch of padding only leaves the running averages as they were
    before = running(module)
    module(jnp.asarray(x), training=True, token_mask_BS=jnp.zeros_like(jnp.asarray(mask)))
    for a, b in zip(running(module), before):
        np.testing.assert_array_equal(a, b)

    # the batch statistics are differentiated through (as in every BatchNorm): the sum of the normalised queries
    # over the real tokens is bias * count whatever x, so its gradient is 0 (it would not be with them constant)
    graphdef, state = nnx.split(module)
    mask_T = jnp.asarray(mask.reshape(-1))

    def total(x_TD, training):
        q = nnx.merge(graphdef, state, copy=True).queries(x_TD, training=training, mask_T=mask_T)
        return jnp.sum(mask_T[:, None, None] * q)

    x_TD = jnp.asarray(x.reshape(-1, BN_D))
    assert float(jnp.max(jnp.abs(jax.grad(total)(x_TD, True)))) < 1e-4
    assert float(jnp.max(jnp.abs(jax.grad(total)(x_TD, False)))) > 1e-2   # eval mode (fixed statistics): not 0


def test_query_batchnorm_eval_uses_the_running_averages():
    module = bn_module()
    rng = np.random.default_rng(5)
    run_mean = rng.standard_normal((BN_H, BN_Q)).astype(np.float32)
    run_var = rng.uniform(0.5, 3.0, (BN_H, BN_Q)).astype(np.float32)
    module.query_norm.mean[...] = jnp.asarray(run_mean)
    module.query_norm.var[...] = jnp.asarray(run_var)
    x, mask = bn_batch()
    q = np_queries(module, x)
    y_eval, _ = module(jnp.asarray(x), token_mask_BS=jnp.asarray(mask))   # training=False: the default
    expected = np_peer_output(module, x, np_batchnorm(module, q, run_mean, run_var))
    np.testing.assert_allclose(np.asarray(y_eval), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(running(module)[0], run_mean)           # eval updates nothing
    np.testing.assert_array_equal(running(module)[1], run_var)
    y_train, _ = module(jnp.asarray(x), training=True, token_mask_BS=jnp.asarray(mask))
    assert np.max(np.abs(np.asarray(y_train) - np.asarray(y_eval))) > 1e-2
    # a model's eval forward reads the running averages from its variables (models.apply, training=False)
    config = presets.tiny("smoke", name="peer_bn")
    config.model.layout = "peer"
    config.model.num_layers = 1
    config.model.peer = dict(num_experts=8 * 8, heads=2, top_k=3, d_key=16, chunk_tokens=None)
    graphdef, variables = models.init(models.model_config_from(config.model), 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 259)
    params, model_state = models.split_variables(variables)
    moved = jax.tree.map(lambda a: a + 0.5, model_state)
    base = models.apply(graphdef, variables, tokens)[0]
    shifted = models.apply(graphdef, models.join_variables(params, moved), tokens)[0]
    assert float(jnp.max(jnp.abs(base - shifted))) > 1e-4
    with pytest.raises(ValueError, match="running statistics"):
        models.apply(graphdef, params, tokens)    # the parameters alone are not the model


def test_running_statistics_are_train_state_not_parameters():
    """models.init holds the running statistics with the parameters; the train state keeps them apart under
    'model_state' (absent for a model without BatchNorm); the optimizer state has no copy of them; count_params
    counts the BatchNorm's scale and bias (as norms), not its running mean and variance."""
    config = peer_tiny("smoke")
    experiment = trainer.resolve(config, check_mesh=False)
    tx, _ = trainer.make_optimizer(config.train, experiment.model)
    _, abstract = trainer.abstract_state(experiment, tx)
    stats = models.flatten_params(abstract["model_state"])
    assert sorted(stats) == ["layers.1.mlp.query_norm.mean", "layers.1.mlp.query_norm.var"]
    params = models.flatten_params(abstract["params"])
    assert "layers.1.mlp.query_norm.scale" in params and not set(stats) & set(params)
    opt_paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(abstract["opt_state"])]
    assert any("query_norm" in p and "scale" in p for p in opt_paths)
    assert not any("query_norm" in p and ("'mean'" in p or "'var'" in p) for p in opt_paths)
    counts = _params.count_params(experiment.model)
    assert counts["total"] == sum(math.prod(a.shape) for a in params.values())
    H, Q = config.model.peer.heads, config.model.peer.d_key
    without = peer_tiny("smoke")
    without.model.peer.query_norm = "none"
    assert counts["norms"] - _params.count_params(models.model_config_from(without.model))["norms"] == 2 * H * Q
    _, abstract_none = trainer.abstract_state(trainer.resolve(without, check_mesh=False), tx)
    assert sorted(abstract_none) == ["opt_state", "params", "rng", "step"]   # as before BatchNorm existed


def test_peer_tiny_trains_and_checkpoints_its_running_statistics(tmp_path, monkeypatch):
    """configs/peer_tiny.py:smoke (query BatchNorm on) trained 2 steps by trainer.train: the running statistics move
    from their initial values, are saved with the state, and load_trained restores exactly the ones at the end of
    training; a resumed run continues from them as an uninterrupted one does."""
    from kind_checks import train_steps
    finals = []
    loop = trainer._loop

    def recording(*args, **kwargs):
        state, step = loop(*args, **kwargs)
        finals.append(jax.device_get(state))
        return state, step

    monkeypatch.setattr(trainer, "_loop", recording)
    last = train_steps(peer_tiny("smoke"), tmp_path / "run", steps=2)
    assert 0 < last["train/peer/usage"] <= 1
    final = finals[-1]
    end = models.flatten_params(final["model_state"])
    assert sorted(end) == ["layers.1.mlp.query_norm.mean", "layers.1.mlp.query_norm.var"]
    assert np.max(np.abs(end["layers.1.mlp.query_norm.mean"])) > 1e-4                 # not the initial 0
    assert np.max(np.abs(end["layers.1.mlp.query_norm.var"] - 1.0)) > 1e-4            # not the initial 1
    _, graphdef, variables, _ = trainer.load_trained(str(tmp_path / "run"))
    params, model_state = models.split_variables(variables)
    for name, value in models.flatten_params(model_state).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(end[name]), err_msg=name)
    for name, value in models.flatten_params(params).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(models.flatten_params(final["params"])[name]))
    tokens = models.generate(graphdef, variables, np.zeros((1, 2), np.int32), max_new_tokens=2)  # eval mode
    assert tokens.shape == (1, 4)

    # resumed (2 -> 3 steps in the same workdir) == uninterrupted 3 steps: the state's running statistics too
    config = peer_tiny("smoke")
    config.train.steps, config.train.eval_every, config.train.warmup_steps = 3, 0, 0
    config.train.checkpoint_every = 0
    trainer.train(config, str(tmp_path / "run"))
    train_steps(peer_tiny("smoke"), tmp_path / "straight", steps=3)
    resumed, straight = finals[-2], finals[-1]
    for name, value in models.flatten_params(resumed["model_state"]).items():
        np.testing.assert_allclose(value, models.flatten_params(straight["model_state"])[name], rtol=1e-5,
                                   atol=1e-6, err_msg=name)


def test_batchnorm_train_step_on_a_data_parallel_mesh_equals_one_device():
    """On a mesh with data=4 (the batch's rows on 4 fake devices, padding in some rows) the query BatchNorm's
    statistics are over the global batch (a reduction over a sharded axis is global under SPMD): the loss, the
    gradients and the updated running statistics equal one device's, and the compiled train step returns those
    statistics in its new state. bn_momentum=0: the running statistics are the batch statistics themselves."""
    from grin_jax import sharding
    from grin_jax.train import step as step_module
    config = peer_tiny("smoke")
    config.model.peer.update(num_experts=16 ** 2, heads=2, top_k=4, chunk_tokens=64, bn_momentum=0.0)
    experiment = trainer.resolve(config, check_mesh=False)
    tx, _ = trainer.make_optimizer(config.train, experiment.model)
    graphdef, state = trainer.init_state(experiment, tx)
    B, S = 8, config.data.seq_len
    batch, mask = padded_batch(B, S)
    loss_fn = step_module.make_loss_fn(graphdef)
    key = jax.random.fold_in(state["rng"], state["step"])   # the train step's key (MoE input jitter)

    def loss_grads_stats(params, model_state, batch):
        (total, (ce, _, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key,
                                                                                       model_state)
        return total, ce, grads, new_stats

    ref = jax.jit(loss_grads_stats)(state["params"], state["model_state"], batch)

    config.mesh.data, config.mesh.expert, config.mesh.model = 4, 1, 1
    mesh = sharding.make_mesh(config.mesh)
    shardings = trainer.state_shardings(experiment, tx, mesh)
    placed = jax.device_put(state, shardings)
    sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
    assert sharded["inputs"].sharding.shard_shape((B, S)) == (B // 4, S)
    with jax.set_mesh(mesh):
        got = jax.jit(loss_grads_stats)(placed["params"], placed["model_state"], sharded)
    for a, b in zip(ref[:2], got[:2]):
        assert abs(float(a) - float(b)) < 1e-5
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref[2]), jax.tree.leaves(got[2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=jax.tree_util.keystr(path))
    stats_ref, stats_mesh = models.flatten_params(ref[3]), models.flatten_params(got[3])
    assert np.max(np.abs(stats_ref["layers.1.mlp.query_norm.var"] - 1.0)) > 1e-2    # moved (momentum 0)
    for name in stats_ref:
        np.testing.assert_allclose(np.asarray(stats_mesh[name]), np.asarray(stats_ref[name]), rtol=1e-5, atol=1e-5)

    step = trainer.compile_train_step(graphdef, tx, placed, shardings, mesh, sharded)
    new_state, metrics = step(placed, sharded)
    assert abs(float(metrics["loss"]) - float(ref[1])) < 1e-5
    for name, value in models.flatten_params(new_state["model_state"]).items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(stats_ref[name]), rtol=1e-5, atol=1e-5)
