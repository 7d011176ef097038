"""Dispatch backends (grin_jax/moe/dispatch.py) and grouped matmuls (gmm.py) against dense references.

Every backend in `dispatch.BACKENDS` must equal the `dense` reference (every expert on every token, then a weighted
sum) in the output and in the gradients w.r.t. the tokens, the combine weights and every expert weight, under
`jax.jit`, for balanced loads and skewed loads (experts with no tokens, groups longer than a tile). The tests
go through the registries' names so they cover whatever backends exist ('kernel' only where it can be built:
without a C++ compiler it is left out and 'auto' runs 'tiled').

Axes: T tokens, D model, F expert hidden, E experts, K slots, M = T*K rows.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grin_jax.moe import cpu_kernel, dispatch, experts, gmm

T, K, D, F, E = 256, 2, 16, 32, 8
ACTIVATIONS = ("swiglu", "gelu", "relu")
TOL = dict(rtol=2e-5, atol=2e-5)


def runnable_backends() -> tuple[str, ...]:
    """dispatch.BACKENDS, less 'kernel' where the C++ kernel cannot be built (no compiler, $GRIN_JAX_KERNEL=0)."""
    return tuple(b for b in dispatch.BACKENDS if b != "kernel" or cpu_kernel.available())


def make_params(activation, seed=0):
    return experts.init_expert_params(jax.random.key(seed), num_experts=E, d_model=D, d_hidden=F,
                                      activation=activation)


def balanced_ids(rs):
    """Every expert gets exactly T*K/E rows; the K experts of a token are distinct."""
    ids = (np.arange(T)[:, None] + np.array([0, 3])[None, :]) % E
    return ids[rs.permutation(T)].astype(np.int32)


def skewed_ids(rs):
    """Experts 0, 5 and 7 (first and last included) get no rows; expert 3 gets about 40 % of them (> 128 rows)."""
    p = np.array([0, 0.05, 0.05, 0.7, 0.1, 0, 0.1, 0])
    first = rs.choice(E, size=T, p=p)
    second = np.array([rs.choice(E, p=np.where(np.arange(E) == f, 0, p) / (1 - p[f])) for f in first])
    ids = np.stack([first, second], -1).astype(np.int32)
    counts = np.bincount(ids.ravel(), minlength=E)
    assert counts[0] == counts[5] == counts[7] == 0 and counts.max() > 128
    return ids


def make_inputs(load, seed=0):
    rs = np.random.RandomState(seed)
    ids = balanced_ids(rs) if load == "balanced" else skewed_ids(rs)
    x = rs.randn(T, D).astype(np.float32)
    w = rs.rand(T, K).astype(np.float32)
    cot = rs.randn(T, D).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), jnp.asarray(cot)


def _value_and_grads(params, x, ids, w, cot, *, activation, backend, capacity_factor=1.25):
    """y, metrics and the gradients of sum(y * cot) w.r.t. (expert params, x, weights)."""
    def loss(params, x, w):
        y, metrics = dispatch.moe_ffn(params, x, ids, w, activation=activation, backend=backend,
                                      capacity_factor=capacity_factor)
        return jnp.sum(y * cot), (y, metrics)
    grads, (y, metrics) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, w)
    return y, metrics, grads


value_and_grads = jax.jit(_value_and_grads, static_argnames=("activation", "backend", "capacity_factor"))


@functools.partial(jax.jit, static_argnames="activation")
def all_backends_value_and_grads(params, x, ids, w, cot, *, activation):
    """{backend: (y, metrics, grads)} for every backend in one compilation (capacity: C = M, nothing dropped)."""
    return {backend: _value_and_grads(params, x, ids, w, cot, activation=activation, backend=backend,
                                      capacity_factor=float(E))
            for backend in runnable_backends()}


def assert_trees_close(actual, desired, what, **tol):
    tol = tol or TOL
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    flat_d, tree_d = jax.tree_util.tree_flatten_with_path(desired)
    assert tree_a == tree_d
    for (path, a), (_, d) in zip(flat_a, flat_d):
        np.testing.assert_allclose(np.asarray(a), np.asarray(d), err_msg=f"{what}{jax.tree_util.keystr(path)}",
                                   **tol)


def test_registry():
    assert dispatch.BACKENDS[0] == "dense" and "capacity" in dispatch.BACKENDS
    assert set(gmm.GMM_BACKENDS) <= set(dispatch.BACKENDS)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_backend_equals_dense(activation):
    """Every backend (capacity with a factor large enough that nothing overflows: C = M >= any load) equals dense
    in y and in the gradients w.r.t. x, the combine weights and every expert weight, under jit."""
    params = make_params(activation)
    for load in ("balanced", "skewed"):
        x, ids, w, cot = make_inputs(load)
        results = all_backends_value_and_grads(params, x, ids, w, cot, activation=activation)
        y_ref, _, grads_ref = results["dense"]
        assert np.abs(np.asarray(y_ref)).mean() > 0.05
        for backend in runnable_backends():
            y, metrics, grads = results[backend]
            where = f"{backend}/{activation}/{load}: "
            np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), err_msg=where + "y", **TOL)
            assert_trees_close(grads, grads_ref, where + "grad")
            assert float(metrics["dropped_fraction"]) == 0.0, where
            # Non-vacuous: unused experts get exactly zero gradient, used ones do not.
            counts = np.bincount(np.asarray(ids).ravel(), minlength=E)
            g_down = np.abs(np.asarray(grads[0]["w_down"])).sum(axis=(1, 2))
            np.testing.assert_array_equal(g_down == 0, counts == 0, err_msg=where)


def dense_reference_np(params, x, ids, w, activation):
    """NumPy: y[t] = sum_k w[t,k] * Expert_{ids[t,k]}(x[t]) with a per-token loop (checks `dense` itself)."""
    act = {"swiglu": lambda a: a / (1 + np.exp(-a)), "relu": lambda a: np.maximum(a, 0)}[activation]
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    y = np.zeros((x.shape[0], D))
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[t, k]
            up = x[t] @ p["w_up"][e]
            h = act(x[t] @ p["w_gate"][e]) * up if "w_gate" in p else act(up)
            y[t] += w[t, k] * (h @ p["w_down"][e])
    return y


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_dense_matches_numpy_loop(activation):
    params = make_params(activation, seed=1)
    x, ids, w, cot = make_inputs("skewed", seed=1)
    y, _, _ = value_and_grads(params, x, ids, w, cot, activation=activation, backend="dense")
    y_np = dense_reference_np(params, np.asarray(x, np.float64), np.asarray(ids), np.asarray(w, np.float64),
                              activation)
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-5, atol=1e-5)


def capacity_kept_np(ids, capacity, slot_major=True):
    """Brute force: walk token-slots in priority order (all slot-1 rows in token order, then slot 2, ...)
    and keep a row while its expert has fewer than `capacity` rows."""
    filled = np.zeros(E, int)
    kept = np.zeros(ids.shape, bool)
    order = [(t, k) for k in range(ids.shape[1]) for t in range(ids.shape[0])]
    if not slot_major:
        order.sort()
    for t, k in order:
        if filled[ids[t, k]] < capacity:
            filled[ids[t, k]] += 1
            kept[t, k] = True
    return kept


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_capacity_drops_exactly_the_overflow(capacity_factor):
    activation = "swiglu"
    params = make_params(activation, seed=2)
    x, ids, w, cot = make_inputs("skewed", seed=2)
    capacity = math.ceil(capacity_factor * T * K / E)
    kept = capacity_kept_np(np.asarray(ids), capacity)
    assert 0.1 < 1 - kept.mean() < 0.9
    # Non-vacuous: token-major priority would keep a different set of rows.
    assert np.any(capacity_kept_np(np.asarray(ids), capacity, slot_major=False) != kept)
    y, metrics, (g_params, g_x, g_w) = value_and_grads(params, x, ids, w, cot, activation=activation,
                                                       backend="capacity", capacity_factor=capacity_factor)
    assert int(metrics["capacity"]) == capacity
    np.testing.assert_allclose(float(metrics["dropped_fraction"]), 1 - kept.mean(), rtol=0, atol=1e-7)
    # Dropped rows contribute nothing: the result is `dense` with their weights set to zero.
    w_kept = jnp.where(jnp.asarray(kept), w, 0.0)
    y_ref, _, (gp_ref, gx_ref, gw_ref) = value_and_grads(params, x, ids, w_kept, cot, activation=activation,
                                                         backend="dense")
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **TOL)
    assert_trees_close((g_params, g_x), (gp_ref, gx_ref), "capacity grad")
    np.testing.assert_allclose(np.asarray(g_w)[kept], np.asarray(gw_ref)[kept], **TOL)
    assert np.all(np.asarray(g_w)[~kept] == 0)


# ----------------------------------------------------------------------------------------------------------------
# Grouped matmul backends against gmm.reference_gmm (and the reference against NumPy)
# ----------------------------------------------------------------------------------------------------------------

GMM_M, GMM_K, GMM_N, GMM_E = 200, 16, 24, 6
GROUP_SIZES = [
    [0, 5, 0, 150, 3, 0],      # zeros (first and last), one group longer than a 128-row tile, sum 158 < M
    [200, 0, 0, 0, 0, 0],      # everything in the first group, sum == M
    [0, 0, 0, 0, 0, 0],        # nothing: all rows are past the end
    [33, 33, 34, 33, 33, 34],  # balanced, sum == M
    [0, 0, 0, 0, 1, 100],      # only the last groups, sum < M
]


def gmm_np(lhs, rhs, sizes):
    out = np.zeros((lhs.shape[0], rhs.shape[-1]))
    start = 0
    for e, size in enumerate(sizes):
        out[start:start + size] = lhs[start:start + size] @ rhs[e]
        start += size
    return out


@functools.partial(jax.jit, static_argnames="name")
def gmm_value_and_grads(lhs, rhs, sizes, cot, *, name):
    fn = gmm.reference_gmm if name == "reference" else gmm.GMM_BACKENDS[name]
    out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
    return out, vjp(cot)


@pytest.mark.parametrize("name", ["reference"] + sorted(gmm.GMM_BACKENDS))
def test_gmm_backend_equals_reference(name):
    rs = np.random.RandomState(0)
    lhs = rs.randn(GMM_M, GMM_K).astype(np.float32)
    rhs = rs.randn(GMM_E, GMM_K, GMM_N).astype(np.float32)
    cot = rs.randn(GMM_M, GMM_N).astype(np.float32)
    for sizes in GROUP_SIZES:
        sizes_arr = jnp.asarray(sizes, jnp.int32)
        out, (d_lhs, d_rhs) = gmm_value_and_grads(lhs, rhs, sizes_arr, cot, name=name)
        where = f"{name}, group_sizes={sizes}"
        # Exact expectations in NumPy (float64): rows past sum(sizes) are zero and get zero gradient.
        out_np = gmm_np(lhs.astype(np.float64), rhs.astype(np.float64), sizes)
        np.testing.assert_allclose(np.asarray(out), out_np, rtol=1e-5, atol=1e-4, err_msg=where)
        used = sum(sizes)
        assert np.all(np.asarray(out)[used:] == 0) and np.all(np.asarray(d_lhs)[used:] == 0), where
        if name != "reference":
            out_r, (d_lhs_r, d_rhs_r) = gmm_value_and_grads(lhs, rhs, sizes_arr, cot, name="reference")
            np.testing.assert_allclose(np.asarray(out), np.asarray(out_r), rtol=1e-5, atol=1e-4, err_msg=where)
            np.testing.assert_allclose(np.asarray(d_lhs), np.asarray(d_lhs_r), rtol=1e-5, atol=1e-4,
                                       err_msg=where + " d_lhs")
            np.testing.assert_allclose(np.asarray(d_rhs), np.asarray(d_rhs_r), rtol=1e-5, atol=1e-4,
                                       err_msg=where + " d_rhs")
        # d_rhs[e] = lhs_e^T cot_e; empty groups get zero.
        starts = np.cumsum([0] + sizes[:-1])
        for e, (s, n) in enumerate(zip(starts, sizes)):
            expect = lhs[s:s + n].astype(np.float64).T @ cot[s:s + n].astype(np.float64)
            np.testing.assert_allclose(np.asarray(d_rhs)[e], expect, rtol=1e-5, atol=1e-4, err_msg=where)


# ----------------------------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------------------------

def test_bad_arguments_raise_value_error():
    params = make_params("swiglu")
    x, ids, w, _ = make_inputs("balanced")
    with pytest.raises(ValueError, match=r"backend='nope'.*accepted values.*dense"):
        dispatch.moe_ffn(params, x, ids, w, backend="nope")
    with pytest.raises(ValueError, match=r"activation='tanh'.*accepted values.*swiglu"):
        dispatch.moe_ffn(params, x, ids, w, activation="tanh")
    with pytest.raises(ValueError, match=r"activation='relu'.*must have keys"):
        dispatch.moe_ffn(params, x, ids, w, activation="relu")  # gated params for a plain activation
    with pytest.raises(ValueError, match=r"x must be \[tokens, d_model=16\]"):
        dispatch.moe_ffn(params, x[:, :8], ids, w)
    with pytest.raises(ValueError, match=r"expert_ids .* and weights .* must both be"):
        dispatch.moe_ffn(params, x, ids, w[:, :1])
    with pytest.raises(ValueError, match=r"expert_ids .* and weights .* must both be"):
        dispatch.moe_ffn(params, x, ids[:-1], w[:-1])
    bad = dict(params, w_down=params["w_down"][:, :, :8])
    with pytest.raises(ValueError, match=r"w_down has shape"):
        dispatch.moe_ffn(bad, x, ids, w)
    bad = dict(params, w_gate=params["w_gate"][:4])
    with pytest.raises(ValueError, match=r"w_gate has shape"):
        dispatch.moe_ffn(bad, x, ids, w)
    with pytest.raises(ValueError, match=r"capacity_factor=0.*accepted values are > 0"):
        dispatch.moe_ffn(params, x, ids, w, backend="capacity", capacity_factor=0)
    with pytest.raises(ValueError, match=r"activation='tanh'.*accepted values"):
        experts.init_expert_params(jax.random.key(0), num_experts=E, d_model=D, d_hidden=F, activation="tanh")
