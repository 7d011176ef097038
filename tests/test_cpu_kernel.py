"""The C++ CPU kernel behind the dispatch backend 'kernel' (grin_jax/moe/cpu_kernel.py, csrc/expert_mlp.cc).

Against the `dense` reference (every expert on every token) in values and in the gradients w.r.t. the tokens,
the combine weights and every expert weight: every activation, loads spread over many 512-row chunks and several
OpenMP threads (1, 2 and 3, in subprocesses), experts with no rows, an expert twice in one token, mixed-precision
inputs; bitwise-repeatable results. What the kernel supports (`supports`; bfloat16 and unknown activations go to
'tiled' under 'auto' and are a ValueError under 'kernel'); the build, its cache, its timeout, $GRIN_JAX_KERNEL=0,
and the fallback of 'auto' when the kernel is unavailable, down to a process with no C++ compiler at all.
No test here times anything (python -m grin_jax.bench does).

Axes: T tokens, K slots per token, D model, F expert hidden, E experts.
"""

import logging
import os
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grin_jax.moe import cpu_kernel, dispatch, experts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def needs_kernel():
    """Skip (saying why) where the kernel cannot be built: no C++ compiler, or $GRIN_JAX_KERNEL=0. The rest of the
    suite then runs on 'tiled', as 'auto' does; test_kernel_is_available_here still fails when a compiler is there
    and the build breaks."""
    reason = cpu_kernel.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the CPU kernel is unavailable here: {reason.splitlines()[0]}")

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
    """The kernel must build wherever a C++ compiler is found (else 'auto' runs the slower 'tiled'); without one
    (or with $GRIN_JAX_KERNEL=0) this is a skip, not a failure: the fallback is then the promised behaviour."""
    reason = cpu_kernel.unavailable_reason()
    if reason is not None and (reason.startswith("no C++ compiler found") or cpu_kernel.disabled_reason()):
        pytest.skip(f"the CPU kernel is unavailable here: {reason}")
    assert reason is None
    assert cpu_kernel.available()


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
def test_kernel_equals_dense_over_many_chunks(activation, needs_kernel):
    assert_close_to_dense(activation)


@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_equals_dense_with_other_thread_counts(threads, needs_kernel):
    """OMP_NUM_THREADS = 1 (no split) and 3 (experts shared by up to three threads' ranges) in a fresh process."""
    code = ("import sys; sys.path.insert(0, 'tests'); import test_cpu_kernel as t; "
            "from grin_jax.moe import cpu_kernel; cpu_kernel.load(); "
            "t.assert_close_to_dense('swiglu', seed=1); t.assert_close_to_dense('relu', seed=2); print('ok')")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_kernel_is_bitwise_repeatable(needs_kernel):
    params = experts.init_expert_params(jax.random.key(3), num_experts=E, d_model=D, d_hidden=F)
    x, ids, w, cot = make_inputs(3)
    fn = value_and_grads("kernel", "swiglu")
    first, second = fn(params, x, w, ids, cot), fn(params, x, w, ids, cot)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kernel_refuses_bfloat16_and_auto_runs_tiled_in_bfloat16(caplog):
    """The kernel computes in float32: bfloat16 would silently change the numerics, so 'kernel' refuses it and
    'auto' runs 'tiled' (which computes in bfloat16, like 'dense'), with one INFO record saying why."""
    params = experts.init_expert_params(jax.random.key(4), num_experts=E, d_model=D, d_hidden=F, dtype=jnp.bfloat16)
    x, ids, w, cot = make_inputs(4, tokens=200, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"backend='kernel'.*dtype=bfloat16.*float32 only.*accepted dtypes: "
                                         r"\['float32'\]"):
        value_and_grads("kernel", "swiglu")(params, x, w, ids, cot)
    with caplog.at_level(logging.INFO, logger="grin_jax.moe.dispatch"), warnings.catch_warnings():
        warnings.simplefilter("error")  # an intended choice: no warning
        dispatch._ANNOUNCED.clear()
        assert dispatch.resolve_backend("auto", "cpu", activation="swiglu", dtype=jnp.bfloat16) == "tiled"
        grads, y = value_and_grads("auto", "swiglu")(params, x, w, ids, cot)
    assert [r.getMessage() for r in caplog.records].count(
        "backend 'auto' uses 'tiled' on CPU for activation=swiglu, dtype=bfloat16: dtype=bfloat16 is not computed by "
        "the kernel: it computes in float32 only (accepted dtypes: ['float32'], the result type of x and the expert "
        "weights)") == 1  # once, although resolved twice
    assert y.dtype == jnp.bfloat16 and grads[0]["w_gate"].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    grads_tiled, y_tiled = value_and_grads("tiled", "swiglu")(params, x, w, ids, cot)
    for a, b in zip(jax.tree.leaves((grads, y)), jax.tree.leaves((grads_tiled, y_tiled))):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x, w))
    grads_ref, y_ref = value_and_grads("dense", "swiglu")(*f32, ids, cot)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref), rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(np.asarray(grads[1], np.float32), np.asarray(grads_ref[1]), rtol=5e-2, atol=5e-2)


def test_kernel_runs_bfloat16_tokens_with_float32_weights(needs_kernel):
    """The compute dtype is the result type of x and the expert weights: bfloat16 activations with float32 expert
    weights compute in float32 in every backend, so the kernel runs them (and keeps x's gradient in bfloat16)."""
    params = experts.init_expert_params(jax.random.key(9), num_experts=E, d_model=D, d_hidden=F)
    x, ids, w, cot = make_inputs(9, tokens=200, dtype=jnp.bfloat16)
    assert dispatch.resolve_backend("auto", "cpu", activation="swiglu", dtype=jnp.result_type(x, params["w_up"])) \
        == "kernel"
    grads, y = value_and_grads("kernel", "swiglu")(params, x, w, ids, cot)
    grads_ref, y_ref = value_and_grads("dense", "swiglu")(params, x, w, ids, cot)
    assert y.dtype == jnp.float32 and grads[1].dtype == jnp.bfloat16
    assert_close(y, y_ref, "mixed y")
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)


def test_supports():
    for activation in ("swiglu", "geglu", "gelu", "relu"):
        assert cpu_kernel.supports(activation, jnp.float32) is None
        assert cpu_kernel.supports(activation, "float32") is None and cpu_kernel.supports(activation) is None
    assert set(cpu_kernel.ACTIVATION_CODES) <= set(experts.ACTIVATIONS)
    assert cpu_kernel.supports(None, None) is None
    assert cpu_kernel.supports("silu", jnp.float32) == (
        "activation='silu' has no C++ implementation: the kernel accepts activation in "
        "['swiglu', 'geglu', 'gelu', 'relu']")
    for dtype in (jnp.bfloat16, jnp.float16, np.float64, "bfloat16"):
        reason = cpu_kernel.supports("swiglu", dtype)
        assert reason.startswith(f"dtype={jnp.dtype(dtype).name} is not computed by the kernel: it computes in "
                                 "float32 only (accepted dtypes: ['float32']")
    assert cpu_kernel.supports("silu", jnp.bfloat16).startswith("activation='silu'")


@pytest.fixture
def plain_silu(monkeypatch):
    """An activation the experts know and the C++ kernel does not (as any activation added later would be)."""
    monkeypatch.setitem(experts.ACTIVATIONS, "silu_plain", experts.Activation(jax.nn.silu, gated=False))
    return "silu_plain"


def test_explicit_kernel_with_an_unsupported_activation_is_a_value_error(plain_silu):
    params = experts.init_expert_params(jax.random.key(10), num_experts=E, d_model=D, d_hidden=F,
                                        activation=plain_silu)
    x, ids, w, _ = make_inputs(10, tokens=40)
    message = (r"backend='kernel' cannot run this MoE layer: activation='silu_plain' has no C\+\+ implementation: "
               r"the kernel accepts activation in \['swiglu', 'geglu', 'gelu', 'relu'\]; use backend='tiled'")
    with pytest.raises(ValueError, match=message):
        dispatch.moe_ffn(params, x, ids, w, activation=plain_silu, backend="kernel")
    with pytest.raises(ValueError, match=message):
        cpu_kernel.kernel_expert_mlp(params, x, ids, w, activation=plain_silu)
    with pytest.raises(ValueError, match=message):
        dispatch.resolve_backend("kernel", activation=plain_silu)
    with pytest.raises(ValueError, match=r"backend='kernel'.*dtype=float16"):
        dispatch.resolve_backend("kernel", "cpu", activation="relu", dtype=jnp.float16)
    assert dispatch.resolve_backend("kernel") == "kernel"  # nothing known: the old call, unchecked


def test_auto_with_an_unsupported_activation_runs_tiled(plain_silu, caplog, needs_kernel):
    assert dispatch.select_backend("auto", "cpu", activation=plain_silu, dtype=jnp.float32) == (
        "tiled", "backend 'auto' uses 'tiled' on CPU for activation=silu_plain, dtype=float32: activation="
        "'silu_plain' has no C++ implementation: the kernel accepts activation in ['swiglu', 'geglu', 'gelu', 'relu']")
    assert dispatch.select_backend("auto", "gpu", activation=plain_silu) == ("ragged_dot", None)
    assert dispatch.select_backend("auto", "cpu", activation="swiglu", dtype=jnp.float32) == ("kernel", None)
    assert dispatch.default_backend("cpu", activation=plain_silu) == "tiled"
    params = experts.init_expert_params(jax.random.key(11), num_experts=E, d_model=D, d_hidden=F,
                                        activation=plain_silu)
    x, ids, w, cot = make_inputs(11, tokens=200)
    with caplog.at_level(logging.INFO, logger="grin_jax.moe.dispatch"), warnings.catch_warnings():
        warnings.simplefilter("error")
        grads, y = value_and_grads("auto", plain_silu)(params, x, w, ids, cot)
    grads_ref, y_ref = value_and_grads("dense", plain_silu)(params, x, w, ids, cot)
    assert_close(y, y_ref, "silu_plain y")
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert_close(a, b, "silu_plain grad")
    lowered = {b: jax.jit(lambda x, ids, w, b=b: dispatch.moe_ffn(params, x, ids, w, activation=plain_silu,
                                                                   backend=b)[0]).lower(x, ids, w).as_text()
               for b in ("auto", "tiled", "dense")}
    assert lowered["auto"] == lowered["tiled"] != lowered["dense"]


def test_kernel_forward_without_gradient_and_under_vmap(needs_kernel):
    params = experts.init_expert_params(jax.random.key(5), num_experts=E, d_model=D, d_hidden=F)
    x, ids, w, _ = make_inputs(5, tokens=300)
    run = lambda backend: jax.jit(lambda x, ids, w: dispatch.moe_ffn(params, x, ids, w, backend=backend)[0])
    np.testing.assert_allclose(np.asarray(run("kernel")(x, ids, w)), np.asarray(run("dense")(x, ids, w)), **TOL)
    stacked = jax.tree.map(lambda a: jnp.stack([a[:150], a[150:]]), (x, ids, w))
    np.testing.assert_allclose(np.asarray(jax.vmap(run("kernel"))(*stacked)),
                               np.asarray(jax.vmap(run("dense"))(*stacked)), **TOL)


def test_zero_weight_slots_are_skipped_without_gradient_and_kept_with_it(needs_kernel):
    """A forward with no gradient leaves out the slots of weight exactly 0 (DS-MoE's threshold inference): y equals
    the dense reference, also when such a slot's expert output is not finite (0 * inf would be NaN), and under
    jax.grad every slot is computed (the weight gradient of a zero-weight slot is its expert's output, not 0)."""
    params = experts.init_expert_params(jax.random.key(6), num_experts=E, d_model=D, d_hidden=F)
    x, ids, w, cot = make_inputs(6, tokens=300)
    w = w.at[::3, 1].set(0.0).at[:40].set(0.0)  # some slots, and every slot of 40 tokens
    run = lambda backend: jax.jit(lambda x, ids, w: dispatch.moe_ffn(params, x, ids, w, backend=backend)[0])
    np.testing.assert_allclose(np.asarray(run("kernel")(x, ids, w)), np.asarray(run("dense")(x, ids, w)), **TOL)
    assert np.all(np.asarray(run("kernel")(x, ids, w))[:40] == 0)
    # An expert whose output is inf: skipped where its weight is 0, so no NaN reaches y.
    ids_inf = ids.at[:, 0].set(2)
    w_inf = jnp.where(ids_inf == 2, 0.0, w)  # every slot of expert 2 has weight 0
    broken = {**params, "w_down": params["w_down"].at[2].set(jnp.inf)}
    y = jax.jit(lambda: dispatch.moe_ffn(broken, x, ids_inf, w_inf, backend="kernel")[0])()
    assert np.all(np.isfinite(np.asarray(y)))
    grads, _ = value_and_grads("kernel", "swiglu")(params, x, w, ids, cot)
    grads_ref, _ = value_and_grads("dense", "swiglu")(params, x, w, ids, cot)
    assert_close(grads[2], grads_ref[2], "weights grad")
    assert np.abs(np.asarray(grads[2])[:40]).max() > 0  # zero-weight slots still have a weight gradient


def test_empty_batch(needs_kernel):
    params = experts.init_expert_params(jax.random.key(6), num_experts=E, d_model=D, d_hidden=F)
    x, ids, w = jnp.zeros((0, D)), jnp.zeros((0, K), jnp.int32), jnp.zeros((0, K))
    y, _ = jax.jit(lambda x, ids, w: dispatch.moe_ffn(params, x, ids, w, backend="kernel"))(x, ids, w)
    assert y.shape == (0, D)


def test_expert_id_out_of_range_is_a_clear_error(needs_kernel):
    params = experts.init_expert_params(jax.random.key(7), num_experts=E, d_model=D, d_hidden=F)
    x, ids, w, _ = make_inputs(7, tokens=40)
    bad = ids.at[5, 1].set(E)
    with pytest.raises(Exception, match=rf"expert_ids\[16\] = {E} is out of range: accepted values are 0..{E - 1}"):
        jax.block_until_ready(dispatch.moe_ffn(params, x, bad, w, backend="kernel")[0])


def test_build_into_a_cache_and_compiler_errors(tmp_path, monkeypatch, needs_kernel):
    monkeypatch.setenv("GRIN_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    path = cpu_kernel.library_path()
    assert path.parent == tmp_path / "cache" and path == cpu_kernel.library_path()  # a stable key
    cpu_kernel._build(path)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]  # no partial files left
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.raises(cpu_kernel.KernelUnavailable, match="compiling expert_mlp.cc failed"):
        cpu_kernel._build(tmp_path / "other" / "x.so")
    assert not (tmp_path / "other" / "x.so").exists()
    monkeypatch.setenv("CXX", "true")  # one that "succeeds" without writing anything
    with pytest.raises(cpu_kernel.KernelUnavailable, match="exited with status 0 but wrote no library"):
        cpu_kernel._build(tmp_path / "other" / "x.so")
    assert list((tmp_path / "other").iterdir()) == []


def test_build_timeout_kills_the_compiler_and_leaves_nothing(tmp_path, monkeypatch):
    """A compiler that hangs: the build gives up after the timeout, kills the compiler's whole process group
    (here a grandchild that sleeps) and leaves no partial file."""
    pid_file = tmp_path / "pid"
    fake = tmp_path / "hanging-cxx"
    fake.write_text(f"#!/bin/sh\n{sys.executable} -c 'import time; time.sleep(600)' &\necho $! > {pid_file}\nwait\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    target = tmp_path / "cache" / "x.so"
    start = time.monotonic()
    with pytest.raises(cpu_kernel.KernelUnavailable,
                       match=r"compiling expert_mlp.cc timed out after 1 s \(\$GRIN_JAX_KERNEL_BUILD_TIMEOUT"):
        cpu_kernel._build(target, timeout=1)
    # Not a timing test: a build that waited for the compiler's process group would take the sleeper's 600 s;
    # the margin to the 1 s timeout is two orders of magnitude, whatever the load.
    assert time.monotonic() - start < 300
    assert not target.exists() and list(target.parent.iterdir()) == []
    pid = int(pid_file.read_text())
    for _ in range(100):  # killed (gone, or a zombie until init reaps it)
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].startswith("Z"):
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the compiler's child {pid} is still running")
    monkeypatch.setenv("GRIN_JAX_KERNEL_BUILD_TIMEOUT", "2.5")
    assert cpu_kernel.build_timeout() == 2.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv("GRIN_JAX_KERNEL_BUILD_TIMEOUT", bad)
        with pytest.raises(ValueError, match="GRIN_JAX_KERNEL_BUILD_TIMEOUT=.*accepted values are positive"):
            cpu_kernel.build_timeout()
    monkeypatch.delenv("GRIN_JAX_KERNEL_BUILD_TIMEOUT")
    assert cpu_kernel.build_timeout() == cpu_kernel.DEFAULT_BUILD_TIMEOUT


def test_ensure_built_caches_its_outcome(monkeypatch):
    """One build attempt per process: later calls (every trace) return the cached outcome without work."""
    calls = []
    monkeypatch.delenv("GRIN_JAX_KERNEL", raising=False)
    monkeypatch.setattr(cpu_kernel, "_OUTCOME", [])
    monkeypatch.setattr(cpu_kernel, "_build_and_register", lambda timeout: calls.append(timeout) or "it broke")
    assert cpu_kernel.ensure_built(timeout=7) == "it broke" and cpu_kernel.ensure_built() == "it broke"
    assert not cpu_kernel.available() and cpu_kernel.unavailable_reason() == "it broke" and calls == [7]


def test_unavailable_kernel_auto_falls_back_to_tiled_with_one_warning(monkeypatch):
    monkeypatch.delenv("GRIN_JAX_KERNEL", raising=False)
    monkeypatch.setattr(cpu_kernel, "_OUTCOME", ["no C++ compiler found: install g++ or set $CXX"])
    monkeypatch.setattr(dispatch, "_ANNOUNCED", set())
    with pytest.warns(RuntimeWarning, match="'auto' uses 'tiled' on CPU: the C\\+\\+ kernel is unavailable "
                                            "\\(no C\\+\\+ compiler found"):
        assert dispatch.resolve_backend("auto", "cpu") == "tiled"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve_backend("auto", "cpu", activation="swiglu", dtype=jnp.float32) == "tiled"  # once
        assert dispatch.resolve_backend("auto", "gpu") == "ragged_dot"  # no kernel involved, no warning
    params = experts.init_expert_params(jax.random.key(8), num_experts=E, d_model=D, d_hidden=F)
    x, ids, w, _ = make_inputs(8, tokens=40)
    with pytest.raises(cpu_kernel.KernelUnavailable, match="backend 'kernel'.*unavailable.*no C\\+\\+ compiler"):
        dispatch.moe_ffn(params, x, ids, w, backend="kernel")


def test_kernel_disabled_by_environment(monkeypatch, caplog, needs_kernel):
    """$GRIN_JAX_KERNEL=0: 'auto' takes 'tiled' with an INFO record (a choice, not a problem), 'kernel' raises;
    read at every resolution, so it also works after the kernel was built."""
    monkeypatch.setattr(dispatch, "_ANNOUNCED", set())
    monkeypatch.setenv("GRIN_JAX_KERNEL", "0")
    assert cpu_kernel.disabled_reason() == "disabled by $GRIN_JAX_KERNEL=0"
    with caplog.at_level(logging.INFO, logger="grin_jax.moe.dispatch"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve_backend("auto", "cpu") == "tiled"
    assert caplog.records[-1].getMessage() == ("backend 'auto' uses 'tiled' on CPU: the C++ kernel is unavailable "
                                               "(disabled by $GRIN_JAX_KERNEL=0)")
    params = experts.init_expert_params(jax.random.key(12), num_experts=E, d_model=D, d_hidden=F)
    x, ids, w, _ = make_inputs(12, tokens=40)
    with pytest.raises(cpu_kernel.KernelUnavailable, match="unavailable: disabled by \\$GRIN_JAX_KERNEL=0"):
        dispatch.moe_ffn(params, x, ids, w, backend="kernel")
    for off in ("off", "False", "no"):
        monkeypatch.setenv("GRIN_JAX_KERNEL", off)
        assert not cpu_kernel.available()
    monkeypatch.setenv("GRIN_JAX_KERNEL", "1")
    assert cpu_kernel.available() and dispatch.resolve_backend("auto", "cpu") == "kernel"


def _run_without_compiler(tmp_path, args, timeout):
    """Run `python args` with no C++ compiler reachable ($CXX unset, $PATH an empty folder) and an empty kernel
    cache, as on a machine without g++."""
    (tmp_path / "empty-path").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "GRIN_JAX_KERNEL")}
    env.update(PATH=str(tmp_path / "empty-path"), GRIN_JAX_KERNEL_CACHE=str(tmp_path / "kernel-cache"),
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert not (tmp_path / "kernel-cache").exists() or not any((tmp_path / "kernel-cache").iterdir())
    return proc


NO_COMPILER = "backend 'auto' uses 'tiled' on CPU: the C++ kernel is unavailable (no C++ compiler found"


def test_without_a_compiler_auto_falls_back_and_equals_dense(tmp_path):
    """The README's promise: without g++ everything runs, on 'tiled'. In a fresh process with no compiler and an
    empty kernel cache, moe_ffn(backend='auto') (two jitted functions: two traces) warns exactly once and equals
    'dense' in value and gradients."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.path.insert(0, "tests")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import jax, jax.numpy as jnp
            import test_cpu_kernel as t
            from grin_jax.moe import cpu_kernel, dispatch, experts
            params = experts.init_expert_params(jax.random.key(0), num_experts=t.E, d_model=t.D, d_hidden=t.F)
            x, ids, w, cot = t.make_inputs(0, tokens=300)
            grads, y = t.value_and_grads("auto", "swiglu")(params, x, w, ids, cot)
            y_fwd = jax.jit(lambda x: dispatch.moe_ffn(params, x, ids, w, backend="auto")[0])(x)
        grads_ref, y_ref = t.value_and_grads("dense", "swiglu")(params, x, w, ids, cot)
        t.assert_close(y, y_ref, "y"); t.assert_close(y_fwd, y_ref, "y forward only")
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
            t.assert_close(a, b, "grad")
        assert cpu_kernel.unavailable_reason().startswith("no C++ compiler found"), cpu_kernel.unavailable_reason()
        messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
        print("WARNINGS", messages)
        assert len(messages) == 1 and messages[0].startswith(t.NO_COMPILER), messages
        print("ok")
    """)
    proc = _run_without_compiler(tmp_path, ["-c", code], timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_without_a_compiler_a_training_step_runs(tmp_path):
    """The model path: `python -m grin_jax.train` (smoke config, moe_backend 'auto') with no compiler reachable
    trains on 'tiled' and says so."""
    proc = _run_without_compiler(tmp_path, ["-m", "grin_jax.train", "--config=configs/grin_tiny.py:smoke",
                                            f"--workdir={tmp_path / 'workdir'}", "--config.train.steps=2"],
                                 timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (proc.stdout + proc.stderr).count(NO_COMPILER) == 1, proc.stderr[-4000:]


def test_scratch_bytes_formula():
    """The documented bound: per thread 512 (2 D + F + Fi) floats + two weight-gradient partials, per extra thread a
    [T, D] accumulator, plus the [T*K] layout; it grows with the threads and the tokens."""
    one = cpu_kernel.scratch_bytes(8192, 2, 512, 1024, threads=1)
    assert one == 4 * (512 * (512 + 2048 + 1024 + 2048) + 2 * (512 * 2048 + 1024 * 512)) + 4 * 8192 * 2
    two = cpu_kernel.scratch_bytes(8192, 2, 512, 1024, threads=2)
    assert two - one == 4 * (512 * (512 + 2048 + 1024 + 2048) + 2 * (512 * 2048 + 1024 * 512) + 8192 * 512)
    assert cpu_kernel.scratch_bytes(8192, 2, 512, 1024, gated=False, threads=1) < one
    assert f"kChunkRows = {cpu_kernel.CHUNK_ROWS};" in cpu_kernel.SOURCE.read_text()


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_dense_ffn_on_the_kernel_equals_its_xla_matmuls(activation, monkeypatch, needs_kernel):
    """The dense FFN kind runs on the kernel where backend 'auto' would (one CPU device, float32) and the layer is
    big enough: its output and every gradient equal the XLA matmuls' (the path it takes otherwise: small layers,
    bfloat16, a mesh, $GRIN_JAX_KERNEL=0), over several of the kernel's token chunks; the compiled program holds
    the kernel's calls, the other none."""
    from flax import nnx

    from grin_jax.ffn import dense

    layer = dense.DenseFFN(dense.DenseConfig(d_model=24, d_hidden=40, activation=activation), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 200, 24)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(3, 200, 24)), jnp.float32)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x)[0] * cot)

    assert dense.kernel_unavailable(activation, jnp.float32) is None
    assert "bfloat16" in dense.kernel_unavailable(activation, jnp.bfloat16)
    assert "XLA's matmuls are faster" in dense.kernel_unavailable(activation, jnp.float32, 600, 40)
    small = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    assert cpu_kernel.FWD_TARGET not in small  # 600 tokens x 40: below KERNEL_MIN_TOKENS_X_WIDTH
    monkeypatch.setattr(dense, "KERNEL_MIN_TOKENS_X_WIDTH", 1)
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    with_kernel = grad(params, x)
    kernel_text = grad.lower(params, x).compile().as_text()
    monkeypatch.setattr(dense, "kernel_unavailable", lambda *_: "off")
    plain = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    with_xla = plain(params, x)
    assert cpu_kernel.FWD_TARGET in kernel_text and cpu_kernel.BWD_TARGET in kernel_text
    assert cpu_kernel.FWD_TARGET not in plain.lower(params, x).compile().as_text()
    for got, want in zip(jax.tree.leaves(with_kernel), jax.tree.leaves(with_xla)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
