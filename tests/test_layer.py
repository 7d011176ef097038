"""The MoE layer (grin_jax/moe/layer.py): backends through the whole layer, composition, input jitter, config
validation.

Axes: T tokens, D model, F expert hidden, E experts, K slots.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grin_jax.moe import dispatch, layer, losses, routing
from grin_jax.moe.layer import MoEConfig

T, D, F, E, K = 128, 16, 32, 8, 2


def make_config(**overrides):
    fields = dict(num_experts=E, top_k=K, d_model=D, d_hidden=F)
    fields.update(overrides)
    if fields.get("router", "sparsemixer_v2") == "sparsemixer_v2":
        fields.setdefault("router_options", {"jitter_eps": 0.5})
    return MoEConfig(**fields)


def _value_and_grads(params, x, cot, rng, *, config):
    """Layer output, aux, and the gradients of sum(y * cot) + load_balance + z_loss w.r.t. (params, x)."""
    def loss(params, x):
        y, aux = layer.moe_layer(params, x, config=config, training=True, rng=rng)
        return jnp.sum(y * cot) + aux["losses"]["load_balance_loss"] + 1e-3 * aux["losses"]["z_loss"], (y, aux)
    grads, (y, aux) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, aux, grads


@functools.partial(jax.jit, static_argnames="config")
def all_backends_value_and_grads(params, x, cot, rng, *, config):
    """{backend: (y, aux, grads)}, every backend in one compilation (the routing is shared: same rng)."""
    return {backend: _value_and_grads(params, x, cot, rng, config=dataclasses.replace(config, backend=backend))
            for backend in dispatch.BACKENDS}


def inputs(seed=0):
    rs = np.random.RandomState(seed)
    return (jnp.asarray(rs.randn(T, D), jnp.float32), jnp.asarray(rs.randn(T, D), jnp.float32))


@pytest.mark.parametrize("router", sorted(n for n, r in routing.ROUTERS.items() if r.dispatch == "token_choice"))
def test_layer_every_backend_equals_dense(router):
    """Training, under jit: outputs, aux losses and gradients w.r.t. x, the router and every expert weight equal
    the dense backend's (capacity with C = M: nothing dropped)."""
    config = make_config(router=router, capacity_factor=float(E))
    params = layer.init_moe_params(jax.random.key(0), config)
    x, cot = inputs()
    results = all_backends_value_and_grads(params, x, cot, jax.random.key(1), config=config)
    y_ref, aux_ref, grads_ref = results["dense"]
    tol = dict(rtol=2e-5, atol=2e-5)
    for backend in dispatch.BACKENDS:
        y, aux, grads = results[backend]
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), err_msg=backend, **tol)
        for name in ("load_balance_loss", "z_loss"):
            np.testing.assert_allclose(float(aux["losses"][name]), float(aux_ref["losses"][name]), rtol=1e-6,
                                       err_msg=backend)
        flat, _ = jax.tree_util.tree_flatten_with_path(grads)
        for (path, g), g_ref in zip(flat, jax.tree_util.tree_leaves(grads_ref)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), err_msg=backend + jax.tree_util.keystr(path),
                                       **tol)
        assert float(aux["metrics"]["dropped_fraction"]) == 0.0
    # Non-vacuous: the router gets gradient (at eps = 0.5 most tokens keep >= 2 candidates), every expert is used.
    assert np.abs(np.asarray(grads_ref[0]["router"])).max() > 1e-3
    assert np.all(np.asarray(aux_ref["metrics"]["expert_load"]) > 0)
    assert float(aux_ref["metrics"]["router_grad_fraction"]) > 0.5


def test_layer_composition_with_explicit_noise():
    """moe_layer = router matmul -> sparsemixer_v2 (weights include c) -> moe_ffn; aux = the loss functions."""
    config = make_config(backend="dense", load_balance_groups=4)
    params = layer.init_moe_params(jax.random.key(2), config)
    x, _ = inputs(2)
    rs = np.random.RandomState(2)
    noise = {"gumbel_TKE": jnp.asarray(rs.gumbel(size=(T, K, E)), jnp.float32),
             "uniform_TK": jnp.asarray(rs.rand(T, K), jnp.float32)}

    @jax.jit
    def both(params, x, noise):
        y, aux = layer.moe_layer(params, x, config=config, training=True, noise=noise)
        logits = x @ params["router"]
        r = routing.route("sparsemixer_v2", logits, top_k=K, training=True, options={"jitter_eps": 0.5}, noise=noise)
        y_ref, _ = dispatch.moe_ffn(params["experts"], x, r.expert_ids, r.weights, activation="swiglu",
                                    backend="dense")
        lb = losses.load_balance_loss(r.expert_ids, r.probs, num_groups=4)
        return y, aux, r, y_ref, lb, losses.router_z_loss(logits)

    y, aux, r, y_ref, lb, z_loss = both(params, x, noise)
    assert np.mean(np.asarray(r.weights) < 0.34) > 0.1  # c = 0.3333 occurs: experts see the scaled weight
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(aux["losses"]["load_balance_loss"]), float(lb), rtol=1e-6)
    np.testing.assert_allclose(float(aux["losses"]["z_loss"]), float(z_loss), rtol=1e-6)
    metrics = aux["metrics"]
    for key in ("expert_load", "max_load", "router_entropy", "router_grad_fraction", "dropped_fraction"):
        assert key in metrics, key
    np.testing.assert_allclose(np.asarray(metrics["expert_load"]),
                               np.bincount(np.asarray(r.expert_ids).ravel(), minlength=E) / (T * K), rtol=1e-6)


def test_input_jitter_applied_once_in_training_only():
    """Training: the router and the experts see x * U(1-eps, 1+eps) once (key: first half of split(rng)).
    Eval: no jitter."""
    eps = 0.2
    config = make_config(backend="dense", input_jitter=eps, router="topk_softmax")
    plain = dataclasses.replace(config, input_jitter=0.0)
    params = layer.init_moe_params(jax.random.key(3), config)
    x, _ = inputs(3)
    rng = jax.random.key(4)

    @jax.jit
    def run(params, x, rng):
        y = layer.moe_layer(params, x, config=config, training=True, rng=rng)[0]
        x_jittered = x * jax.random.uniform(jax.random.split(rng)[0], x.shape, jnp.float32, 1 - eps, 1 + eps)
        y_once = layer.moe_layer(params, x_jittered, config=plain, training=True, rng=rng)[0]
        y_none = layer.moe_layer(params, x, config=plain, training=True, rng=rng)[0]
        y_eval = layer.moe_layer(params, x, config=config, training=False, rng=rng)[0]
        return y, x_jittered, y_once, y_none, y_eval

    y, x_jittered, y_once, y_none, y_eval = run(params, x, rng)
    ratio = np.asarray(x_jittered / x)
    assert ratio.min() >= 1 - eps and ratio.max() <= 1 + eps and ratio.std() > eps / 3  # one U(1-eps, 1+eps)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_once), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(y) - np.asarray(y_none)).max() > 1e-3
    np.testing.assert_allclose(np.asarray(y_eval), np.asarray(y_none), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="input_jitter > 0 needs rng"):
        layer.moe_layer(params, x, config=config, training=True)


@pytest.mark.parametrize("field, value, message", [
    ("num_experts", 0, r"num_experts=0 is invalid: accepted values are integers >= 1"),
    ("top_k", 0, r"top_k=0 is invalid: accepted values are integers >= 1"),
    ("top_k", 9, r"top_k=9 is invalid: accepted values are 1..num_experts=8"),
    ("d_model", 16.0, r"d_model=16.0 is invalid: accepted values are integers >= 1"),
    ("d_hidden", -1, r"d_hidden=-1 is invalid"),
    ("load_balance_groups", 0, r"load_balance_groups=0 is invalid"),
    ("router", "gshard", r"router='gshard' is invalid: accepted values are .*'sparsemixer_v2', 'topk_softmax'"),
    ("activation", "tanh", r"activation='tanh' is invalid: accepted values are .*'swiglu'"),
    ("backend", "megablocks", r"backend='megablocks' is unknown: accepted values are .*'dense'"),
    ("router_options", {"jitter_eps": -0.01}, r"jitter_eps=-0.01 is invalid: accepted values are finite numbers >= 0"),
    ("router_options", {"jitter_eps": float("nan")}, r"jitter_eps=nan is invalid"),
    ("router_options", {"eps": 0.1}, r"router_options \['eps'\] are unknown for router='sparsemixer_v2'"),
    ("input_jitter", 1.0, r"input_jitter=1.0 is invalid: accepted values are finite numbers in \[0.0, 1.0\)"),
    ("input_jitter", float("inf"), r"input_jitter=inf is invalid"),
    ("capacity_factor", 0.0, r"capacity_factor=0.0 is invalid: accepted values are finite numbers in \(0.0, inf\)"),
    ("load_balance_coef", float("nan"), r"load_balance_coef=nan is invalid"),
    ("router_dtype", "float16", r"router_dtype='float16' is invalid: accepted values are \['float32'"),
])
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        make_config(**{field: value})


def test_layer_bad_input_shape():
    config = make_config()
    params = layer.init_moe_params(jax.random.key(0), config)
    with pytest.raises(ValueError, match=r"x must be \[tokens, d_model=16\]"):
        layer.moe_layer(params, jnp.zeros((4, 8)), config=config, training=False)
    with pytest.raises(ValueError, match=r"x must be \[tokens, d_model=16\]"):
        layer.moe_layer(params, jnp.zeros((2, 2, 4, 16)), config=config, training=False)
    x = jax.random.normal(jax.random.key(1), (2, 4, 16))  # [B, S, D] = the flattened tokens
    np.testing.assert_array_equal(np.asarray(layer.moe_layer(params, x, config=config, training=False)[0]),
                                  np.asarray(layer.moe_layer(params, x.reshape(8, 16), config=config,
                                                             training=False)[0]).reshape(2, 4, 16))
    with pytest.raises(ValueError, match="rng"):
        layer.moe_layer(params, jnp.zeros((4, 16)), config=config, training=True)
