"""The C++ CPU kernel behind the dispatch backend 'kernel' (grin_jax/moe/cpu_kernel.py, csrc/expert_mlp.cc).

Against the `dense` reference (every expert on every token) in values and in the gradients w.r.t. the tokens,
the combine weights and every expert weight: every activation, loads spread over many 512-row chunks and several
OpenMP threads (1, 2 and 3, in subprocesses), experts with no rows, an expert twice in one token, bfloat16
inputs; bitwise-repeatable results; the build, its cache and the fallback of 'auto' when the kernel is unavailable.
No test here times anything (python -m grin_jax.bench does).

Axes: T tokens, K slots per token, D model, F expert hidden, E experts.
"""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grin_jax.moe import cpu_kernel, dispatch, experts

T, K, D, F, E = 1300, 3, 24, 40, 6  # M = 3900 token-slots: 8 chunks
TOL = dict(rtol=2e-5, atol=2e-5)


def assert_close(actual, desired, err_msg, scale_tol=1e-5):
    """rtol 1e-5 and an atol of 1e-5 x the array's largest magnitude: float32 sums over ~1000 rows (weight
    gradients) differ by ~1e-6 of their scale between summation orders; a wrong row or chunk is O(1)."""
    desired = np.asarray(desired, np.float64)
    np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=scale_tol,
                               atol=scale_tol * max(np.abs(desired).max(initial=0.0), 1.0), err_msg=err_msg)


def make_inputs(seed=0, tokens=T, dtype=jnp.float32):
    """Skewed loads: expert 4 gets no rows, expert 1 in most tokens (> 2 chunks); token 0 picks expert 2 twice."""
    rs = np.random.RandomState(seed)
    p = np.array([0.1, 0.5, 0.15, 0.15, 0.0, 0.1])
    ids = np.stack([rs.choice(E, size=K, replace=False, p=p) for _ in range(tokens)]).astype(np.int32)
    ids[0] = [2, 2, 3]
    x = rs.randn(tokens, D)
    w = rs.rand(tokens, K)
    cot = rs.randn(tokens, D)
    counts = np.bincount(ids.ravel(), minlength=E)
    assert counts[4] == 0 and (tokens < T or counts[1] > 2 * 512)
    return (jnp.asarray(x, dtype), jnp.asarray(ids), jnp.asarray(w, dtype), jnp.asarray(cot, jnp.float32))


def value_and_grads(backend, activation):
    def loss(params, x, w, ids, cot):
        y, _ = dispatch.moe_ffn(params, x, ids, w, activation=activation, backend=backend)
        return jnp.vdot(y.astype(jnp.float32), cot), y
    return jax.jit(lambda params, x, w, ids, cot: jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(
        params, x, w, ids, cot))


def assert_close_to_dense(activation, seed=0):
    params = experts.init_expert_params(jax.random.key(seed), num_experts=E, d_model=D, d_hidden=F,
                                        activation=activation)
    x, ids, w, cot = make_inputs(seed)
    grads, y = value_and_grads("kernel", activation)(params, x, w, ids, cot)
    grads_ref, y_ref = value_and_grads("dense", activation)(params, x, w, ids, cot)
    assert np.abs(np.asarray(y_ref)).mean() > 0.05
    assert_close(y, y_ref, f"{activation} y")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref)):
        assert_close(a, b, f"{activation} grad{jax.tree_util.keystr(path)}")
    g_down = np.abs(np.asarray(grads[0]["w_down"])).sum(axis=(1, 2))
    np.testing.assert_array_equal(g_down == 0, np.bincount(np.asarray(ids).ravel(), minlength=E) == 0)


def test_kernel_is_available_here():
    """The kernel must build on the project's machines (else 'auto' silently runs the slower 'tiled')."""
    assert cpu_kernel.unavailable_reason() is None
    assert cpu_kernel.available()


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
def test_kernel_equals_dense_over_many_chunks(activation):
    assert_close_to_dense(activation)


@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_equals_dense_with_other_thread_counts(threads):
    """OMP_NUM_THREADS = 1 (no split) and 3 (experts shared by up to three threads' ranges) in a fresh process."""
    code = ("import sys; sys.path.insert(0, 'tests'); import test_cpu_kernel as t; "
            "from grin_jax.moe import cpu_kernel; cpu_kernel.load(); "
            "t.assert_close_to_dense('swiglu', seed=1); t.assert_close_to_dense('relu', seed=2); print('ok')")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_kernel_is_bitwise_repeatable():
    params = experts.init_expert_params(jax.random.key(3), num_experts=E, d_model=D, d_hidden=F)
    x, ids, w, cot = make_inputs(3)
    fn = value_and_grads("kernel", "swiglu")
    first, second = fn(params, x, w, ids, cot), fn(params, x, w, ids, cot)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kernel_bfloat16_keeps_dtype_and_is_close():
    params = experts.init_expert_params(jax.random.key(4), num_experts=E, d_model=D, d_hidden=F, dtype=jnp.bfloat16)
    x, ids, w, cot = make_inputs(4, tokens=200, dtype=jnp.bfloat16)
    grads, y = value_and_grads("kernel", "swiglu")(params, x, w, ids, cot)
    assert y.dtype == jnp.bfloat16 and grads[0]["w_gate"].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x, w))
    grads_ref, y_ref = value_and_grads("dense", "swiglu")(*f32, ids, cot)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref), rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(np.asarray(grads[1], np.float32), np.asarray(grads_ref[1]), rtol=5e-2, atol=5e-2)


def test_kernel_forward_without_gradient_and_under_vmap():
    params = experts.init_expert_params(jax.random.key(5), num_experts=E, d_model=D, d_hidden=F)
    x, ids, w, _ = make_inputs(5, tokens=300)
    run = lambda backend: jax.jit(lambda x, ids, w: dispatch.moe_ffn(params, x, ids, w, backend=backend)[0])
    np.testing.assert_allclose(np.asarray(run("kernel")(x, ids, w)), np.asarray(run("dense")(x, ids, w)), **TOL)
    stacked = jax.tree.map(lambda a: jnp.stack([a[:150], a[150:]]), (x, ids, w))
    np.testing.assert_allclose(np.asarray(jax.vmap(run("kernel"))(*stacked)),
                               np.asarray(jax.vmap(run("dense"))(*stacked)), **TOL)


def test_empty_batch():
    params = experts.init_expert_params(jax.random.key(6), num_experts=E, d_model=D, d_hidden=F)
    x, ids, w = jnp.zeros((0, D)), jnp.zeros((0, K), jnp.int32), jnp.zeros((0, K))
    y, _ = jax.jit(lambda x, ids, w: dispatch.moe_ffn(params, x, ids, w, backend="kernel"))(x, ids, w)
    assert y.shape == (0, D)


def test_expert_id_out_of_range_is_a_clear_error():
    params = experts.init_expert_params(jax.random.key(7), num_experts=E, d_model=D, d_hidden=F)
    x, ids, w, _ = make_inputs(7, tokens=40)
    bad = ids.at[5, 1].set(E)
    with pytest.raises(Exception, match=rf"expert_ids\[16\] = {E} is out of range: accepted values are 0..{E - 1}"):
        jax.block_until_ready(dispatch.moe_ffn(params, x, bad, w, backend="kernel")[0])


def test_build_into_a_cache_and_compiler_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIN_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    path = cpu_kernel.library_path()
    assert path.parent == tmp_path / "cache" and path == cpu_kernel.library_path()  # a stable key
    cpu_kernel._build(path)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]  # no partial files left
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.raises(cpu_kernel.KernelUnavailable, match="compiling expert_mlp.cc failed"):
        cpu_kernel._build(tmp_path / "other" / "x.so")
    assert not (tmp_path / "other" / "x.so").exists()


def test_unavailable_kernel_auto_falls_back_to_tiled_with_a_warning(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_load_or_error", lambda: "no C++ compiler found: install g++ or set $CXX")
    with pytest.warns(RuntimeWarning, match="'auto' uses 'tiled' on CPU: the C\\+\\+ kernel is unavailable"):
        assert dispatch.resolve_backend("auto", "cpu") == "tiled"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve_backend("auto", "gpu") == "ragged_dot"  # no kernel involved, no warning
    params = experts.init_expert_params(jax.random.key(8), num_experts=E, d_model=D, d_hidden=F)
    x, ids, w, _ = make_inputs(8, tokens=40)
    with pytest.raises(cpu_kernel.KernelUnavailable, match="backend 'kernel'.*unavailable.*no C\\+\\+ compiler"):
        dispatch.moe_ffn(params, x, ids, w, backend="kernel")


def test_scratch_bytes_formula():
    """The documented bound: per thread 512 (2 D + F + Fi) floats + two weight-gradient partials, per extra thread a
    [T, D] accumulator, plus the [T*K] layout; it grows with the threads and the tokens."""
    one = cpu_kernel.scratch_bytes(8192, 2, 512, 1024, threads=1)
    assert one == 4 * (512 * (512 + 2048 + 1024 + 2048) + 2 * (512 * 2048 + 1024 * 512)) + 4 * 8192 * 2
    two = cpu_kernel.scratch_bytes(8192, 2, 512, 1024, threads=2)
    assert two - one == 4 * (512 * (512 + 2048 + 1024 + 2048) + 2 * (512 * 2048 + 1024 * 512) + 8192 * 512)
    assert cpu_kernel.scratch_bytes(8192, 2, 512, 1024, gated=False, threads=1) < one
    assert f"kChunkRows = {cpu_kernel.CHUNK_ROWS};" in cpu_kernel.SOURCE.read_text()
