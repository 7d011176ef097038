"""Grouped matmul and the fused tiled expert MLP (grin_jax/moe/gmm.py).

The CPU backend must be exact: `gmm.tiled_gmm` equals `gmm.reference_gmm` and `jax.lax.ragged_dot` in values and
in the gradients w.r.t. lhs and rhs (group sizes with zeros, one group holding everything, sum < M, groups longer
than the largest tile, several tile levels); the dispatch backend 'tiled' (`gmm.tiled_expert_mlp`) equals 'dense'
in values and gradients at reduced-size versions of the benchmark shapes. No test here times anything.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grin_jax.moe import cpu_kernel, dispatch, experts, gmm
from grin_jax.moe.layer import MoEConfig

M, K_IN, N_OUT, E = 300, 16, 12, 6
GROUP_SIZES = [
    [0, 40, 0, 200, 7, 0],      # zeros (first and last), a group longer than the largest tile, sum 247 < M
    [300, 0, 0, 0, 0, 0],       # everything in the first group
    [0, 0, 0, 0, 0, 300],       # everything in the last group
    [0, 0, 0, 0, 0, 0],         # nothing: every row is past the end
    [50, 50, 50, 50, 50, 50],   # balanced, sum == M
    [1, 63, 64, 65, 2, 17],     # around the tile boundaries, sum 212 < M
]
TILE_SIZES = [None, (128, 32, 4), (1,)]  # None: default_tile_sizes(300, 6) = (32, 8)


def _gmm_value_and_grads(fn, lhs, rhs, sizes, cot):
    out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
    return (out,) + vjp(cot)


_reference = jax.jit(lambda a, b, s, c: _gmm_value_and_grads(gmm.reference_gmm, a, b, s, c))
_ragged = jax.jit(lambda a, b, s, c: _gmm_value_and_grads(gmm.ragged_dot_gmm, a, b, s, c))
_plan = jax.jit(gmm.plan_tiles, static_argnums=(3,))


@pytest.fixture(scope="module")
def gmm_inputs():
    rs = np.random.RandomState(0)
    return (jnp.asarray(rs.randn(M, K_IN), jnp.float32), jnp.asarray(rs.randn(E, K_IN, N_OUT), jnp.float32),
            jnp.asarray(rs.randn(M, N_OUT), jnp.float32))


@pytest.mark.parametrize("tile_sizes", TILE_SIZES)
def test_tiled_gmm_equals_reference_and_ragged_dot(gmm_inputs, tile_sizes):
    lhs, rhs, cot = gmm_inputs
    tiled = jax.jit(lambda a, b, s, c: _gmm_value_and_grads(
        lambda x, w, g: gmm.tiled_gmm(x, w, g, tile_sizes=tile_sizes), a, b, s, c))
    for sizes in GROUP_SIZES:
        sizes_arr = jnp.asarray(sizes, jnp.int32)
        got = tiled(lhs, rhs, sizes_arr, cot)
        for name, want in (("reference", _reference(lhs, rhs, sizes_arr, cot)),
                           ("ragged_dot", _ragged(lhs, rhs, sizes_arr, cot))):
            for what, a, b in zip(("out", "d_lhs", "d_rhs"), got, want):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4,
                                           err_msg=f"{what} vs {name}, sizes={sizes}, tile_sizes={tile_sizes}")
        used = sum(sizes)  # rows past the sum: zero output and zero gradient, exactly
        assert np.all(np.asarray(got[0])[used:] == 0) and np.all(np.asarray(got[1])[used:] == 0)
        empty = np.asarray(sizes) == 0  # empty groups: exactly zero weight gradient
        assert np.all(np.asarray(got[2])[empty] == 0)


def test_plan_tiles_covers_every_row_once_within_the_static_bounds():
    """For adversarial group sizes: each valid row lands in exactly one tile of its own group, padding rows
    point past the end, and the tiles in use fit the static per-level bounds."""
    rs = np.random.RandomState(1)
    num_rows, num_groups = 1000, 7
    cases = [[1000, 0, 0, 0, 0, 0, 0], [0] * 7, [142] * 7, [63, 64, 65, 127, 128, 129, 0]]
    cases += [list(rs.multinomial(rs.randint(0, num_rows + 1), rs.dirichlet(np.ones(num_groups) * 0.3)))
              for _ in range(8)]
    for tile_sizes, sizes in itertools.product([(256, 32), (128, 16, 4), (512, 64, 8, 1)], cases):
        sizes = np.asarray(sizes, np.int32)
        ends = np.cumsum(sizes)
        row = np.arange(num_rows)
        group = np.minimum(np.searchsorted(ends, row, side="right"), num_groups - 1)
        rank = row - (ends - sizes)[group]
        plan = _plan(jnp.asarray(sizes), jnp.asarray(group, jnp.int32), jnp.asarray(rank, jnp.int32),
                              tile_sizes, valid_M=jnp.asarray(row < ends[-1]))
        src = np.asarray(plan.src_P)
        assert src.shape == (gmm.padded_rows(num_rows, num_groups, tile_sizes),)
        counts = np.asarray(plan.counts)
        bounds = gmm.level_bounds(num_rows, num_groups, tile_sizes)
        assert np.all(counts <= bounds), (tile_sizes, sizes, counts, bounds)
        seen = []
        for level, t in enumerate(tile_sizes):
            for j in range(counts[level]):
                start, g = int(plan.starts[level][j]), int(plan.groups[level][j])
                assert start + t <= src.shape[0]
                rows = src[start:start + t]
                rows = rows[rows < num_rows]
                assert np.all(group[rows] == g)
                seen.extend(rows.tolist())
        assert sorted(seen) == list(range(int(ends[-1]))), (tile_sizes, sizes)


def test_slot_ranks_counting_equals_sort(monkeypatch):
    rs = np.random.RandomState(2)
    ids = jnp.asarray(rs.randint(0, 5, size=(64, 3)), jnp.int32)  # repeats within a token included
    sizes_count, ranks_count = jax.jit(gmm.slot_ranks, static_argnums=1)(ids, 5)
    monkeypatch.setattr(gmm, "COUNTING_MAX_ELEMENTS", 0)
    sizes_sort, ranks_sort = jax.jit(gmm.slot_ranks, static_argnums=1)(ids, 5)
    np.testing.assert_array_equal(sizes_count, sizes_sort)
    np.testing.assert_array_equal(ranks_count, ranks_sort)
    np.testing.assert_array_equal(sizes_count, np.bincount(np.asarray(ids).ravel(), minlength=5))
    # ranks within each expert are 0..n-1 in slot order
    flat_ids, flat_ranks = np.asarray(ids).ravel(), np.asarray(ranks_count).ravel()
    for e in range(5):
        np.testing.assert_array_equal(flat_ranks[flat_ids == e], np.arange(np.sum(flat_ids == e)))


# ---------------------------------------------------------------------------------------------------------------
# The fused dispatch backends ('tiled', 'kernel') against 'dense' at reduced benchmark shapes
# ---------------------------------------------------------------------------------------------------------------

def _skewed_ids(rs, tokens, num_experts, top_k):
    p = 1.0 / (np.arange(num_experts) + 1.0) ** 1.2
    p[num_experts // 2] = 0.0  # one expert without tokens
    p /= p.sum()
    return np.stack([rs.choice(num_experts, size=top_k, replace=False, p=p) for _ in range(tokens)]).astype(np.int32)


def _moe_value_and_grads(backend, activation):
    def loss(params, x, ids, w, cot):
        y, _ = dispatch.moe_ffn(params, x, ids, w, activation=activation, backend=backend)
        return jnp.vdot(y, cot), y
    return jax.jit(lambda *a: jax.grad(loss, argnums=(0, 1, 3), has_aux=True)(*a))


@pytest.mark.parametrize("backend", ["tiled", "kernel"])
@pytest.mark.parametrize("num_experts,top_k,d_hidden", [(8, 2, 8), (64, 16, 8)])
def test_fused_moe_equals_dense_at_reduced_benchmark_shapes(num_experts, top_k, d_hidden, backend):
    """M = 1024 and 8192 rows: several of the kernel's 512-row chunks, split over its threads."""
    if backend == "kernel" and cpu_kernel.unavailable_reason() is not None:
        pytest.skip(f"the CPU kernel is unavailable here: {cpu_kernel.unavailable_reason().splitlines()[0]}")
    tokens, d_model = 512, 64
    rs = np.random.RandomState(3)
    params = experts.init_expert_params(jax.random.key(0), num_experts=num_experts, d_model=d_model,
                                        d_hidden=d_hidden)
    x = jnp.asarray(rs.randn(tokens, d_model), jnp.float32)
    w = jnp.asarray(rs.rand(tokens, top_k), jnp.float32)
    cot = jnp.asarray(rs.randn(tokens, d_model), jnp.float32)
    balanced = (np.arange(tokens)[:, None] * top_k + np.arange(top_k)[None, :]) % num_experts
    fused, dense = _moe_value_and_grads(backend, "swiglu"), _moe_value_and_grads("dense", "swiglu")
    for name, ids in (("skewed", _skewed_ids(rs, tokens, num_experts, top_k)), ("balanced", balanced)):
        ids = jnp.asarray(ids, jnp.int32)
        grads, y = fused(params, x, ids, w, cot)
        grads_ref, y_ref = dense(params, x, ids, w, cot)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-4, atol=1e-5, err_msg=name)
        assert jax.tree.structure(grads) == jax.tree.structure(grads_ref)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref)):
            # Weight gradients are float32 sums over hundreds of rows (scale ~100 here): every backend, dense
            # included, is ~1e-6 of the scale from a float64 reference, so the atol is relative to the scale.
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * np.abs(b).max(),
                                       err_msg=f"{name} grad{jax.tree_util.keystr(path)}")
        unused = np.bincount(np.asarray(ids).ravel(), minlength=num_experts) == 0
        assert np.all(np.asarray(grads[0]["w_down"])[unused] == 0)


def test_tiled_expert_mlp_bfloat16_keeps_dtype_and_is_close():
    rs = np.random.RandomState(5)
    params = experts.init_expert_params(jax.random.key(2), num_experts=4, d_model=16, d_hidden=8,
                                        dtype=jnp.bfloat16)
    x = jnp.asarray(rs.randn(64, 16), jnp.bfloat16)
    ids = jnp.asarray(_skewed_ids(rs, 64, 4, 2))
    w = jnp.asarray(rs.rand(64, 2), jnp.bfloat16)
    y = jax.jit(gmm.tiled_expert_mlp)(params, x, ids, w)
    assert y.dtype == jnp.bfloat16
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x, w))
    y_ref, _ = jax.jit(dispatch.moe_ffn, static_argnames="backend")(f32[0], f32[1], ids, f32[2], backend="dense")
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref), rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------------------------

def test_default_backend_and_auto():
    assert gmm.default_backend("cpu") == "tiled"
    assert gmm.default_backend("CPU") == "tiled"
    for accelerator in ("gpu", "cuda", "rocm", "tpu"):
        assert gmm.default_backend(accelerator) == "ragged_dot"
    assert gmm.default_backend() == gmm.default_backend(jax.default_backend())
    assert gmm.default_backend() in dispatch.BACKENDS
    with pytest.raises(ValueError, match="platform"):
        gmm.default_backend(3)
    assert "auto" in dispatch.BACKENDS and dispatch.BACKENDS[0] == "dense"
    assert dispatch.resolve_backend("auto", "gpu") == "ragged_dot"
    cpu_default = "kernel" if cpu_kernel.available() else "tiled"  # no C++ compiler here: the fallback
    assert dispatch.resolve_backend("auto", "cpu") == dispatch.default_backend("cpu") == cpu_default
    assert dispatch.resolve_backend("auto", "cpu", activation="swiglu", dtype=jnp.float32) == cpu_default
    assert dispatch.resolve_backend("auto", "cpu", activation="swiglu", dtype=jnp.bfloat16) == "tiled"
    assert dispatch.resolve_backend("auto", "gpu", activation="swiglu", dtype=jnp.bfloat16) == "ragged_dot"
    assert dispatch.resolve_backend("auto", "tpu") == dispatch.default_backend("tpu") == "ragged_dot"
    assert dispatch.resolve_backend("capacity") == "capacity"
    with pytest.raises(ValueError, match=r"backend='nope'.*accepted values.*'auto'"):
        dispatch.resolve_backend("nope")
    assert MoEConfig(num_experts=4, top_k=2, d_model=8, d_hidden=4).backend == "auto"
    with pytest.raises(ValueError, match=r"backend='nope'.*accepted values.*'auto'"):
        MoEConfig(num_experts=4, top_k=2, d_model=8, d_hidden=4, backend="nope")
    # 'auto' runs the platform's backend: identical numbers
    rs = np.random.RandomState(6)
    params = experts.init_expert_params(jax.random.key(3), num_experts=4, d_model=8, d_hidden=4)
    x = jnp.asarray(rs.randn(32, 8), jnp.float32)
    ids = jnp.asarray(_skewed_ids(rs, 32, 4, 2))
    w = jnp.asarray(rs.rand(32, 2), jnp.float32)
    lowered = {b: jax.jit(dispatch.moe_ffn, static_argnames="backend").lower(params, x, ids, w, backend=b)
               for b in ("auto", dispatch.default_backend(), "capacity")}
    assert lowered["auto"].as_text() == lowered[dispatch.default_backend()].as_text() != lowered["capacity"].as_text()


def test_bad_tile_sizes_raise_value_error():
    for bad in [(), (64, 48), (8, 16), (0,), (64, 64), (2.0,)]:
        with pytest.raises(ValueError, match="tile_sizes=.*accepted values"):
            gmm.check_tile_sizes(bad)
    assert gmm.check_tile_sizes([512, 64, 8]) == (512, 64, 8)
    for rows, groups in [(16384, 8), (131072, 64), (200, 6), (1, 1), (4096, 64)]:
        sizes = gmm.default_tile_sizes(rows, groups)
        assert gmm.check_tile_sizes(sizes) == sizes and sizes[-1] <= 128
