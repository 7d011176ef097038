"""Auxiliary losses (grin_jax/moe/losses.py) against NumPy brute force, and the global load-balance loss inside
`jax.shard_map` over 8 fake CPU devices (tests/conftest.py) against the loss on the full batch.

Axes: T tokens, E experts, K slots.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from grin_jax.moe import losses

T, E, K = 256, 8, 2

# jitted entry points (one compilation per shape instead of op-by-op dispatch)
load_balance = jax.jit(losses.load_balance_loss, static_argnames=("num_groups", "axis_name"))
load_balance_grad = jax.jit(jax.grad(losses.load_balance_loss, argnums=1))
z_loss, z_loss_grad = jax.jit(losses.router_z_loss), jax.jit(jax.grad(losses.router_z_loss))
mi_loss, mi_loss_grad = jax.jit(losses.mutual_information_loss), jax.jit(jax.grad(losses.mutual_information_loss))


def random_routing(seed, skew=True):
    rs = np.random.RandomState(seed)
    logits = (rs.randn(T, E) * 2 + (np.linspace(0, 2, E) if skew else 0)).astype(np.float32)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    ids = np.argsort(-logits + rs.randn(T, E), axis=-1)[:, :K].astype(np.int32)
    return ids, probs, logits


def load_balance_np(ids, probs):
    """Switch: E * sum_i f_i P_i, f_i = fraction of token-slots sent to i, P_i = mean router probability of i."""
    num_experts = probs.shape[-1]
    f = np.array([np.sum(ids == i) for i in range(num_experts)], np.float64) / ids.size
    return num_experts * np.sum(f * probs.astype(np.float64).mean(0))


def entropy_np(p):
    p = p.astype(np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)


def test_load_balance_equals_numpy():
    for seed in range(3):
        ids, probs, _ = random_routing(seed)
        value = float(load_balance(jnp.asarray(ids), jnp.asarray(probs)))
        np.testing.assert_allclose(value, load_balance_np(ids, probs), rtol=1e-6)
        assert value > 1.05  # skewed routing is penalised


def test_load_balance_is_one_when_balanced():
    ids = ((np.arange(T)[:, None] + np.arange(K)[None]) % E).astype(np.int32)
    probs = np.full((T, E), 1 / E, np.float32)
    assert np.all(np.bincount(ids.ravel(), minlength=E) == T * K // E)
    np.testing.assert_allclose(float(load_balance(jnp.asarray(ids), jnp.asarray(probs))), 1.0,
                               rtol=1e-6)
    # Balanced dispatch but any probs: still 1 (sum_i P_i = 1, f_i = 1/E).
    _, probs, _ = random_routing(0)
    np.testing.assert_allclose(float(load_balance(jnp.asarray(ids), jnp.asarray(probs))), 1.0,
                               rtol=1e-6)


def test_load_balance_gradient_only_through_probs():
    """d/dprobs[t, i] = E * f_i / T (f has no gradient)."""
    ids, probs, _ = random_routing(1)
    grad = load_balance_grad(jnp.asarray(ids), jnp.asarray(probs))
    f = np.bincount(ids.ravel(), minlength=E) / ids.size
    np.testing.assert_allclose(np.asarray(grad), np.broadcast_to(E * f / T, (T, E)), rtol=1e-6)


@pytest.mark.parametrize("num_groups", [2, 8])
def test_local_load_balance_is_mean_of_group_losses(num_groups):
    ids, probs, _ = random_routing(2)
    value = float(load_balance(jnp.asarray(ids), jnp.asarray(probs), num_groups=num_groups))
    groups = np.split(np.arange(T), num_groups)
    expect = np.mean([load_balance_np(ids[g], probs[g]) for g in groups])
    np.testing.assert_allclose(value, expect, rtol=1e-6)
    # Local differs from global on skewed shards (the test can tell them apart).
    assert abs(value - load_balance_np(ids, probs)) > 1e-3


def test_load_balance_bad_num_groups():
    ids, probs, _ = random_routing(0)
    for bad in (0, 3):
        with pytest.raises(ValueError, match=f"num_groups={bad}.*divide"):
            losses.load_balance_loss(jnp.asarray(ids), jnp.asarray(probs), num_groups=bad)


def sharded_routing():
    """Routing whose 8 data shards have very different loads (so global != local balance)."""
    ids, probs, logits = random_routing(3)
    order = np.argsort(ids[:, 0], kind="stable")  # shard s holds mostly tokens routed to low/high experts
    return ids[order], probs[order], logits[order]


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_global_load_balance_in_shard_map(axis_type):
    """Inside shard_map over 8 devices with axis_name='data', the loss (and its gradient w.r.t. the
    probabilities) equals the loss on the full batch; without axis_name it is the per-shard (local) loss."""
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    ids, probs, logits = sharded_routing()

    def per_shard(ids, probs, logits):
        global_lb, global_grad = jax.value_and_grad(
            lambda p: losses.load_balance_loss(ids, p, axis_name="data"))(probs)
        local_lb = losses.load_balance_loss(ids, probs)
        z = losses.router_z_loss(logits, axis_name="data")
        return global_lb, global_grad, jax.lax.pmean(local_lb, "data"), z

    fn = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("data"), P("data"), P("data")),
                               out_specs=(P(), P("data"), P(), P())))
    with jax.set_mesh(mesh):
        args = [jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("data"))) for a in (ids, probs, logits)]
        global_lb, global_grad, local_lb, z = fn(*args)
        assert global_grad.sharding.spec[0] == "data"
    full_lb = load_balance(jnp.asarray(ids), jnp.asarray(probs))
    full_grad = load_balance_grad(jnp.asarray(ids), jnp.asarray(probs))
    np.testing.assert_allclose(float(global_lb), load_balance_np(ids, probs), rtol=1e-6)
    np.testing.assert_allclose(float(global_lb), float(full_lb), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(global_grad), np.asarray(full_grad), rtol=1e-6)
    groups = np.split(np.arange(T), 8)
    np.testing.assert_allclose(float(local_lb), np.mean([load_balance_np(ids[g], probs[g]) for g in groups]),
                               rtol=1e-6)
    assert float(local_lb) > float(global_lb) + 0.5  # the shards are unbalanced: local and global differ a lot
    lse = np.log(np.sum(np.exp(logits.astype(np.float64)), -1))
    np.testing.assert_allclose(float(z), np.mean(lse ** 2), rtol=1e-5)


def test_router_z_loss_equals_numpy():
    _, _, logits = random_routing(4)
    logits = logits * 10 + 30  # large values: needs a stable logsumexp
    lse = np.log(np.sum(np.exp(logits.astype(np.float64) - 30), -1)) + 30
    np.testing.assert_allclose(float(z_loss(jnp.asarray(logits))), np.mean(lse ** 2), rtol=1e-5)
    # gradient: 2 * lse * softmax / T
    grad = z_loss_grad(jnp.asarray(logits))
    sm = np.exp(logits.astype(np.float64) - lse[:, None])
    np.testing.assert_allclose(np.asarray(grad), 2 * lse[:, None] * sm / T, rtol=1e-4, atol=1e-7)


def test_mutual_information_loss_equals_numpy():
    _, probs, _ = random_routing(5)
    probs[:3] = np.eye(E, dtype=np.float32)[:3]  # exact zeros: 0 log 0 = 0
    expect = -entropy_np(probs.astype(np.float64).mean(0)) + entropy_np(probs).mean()
    np.testing.assert_allclose(float(mi_loss(jnp.asarray(probs))), expect, rtol=1e-5,
                               atol=1e-6)
    # Bounds: -log E for confident, balanced routing; 0 for identical rows.
    confident = np.eye(E, dtype=np.float32)[np.arange(T) % E]
    np.testing.assert_allclose(float(mi_loss(jnp.asarray(confident))), -np.log(E),
                               rtol=1e-6)
    same = np.broadcast_to(probs[5], (T, E))
    np.testing.assert_allclose(float(mi_loss(jnp.asarray(same))), 0.0, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(mi_loss_grad(jnp.asarray(probs)))))


def test_routing_metrics_equal_numpy():
    ids, probs, _ = random_routing(6)
    m = jax.jit(losses.routing_metrics)(jnp.asarray(ids), jnp.asarray(probs))
    load = np.bincount(ids.ravel(), minlength=E) / ids.size
    np.testing.assert_allclose(np.asarray(m["expert_load"]), load, rtol=1e-6)
    np.testing.assert_allclose(float(m["max_load"]), load.max() * E, rtol=1e-6)
    np.testing.assert_allclose(float(m["router_entropy"]), entropy_np(probs).mean(), rtol=1e-5)
