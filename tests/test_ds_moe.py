"""DS-MoE (grin_jax.ffn.ds_moe): the MI loss at its known points, the dense-training layer against the explicit sum
over experts (values and gradients), the sparse inference modes against per-token numpy references, config
validation, and a model with layout='ds_moe' trained for two steps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grin_jax import models, presets
from grin_jax.ffn.ds_moe import DSMoEConfig, DSMoEFFN
from grin_jax.moe import experts as _experts
from grin_jax.moe.losses import mutual_information_loss

D, N, F = 16, 4, 8


def make_layer(**options):
    config = DSMoEConfig.from_section(dict(num_experts=N, d_hidden=F, **options), d_model=D)
    layer = DSMoEFFN(config, rngs=nnx.Rngs(params=0))
    # A larger router, so the scores are far from uniform and the sparse modes select different experts.
    layer.router[...] = layer.router[...] * 4.0
    return layer


def inputs(B=2, S=5, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, S, D), jnp.float32)


def numpy_experts(layer):
    return {k: np.asarray(v, np.float64) for k, v in layer.expert_params().items()}


def numpy_expert(p, i, x_D, activation):
    act = {"swiglu": lambda z: z / (1 + np.exp(-z)), "relu": lambda z: np.maximum(z, 0)}[activation]
    up = x_D @ p["w_up"][i]
    h = act(x_D @ p["w_gate"][i]) * up if "w_gate" in p else act(up)
    return h @ p["w_down"][i]


# ------------------------------------------------------------------------------------------------ MI loss
def test_mi_loss_known_points():
    T = 12
    uniform = jnp.full((T, N), 1.0 / N)
    collapsed = jax.nn.one_hot(jnp.zeros((T,), jnp.int32), N)
    balanced = jax.nn.one_hot(jnp.arange(T) % N, N)
    assert abs(float(mutual_information_loss(uniform))) < 1e-6
    assert abs(float(mutual_information_loss(collapsed))) < 1e-6
    np.testing.assert_allclose(float(mutual_information_loss(balanced)), -math.log(N), rtol=1e-6)
    # In [-log N, 0] for any routing.
    s = jax.nn.softmax(jax.random.normal(jax.random.key(0), (T, N)) * 3, axis=-1)
    assert -math.log(N) - 1e-6 <= float(mutual_information_loss(s)) <= 1e-6


def test_mi_loss_dead_expert_is_finite():
    """Exact zeros (a dead expert, one-hot rows): the loss and its gradient are finite (losses.py clips the log)."""
    T = 8
    dead = jax.nn.one_hot(jnp.arange(T) % (N - 1), N)  # expert N-1 never used, every row one-hot
    value, grad = jax.value_and_grad(mutual_information_loss)(dead)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    # Through a softmax whose probabilities underflow to exactly 0 in float32.
    logits = jnp.where(jnp.arange(N) == N - 1, -1e4, 0.0) * jnp.ones((T, 1))
    value, grad = jax.value_and_grad(lambda z: mutual_information_loss(jax.nn.softmax(z, axis=-1)))(logits)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


# ------------------------------------------------------------------------------------------------ dense training
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_dense_training_equals_explicit_sum(activation):
    layer = make_layer(activation=activation)
    x = inputs()
    graphdef, params = nnx.split(layer, nnx.Param)

    def layer_out(params, x):
        return nnx.merge(graphdef, params)(x, training=True)[0]

    def explicit(params, x):
        m = nnx.merge(graphdef, params)
        x_TD = x.reshape(-1, D)
        s = m.scores(x_TD)
        all_ETD = _experts.apply_experts_all(m.expert_params(), x_TD, activation=activation)
        return jnp.einsum("te,etd->td", s, all_ETD).reshape(x.shape)

    np.testing.assert_allclose(layer_out(params, x), explicit(params, x), rtol=1e-5, atol=1e-5)
    cot = jax.random.normal(jax.random.key(7), x.shape)
    g1 = jax.grad(lambda p, x: jnp.sum(layer_out(p, x) * cot), argnums=(0, 1))(params, x)
    g2 = jax.grad(lambda p, x: jnp.sum(explicit(p, x) * cot), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The router gets a gradient (full gradient, no top-k).
    assert float(jnp.max(jnp.abs(g1[0]["router"][...]))) > 0


def test_dense_layer_aux():
    layer = make_layer()
    y, aux = layer(inputs(), training=True)
    assert set(aux["losses"]) == {"mutual_information"}
    m = aux["metrics"]
    assert float(m["active_fraction"]) == 1.0 and m["expert_load"].shape == (N,)
    np.testing.assert_allclose(float(jnp.sum(m["expert_load"])), 1.0, rtol=1e-6)
    assert -math.log(N) <= float(aux["losses"]["mutual_information"]) <= 0.0
    assert layer.config.loss_weights == {"mutual_information": 5e-4}


# ------------------------------------------------------------------------------------------------ sparse inference
@pytest.mark.parametrize("backend", ["tiled", "dense"])
def test_top_k_with_all_experts_equals_dense(backend):
    layer = make_layer(inference="top_k", inference_top_k=N, backend=backend)
    x = inputs()
    sparse, aux = layer(x, training=False)
    dense, _ = layer(x, training=True)
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-5)
    assert float(aux["metrics"]["active_fraction"]) == 1.0


def reference(layer, x, select):
    """Per token: sum over select(S_t) of S_t[i] * e_i(x_t), in float64 numpy."""
    p = numpy_experts(layer)
    x_TD = np.asarray(x, np.float64).reshape(-1, D)
    s_TN = np.asarray(layer.scores(jnp.asarray(x).reshape(-1, D)), np.float64)
    y = np.zeros_like(x_TD)
    counts = []
    for t in range(len(x_TD)):
        chosen = select(s_TN[t])
        counts.append(len(chosen))
        for i in chosen:
            y[t] += s_TN[t, i] * numpy_expert(p, i, x_TD[t], layer.config.activation)
    return y.reshape(x.shape), np.mean(counts) / N


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_equals_reference(k):
    layer = make_layer(inference="top_k", inference_top_k=k, backend="tiled")
    x = inputs()
    y, aux = layer(x, training=False)
    want, active = reference(layer, x, lambda s: np.argsort(-s)[:k])  # scores not renormalised
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(aux["metrics"]["active_fraction"]), active, rtol=1e-6)
    assert active == k / N


@pytest.mark.parametrize("epsilon,slots", [(1.0, N), (0.5, N), (1.0, 2)])
def test_threshold_equals_reference(epsilon, slots):
    layer = make_layer(inference="threshold", inference_threshold=epsilon, inference_top_k=slots, backend="tiled")
    x = inputs(B=4, S=8)
    y, aux = layer(x, training=False)
    s = np.asarray(layer.scores(x.reshape(-1, D)))
    passing = np.sum(N * s > epsilon, axis=-1)
    m = aux["metrics"]
    np.testing.assert_allclose(float(m["threshold_active"]), passing.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m["threshold_overflow"]), np.mean(passing > slots), rtol=1e-6)
    # The reference: every expert over the threshold, capped at the `slots` largest (exact when no overflow).
    want, active = reference(layer, x, lambda s_t: [i for i in np.argsort(-s_t)[:slots] if N * s_t[i] > epsilon])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(m["active_fraction"]), active, rtol=1e-6)
    assert 0 < active < 1  # the threshold dropped some experts, kept others (the test routes far from uniform)
    if slots == N:
        assert float(m["threshold_overflow"]) == 0.0


def test_inference_dense_mode_is_training_computation():
    layer = make_layer()  # inference='dense'
    x = inputs()
    np.testing.assert_allclose(layer(x, training=False)[0], layer(x, training=True)[0], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("values,key", [
    (dict(num_experts=0), "ds_moe.num_experts"),
    (dict(num_experts=3), "ds_moe.d_hidden"),          # 4 * 16 not divisible by 3 with d_hidden=None
    (dict(d_hidden=0), "ds_moe.d_hidden"),
    (dict(activation="tanh"), "ds_moe.activation"),
    (dict(mi_coef=-1.0), "ds_moe.mi_coef"),
    (dict(inference="threshold_top_k"), "ds_moe.inference"),
    (dict(inference_top_k=9), "ds_moe.inference_top_k"),
    (dict(inference_threshold=-0.1), "ds_moe.inference_threshold"),
    (dict(backend="nope"), "ds_moe.backend"),
    (dict(top_k=2), "ds_moe: unknown key"),
])
def test_config_validation(values, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        DSMoEConfig.from_section(values, d_model=16)


def test_config_defaults_and_round_trip():
    c = DSMoEConfig.from_section({}, d_model=16)
    assert c.d_hidden == 4 * 16 // c.num_experts
    assert DSMoEConfig.from_section(c.to_section(), d_model=16) == c
    counts = DSMoEFFN.param_counts(c)
    assert counts["experts"] == (3 * 16 * 64, 3 * 16 * 64)  # parameter-matched to a dense swiglu FFN of width 64
    with pytest.raises(ValueError, match=r"ds_moe\.num_experts"):
        DSMoEFFN.check_mesh(c, {"expert": 3, "model": 1})
    with pytest.raises(ValueError, match=r"ds_moe\.d_hidden"):
        DSMoEFFN.check_mesh(c, {"expert": 1, "model": 3})
    DSMoEFFN.check_mesh(c, {"expert": 2, "model": 2})


# ------------------------------------------------------------------------------------------------ a model
def test_model_trains_two_steps(tmp_path):
    config = presets.tiny("smoke", name="ds_moe")
    config.model.layout = "ds_moe"
    config.model.ds_moe = dict(num_experts=4, d_hidden=32, mi_coef=0.01, inference="top_k", inference_top_k=2)
    model = models.model_config_from(config.model)
    assert model.layer_config(0)[1] == "ds_moe"
    from kind_checks import train_steps
    last = train_steps(config, tmp_path)
    mi = np.asarray(last["train/ds_moe/mutual_information"])
    assert np.all(np.isfinite(mi)) and np.all(mi <= 1e-6) and np.all(mi >= -math.log(4) - 1e-6)
    assert np.allclose(last["train/ds_moe/active_fraction"], 1.0)  # training is dense
    assert np.allclose(np.sum(last["train/ds_moe/expert_load"], axis=-1), 1.0, rtol=1e-5)


def test_sparsity_chosen_at_apply_time_on_one_checkpoint():
    """The same parameters under model configs that differ only in ds_moe.inference: top-K with K = N equals the
    dense mode; top-1 differs and reports active_fraction 1/N per layer."""
    def model(**inference):
        return models.ModelConfig.make(vocab_size=32, d_model=D, num_layers=2, num_heads=2, num_kv_heads=2,
                                       head_dim=8, max_seq_len=8, layout="ds_moe",
                                       ds_moe=dict(num_experts=N, d_hidden=F, backend="tiled", **inference))
    graphdef, params = models.init(model(), rng=0)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
    dense, _ = models.apply(graphdef, params, tokens)
    graphdef_all, _ = models.init(model(inference="top_k", inference_top_k=N), rng=0)
    graphdef_one, _ = models.init(model(inference="top_k", inference_top_k=1), rng=0)
    all_k, _ = models.apply(graphdef_all, params, tokens)
    one_k, aux = models.apply(graphdef_one, params, tokens)
    np.testing.assert_allclose(all_k, dense, rtol=1e-4, atol=1e-4)
    assert not np.allclose(one_k, dense, atol=1e-3)
    np.testing.assert_allclose(aux["metrics"]["ds_moe/active_fraction"], [1 / N, 1 / N])
