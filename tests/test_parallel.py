"""moe/parallel.py on 8 fake CPU devices (conftest.py): every strategy and mesh layout equals the single-device
`moe_layer` in values, aux and gradients; drops, load balance and rng fold-in against brute force; layout errors.

Mesh shapes are (data, expert, model). Compile time dominates: each case is one jit of value-and-grad.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from grin_jax.moe import parallel as par
from grin_jax.moe import routing as _routing
from grin_jax.moe.dispatch import moe_ffn
from grin_jax.moe.layer import MoEConfig, init_moe_params, moe_layer

T, D, F, E, K = 64, 16, 16, 8, 2
TOL = 1e-5

assert jax.device_count() >= 8, "these tests need 8 (fake) CPU devices: see tests/conftest.py"


def config(router="sparsemixer_v2", **kw):
    options = dict(num_experts=E, top_k=K, d_model=D, d_hidden=F, router=router)
    if router == "sparsemixer_v2":
        options["router_options"] = {"jitter_eps": 0.3}
    options.update(kw)
    return MoEConfig(**options)


@functools.lru_cache(maxsize=None)
def inputs():
    """Parameters (init_moe_params' shapes, fan-in scaled), tokens and router noise, drawn with numpy (no compile)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(functools.partial(init_moe_params, config=config()), jax.random.key(0))
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) / np.sqrt(s.shape[-2])),
                          shapes)
    x = jnp.asarray(rng.standard_normal((T, D), np.float32))
    noise = {"gumbel_TKE": jnp.asarray(rng.gumbel(size=(T, K, E)).astype(np.float32)),
             "uniform_TK": jnp.asarray(rng.uniform(size=(T, K)).astype(np.float32))}
    return params, x, noise


def scalar_loss(y, aux):
    return jnp.mean(jnp.square(y)) + 0.1 * aux["losses"]["load_balance_loss"] + 0.01 * aux["losses"]["z_loss"]


@functools.lru_cache(maxsize=None)
def reference(router):
    """Single-device moe_layer: (loss, y, aux, grads w.r.t. (params, x))."""
    params, x, noise = inputs()
    cfg = config(router)
    noise = noise if router == "sparsemixer_v2" else None

    def loss(p, x):
        y, aux = moe_layer(p, x, config=cfg, training=True, noise=noise)
        return scalar_loss(y, aux), (y, aux)

    (value, (y, aux)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return value, y, aux, grads


def run_parallel(router, mesh_shape, strategy, axis_types="explicit", **kw):
    params, x, noise = inputs()
    cfg = config(router)
    noise = noise if router == "sparsemixer_v2" else None
    mesh = par.make_mesh(*mesh_shape, axis_types=axis_types)

    def loss(p, x):
        y, aux = par.moe_layer_parallel(p, x, config=cfg, mesh=mesh, strategy=strategy, training=True,
                                        router_noise=noise, **kw)
        return scalar_loss(y, aux), (y, aux)

    with jax.set_mesh(mesh):
        (value, (y, aux)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return value, y, aux, grads


def max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(jnp.asarray(u) - jnp.asarray(v))))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def assert_matches_reference(router, result):
    value0, y0, aux0, grads0 = reference(router)
    value1, y1, aux1, grads1 = result
    assert y1.shape == y0.shape
    assert max_abs_diff(value0, value1) < TOL
    assert max_abs_diff(y0, y1) < TOL
    assert max_abs_diff(grads0, grads1) < TOL, "gradients w.r.t. (router, experts, x) differ"
    for name in ("load_balance_loss", "z_loss"):
        assert max_abs_diff(aux0["losses"][name], aux1["losses"][name]) < TOL, name
        assert aux1["losses"][name].sharding.is_fully_replicated
    for name, value in aux0["metrics"].items():
        assert max_abs_diff(value, aux1["metrics"][name]) < TOL, name
    if router == "sparsemixer_v2":
        assert float(aux1["metrics"]["router_grad_fraction"]) > 0.5  # the router gradient is really exercised
    # Gradients of all parameters are non-trivial (a zero gradient would hide a broken transpose).
    for leaf in jax.tree.leaves(grads1):
        assert float(jnp.max(jnp.abs(leaf))) > 0


ALL_MESHES = [(8, 1, 1), (2, 4, 1), (4, 2, 1), (2, 2, 2), (1, 1, 8)]


@pytest.mark.parametrize("mesh_shape", ALL_MESHES)
def test_allgather_sparsemixer_matches_single_device(mesh_shape):
    assert_matches_reference("sparsemixer_v2", run_parallel("sparsemixer_v2", mesh_shape, "allgather"))


def test_allgather_topk_matches_single_device_auto_axes():
    # Also the Auto-axes path: inputs are not resharded by the layer, shard_map does it under jit.
    assert_matches_reference("topk_softmax", run_parallel("topk_softmax", (2, 2, 2), "allgather", axis_types="auto"))


@pytest.mark.parametrize("router,mesh_shape", [("sparsemixer_v2", (8, 1, 1)), ("sparsemixer_v2", (2, 4, 1)),
                                               ("sparsemixer_v2", (2, 2, 2)), ("topk_softmax", (1, 1, 8))])
def test_alltoall_large_capacity_matches_single_device(router, mesh_shape):
    # capacity_factor >= E / K gives C >= L: nothing can be dropped.
    result = run_parallel(router, mesh_shape, "alltoall", capacity_factor=E / K)
    assert float(result[2]["metrics"]["dropped_fraction"]) == 0.0
    assert_matches_reference(router, result)


@pytest.mark.parametrize("mesh_shape,gmm_backend", [((4, 2, 1), "tiled"), ((2, 2, 2), "ragged_dot")])
def test_ragged_alltoall_emulated_matches_single_device(mesh_shape, gmm_backend):
    result = run_parallel("sparsemixer_v2", mesh_shape, "ragged_alltoall", gmm_backend=gmm_backend,
                          ragged_all_to_all=par.emulated_ragged_all_to_all)
    assert_matches_reference("sparsemixer_v2", result)


@jax.jit
def topk_ids(params, x):
    return _routing.route("topk_softmax", x @ params["router"], top_k=K, training=False).expert_ids


@jax.jit
def kept_slots_reference(params, x, kept_TK):
    routing = _routing.route("topk_softmax", x @ params["router"], top_k=K, training=False)
    return moe_ffn(params["experts"], x, routing.expert_ids, routing.weights * kept_TK, backend="dense")[0]


def _brute_force_capacity(ids_TK, num_shards, capacity):
    """kept[t, k] with a per-(data shard, expert) capacity, slot-major priority (numpy loops)."""
    kept = np.zeros(ids_TK.shape, bool)
    per_shard = ids_TK.shape[0] // num_shards
    for shard in range(num_shards):
        used = np.zeros(E, int)
        for k in range(K):
            for t in range(shard * per_shard, (shard + 1) * per_shard):
                e = ids_TK[t, k]
                if used[e] < capacity:
                    used[e] += 1
                    kept[t, k] = True
    return kept


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (4, 2, 1)])
def test_alltoall_small_capacity_drops(mesh_shape):
    params, x, _ = inputs()
    cfg = config("topk_softmax")
    mesh = par.make_mesh(*mesh_shape)
    num_data = mesh_shape[0] * mesh_shape[1]
    capacity_factor = 0.5
    with jax.set_mesh(mesh):
        y, aux = jax.jit(functools.partial(par.moe_layer_parallel, config=cfg, mesh=mesh, strategy="alltoall",
                                           training=False, capacity_factor=capacity_factor))(params, x)
    ids = np.asarray(topk_ids(params, x))
    capacity = int(np.ceil(capacity_factor * (T // num_data) * K / E))
    assert int(aux["metrics"]["capacity"]) == capacity
    kept = _brute_force_capacity(ids, num_data, capacity)
    dropped = 1.0 - kept.mean()
    assert dropped > 0.1
    np.testing.assert_allclose(float(aux["metrics"]["dropped_fraction"]), dropped, atol=1e-7)
    # Values: the kept slots, exactly (dropped slots contribute zero).
    y_ref = kept_slots_reference(params, x, jnp.asarray(kept))
    assert max_abs_diff(y, y_ref) < TOL


def _numpy_load_balance(x, router, ids_TK, num_groups):
    logits = np.asarray(x, np.float64) @ np.asarray(router, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    losses = []
    for group_ids, group_probs in zip(np.split(ids_TK, num_groups), np.split(probs, num_groups)):
        f = np.bincount(group_ids.reshape(-1), minlength=E) / group_ids.size
        losses.append(E * np.sum(f * group_probs.mean(0)))
    return float(np.mean(losses))


def test_load_balance_global_vs_local_brute_force():
    params, x, _ = inputs()
    cfg = config("topk_softmax")
    mesh_shape = (2, 4, 1)
    mesh = par.make_mesh(*mesh_shape)
    num_data = 8

    def both(p, x):
        kw = dict(config=cfg, mesh=mesh, strategy="allgather", training=False)
        _, aux_global = par.moe_layer_parallel(p, x, load_balance="global", **kw)
        _, aux_local = par.moe_layer_parallel(p, x, load_balance="local", **kw)
        return aux_global["losses"]["load_balance_loss"], aux_local["losses"]["load_balance_loss"]

    with jax.set_mesh(mesh):
        lb_global, lb_local = jax.jit(both)(params, x)
    ids = np.asarray(topk_ids(params, x))
    np.testing.assert_allclose(float(lb_global), _numpy_load_balance(x, params["router"], ids, 1), atol=TOL)
    np.testing.assert_allclose(float(lb_local), _numpy_load_balance(x, params["router"], ids, num_data), atol=TOL)
    assert abs(float(lb_global) - float(lb_local)) > 1e-3  # the two modes really differ on this batch


def test_rng_noise_is_drawn_on_the_global_token_axis():
    """With a key, the mesh layer draws its noise (router draws and input jitter) on the global token axis, so it
    equals the single-device layer with the same key. Parameters are placed with param_shardings first (the
    layer's reshard is then a no-op)."""
    params, x, _ = inputs()
    cfg = config("sparsemixer_v2", input_jitter=0.05)
    key = jax.random.key(7)
    mesh = par.make_mesh(2, 2, 2)
    params = jax.device_put(params, par.param_shardings(params, mesh))
    assert params["experts"]["w_down"].sharding.spec == P("expert", "model", None)
    with jax.set_mesh(mesh):
        y, aux = jax.jit(functools.partial(par.moe_layer_parallel, config=cfg, mesh=mesh, training=True))(
            params, x, rng=key)
    y_ref, aux_ref = jax.jit(lambda p, xs, k: moe_layer(p, xs, config=cfg, training=True, rng=k))(
        jax.device_get(params), x, key)
    assert max_abs_diff(y, y_ref) < TOL
    assert max_abs_diff(aux["losses"], aux_ref["losses"]) < TOL
    y_other = jax.jit(lambda p, xs, k: moe_layer(p, xs, config=cfg, training=True, rng=k))(
        jax.device_get(params), x, jax.random.key(8))[0]
    assert max_abs_diff(y, y_other) > 1e-3  # the key matters


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_expert_choice_matches_single_device(mesh_shape):
    """Expert choice (groups = the batch at one position, spanning the data shards) on a mesh: values, aux and
    gradients equal one device."""
    params, _, _ = inputs()
    cfg = config("expert_choice", router_options={"capacity_factor": 0.5})  # C = 2 of 16: some tokens dropped
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 4, D), np.float32))  # [B, S, D]
    mesh = par.make_mesh(*mesh_shape)

    def loss(p, x, mesh):
        y, aux = moe_layer(p, x, config=cfg, training=True, mesh=mesh)
        return scalar_loss(y, aux), (y, aux)

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (v0, (y0, aux0)), g0 = jax.jit(functools.partial(grad, mesh=None))(params, x)
    with jax.set_mesh(mesh):
        (v1, (y1, aux1)), g1 = jax.jit(functools.partial(grad, mesh=mesh))(params, x)
    assert y1.shape == (16, 4, D)
    assert max_abs_diff((v0, y0, g0), (v1, y1, g1)) < TOL
    assert max_abs_diff(aux0, aux1) < TOL
    assert float(aux1["metrics"]["dropped_fraction"]) > 0  # expert choice really leaves some tokens out


def test_emulated_ragged_all_to_all_matches_the_documented_example():
    # The example in lax.ragged_all_to_all's docstring (axis of size 2).
    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    args = [np.array(a, np.int32) for a in (
        [[1, 2, 2], [3, 4, 0]],  # operand
        [[0, 0, 0, 0], [0, 0, 0, 0]],  # output
        [[0, 1], [0, 1]],  # input_offsets
        [[1, 2], [1, 1]],  # send_sizes
        [[0, 0], [1, 2]],  # output_offsets
        [[1, 1], [2, 1]])]  # recv_sizes
    args = [jax.device_put(a.reshape(-1), jax.sharding.NamedSharding(mesh, P("x"))) for a in args]

    def body(*a):
        return par.emulated_ragged_all_to_all(*a, axis_name="x")

    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x")))(*args)
    np.testing.assert_array_equal(np.asarray(out).reshape(2, 4), [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_ragged_alltoall_raises_on_cpu_before_compiling():
    params, x, _ = inputs()
    mesh = par.make_mesh(2, 4, 1)
    with pytest.raises(NotImplementedError, match="not implemented on XLA:CPU.*'allgather'.*'alltoall'"):
        par.moe_layer_parallel(params, x, config=config("topk_softmax"), mesh=mesh, strategy="ragged_alltoall",
                               training=False)


def test_ragged_alltoall_real_primitive_lowers_with_gradients():
    """The real lax.ragged_all_to_all path traces and lowers (forward + transpose) on CPU; only XLA:CPU's
    compiler lacks the op, so this is as far as CPU can check it."""
    params, x, _ = inputs()
    cfg = config("topk_softmax")
    mesh = par.make_mesh(2, 2, 2)

    def loss(p, x):
        y, aux = par.moe_layer_parallel(p, x, config=cfg, mesh=mesh, strategy="ragged_alltoall", training=True,
                                        ragged_all_to_all=lax.ragged_all_to_all)
        return scalar_loss(y, aux)

    with jax.set_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
    assert text.count("ragged_all_to_all") == 4  # dispatch + return, and their transposes


@pytest.mark.parametrize("change,message", [
    (dict(cfg=dict(num_experts=6)), r"num_experts=6 is not divisible by the expert axis 'expert' of size 4"),
    (dict(cfg=dict(d_hidden=12), mesh=(1, 1, 8)), r"moe.d_hidden=12 is not divisible by the model axis 'model'"),
    (dict(tokens=60), r"leading dimension of x \(60 tokens or sequences\) is not divisible by the 8 data shards"),
    (dict(strategy="gshard"), r"moe.parallel='gshard' is invalid: accepted values are \['allgather', 'alltoall'"),
    (dict(load_balance="group"), r"load_balance='group' is unknown: accepted values are \['global', 'local'\]"),
    (dict(kw=dict(model_axis="tensor")), r"model_axis: axis 'tensor' is not in the mesh; the mesh axes are"),
    (dict(kw=dict(data_axes=("data", "batch"))), r"data_axes: axis 'batch' is not in the mesh"),
    (dict(kw=dict(data_axes=("data",))), r"expert_axis='expert' must also be one of data_axes"),
    (dict(cfg=dict(load_balance_groups=2)), r"load_balance_groups=2 is not supported on a mesh with 8 data shards"),
    (dict(kw=dict(capacity_factor=0.0)), r"capacity_factor=0.0 is invalid"),
])
def test_impossible_layouts_raise_clear_errors(change, message):
    params, x, _ = inputs()
    cfg = config("topk_softmax", **change.get("cfg", {}))
    if "num_experts" in change.get("cfg", {}) or "d_hidden" in change.get("cfg", {}):
        # Shapes suffice: the layout check runs before anything is traced.
        params = jax.eval_shape(functools.partial(init_moe_params, config=cfg), jax.random.key(0))
    x = x[:change.get("tokens", T)]
    mesh = par.make_mesh(*change.get("mesh", (2, 4, 1)))
    with pytest.raises(ValueError, match=message):
        par.moe_layer_parallel(params, x, config=cfg, mesh=mesh, strategy=change.get("strategy", "allgather"),
                               load_balance=change.get("load_balance", "global"), training=False,
                               **change.get("kw", {}))
