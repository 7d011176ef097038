"""DS-MoE (grin_jax.ffn.ds_moe): the MI loss at its known points, the dense-training layer against the explicit sum
over experts (values and gradients), the sparse inference modes against per-token numpy references, config
validation, and a model with layout='ds_moe' trained for two steps. Padding (the token mask) counts in neither the
MI loss nor the metrics; on a data=4 mesh of fake CPU devices (conftest.py) the MI loss is over the global batch."""

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


def test_mi_loss_mask_equals_the_real_tokens_alone():
    """With a mask: the loss of the rows whose mask is > 0 alone; padded rows get exactly zero gradient; an all-ones
    mask is no mask; every token masked gives 0 with a finite (zero) gradient."""
    T = 10
    s = jax.nn.softmax(jax.random.normal(jax.random.key(3), (T, N)) * 3, axis=-1)
    mask = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 0, 1, 1], jnp.float32)
    real = np.asarray(mask) > 0
    value, grad = jax.value_and_grad(mutual_information_loss)(s, mask)
    np.testing.assert_allclose(float(value), float(mutual_information_loss(s[real])), rtol=1e-6, atol=1e-7)
    grad_real = jax.grad(mutual_information_loss)(s[real])
    np.testing.assert_allclose(np.asarray(grad)[real], np.asarray(grad_real), rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad)[~real] == 0.0)
    assert abs(float(value) - float(mutual_information_loss(s))) > 1e-3  # the padding would have counted
    np.testing.assert_allclose(float(mutual_information_loss(s, jnp.ones((T,)))), float(mutual_information_loss(s)),
                               rtol=1e-6)
    value, grad = jax.value_and_grad(mutual_information_loss)(s, jnp.zeros((T,)))
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


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


def padded_inputs():
    """(x [2, 8, D], mask [2, 8]): row 0 padded after 5 tokens, row 1 after 6 (padding at the ends, as packing)."""
    x = inputs(B=2, S=8, seed=4)
    mask = jnp.asarray([[1] * 5 + [0] * 3, [1] * 6 + [0] * 2], jnp.float32)
    return x, mask


@pytest.mark.parametrize("inference", ["dense", "threshold"])
def test_padding_counts_in_neither_the_mi_loss_nor_the_metrics(inference):
    """The layer with a token mask gives the MI loss, the gradient of a training objective (MI loss + a masked
    output term, as the model's masked cross-entropy) w.r.t. the layer's parameters (router and experts), and the
    metrics of the same layer on the real tokens alone (the padded tokens dropped: the [1, 11] sequence of the real
    ones; the layer is per token), in training and in sparse inference (values and metrics); other values on the
    padded tokens change nothing (nor any real token's output); without the mask the numbers differ."""
    layer = make_layer(inference=inference, inference_threshold=1.0, inference_top_k=2, backend="tiled")
    graphdef, params = nnx.split(layer, nnx.Param)
    x, mask = padded_inputs()
    real = np.asarray(mask) > 0
    x_real = x[real][None]  # [1, 11, D]
    cot = jax.random.normal(jax.random.key(8), x.shape)
    cot_real = cot[real][None]

    def run(params, x, mask, training=True):
        return nnx.merge(graphdef, params)(x, training=training, token_mask_BS=mask)

    def objective(params, x, mask, cot):
        y, aux = run(params, x, mask)
        out = jnp.sum(y * cot) if mask is None else jnp.sum(y * cot * mask[..., None])
        return aux["losses"]["mutual_information"] + 0.1 * out, aux["losses"]["mutual_information"]

    (value, mi), grads = jax.value_and_grad(objective, has_aux=True)(params, x, mask, cot)
    (value_real, mi_real), grads_real = jax.value_and_grad(objective, has_aux=True)(params, x_real, None, cot_real)
    np.testing.assert_allclose(float(mi), float(mi_real), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(value), float(value_real), rtol=1e-6, atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_real)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    for name in ("router", "w_up"):
        assert float(jnp.max(jnp.abs(grads[name][...]))) > 1e-3, name
    mi_grad = jax.grad(lambda p: objective(p, x, mask, cot)[1])(params)["router"][...]
    mi_grad_real = jax.grad(lambda p: objective(p, x_real, None, cot_real)[1])(params)["router"][...]
    np.testing.assert_allclose(np.asarray(mi_grad), np.asarray(mi_grad_real), rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(mi_grad))) > 1e-3  # the MI loss's own gradient reaches the router

    # Other values on the padded tokens: nothing changes.
    x_other = jnp.where(mask[..., None] > 0, x, 5.0 * jax.random.normal(jax.random.key(9), x.shape))
    (value_o, _), grads_o = jax.value_and_grad(objective, has_aux=True)(params, x_other, mask, cot)
    assert float(value_o) == pytest.approx(float(value), rel=1e-6, abs=1e-6)
    for a, b in zip(jax.tree.leaves(grads_o), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Without the mask the padded tokens count: the test can tell.
    assert abs(float(objective(params, x_other, None, cot)[1]) - float(mi)) > 1e-3

    for training in (True, False):  # the outputs on the real tokens and the metrics (training; sparse inference)
        y, aux = run(params, x, mask, training)
        y_real, aux_real = run(params, x_real, None, training)
        y_o, aux_o = run(params, x_other, mask, training)
        np.testing.assert_allclose(np.asarray(y)[real], np.asarray(y_real)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(y_o)[real], np.asarray(y)[real], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(float(aux["losses"]["mutual_information"]),
                                   float(aux_real["losses"]["mutual_information"]), rtol=1e-6, atol=1e-7)
        assert set(aux["metrics"]) == set(aux_real["metrics"])
        for key, v in aux["metrics"].items():
            np.testing.assert_allclose(np.asarray(v), np.asarray(aux_real["metrics"][key]), rtol=1e-5, atol=1e-7,
                                       err_msg=key)
            np.testing.assert_allclose(np.asarray(aux_o["metrics"][key]), np.asarray(v), rtol=1e-5, atol=1e-7,
                                       err_msg=key)
        _, aux_all = run(params, x_other, None, training)
        load, load_all = aux["metrics"]["expert_load"], aux_all["metrics"]["expert_load"]
        assert not np.allclose(np.asarray(load_all), np.asarray(load), atol=1e-3)
    if inference == "threshold":
        assert 0 < float(aux["metrics"]["active_fraction"]) < 1  # the last loop pass: sparse inference
    _, aux_none = run(params, x, jnp.zeros_like(mask))  # every token masked: zeros, finite
    assert float(aux_none["losses"]["mutual_information"]) == 0.0
    assert all(np.all(np.asarray(v) == 0) for k, v in aux_none["metrics"].items() if k != "active_fraction")


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


# ------------------------------------------------------------------------------------------------ a data=4 mesh
def test_mi_loss_on_a_data_parallel_mesh_is_over_the_global_batch():
    """A model with layout='ds_moe' through the trainer's pieces (resolve, init_state, the train step's loss
    function; state_shardings and batch_sharding on a data=4 mesh of fake CPU devices, 2 rows per device, padding in
    rows of three shards) equals one device: the MI loss (aux 'ds_moe/mutual_information') and its gradient w.r.t.
    every parameter (the routers and experts included) to 1e-6, the training loss and its gradient, and the compiled
    train step's metrics. The shards see different tokens (shard k's rows are drawn from their own quarter of the
    vocabulary), so the per-shard version (each shard's own usage p, then the mean over the shards, as a shard_map
    without a collective would compute) differs from the global one by far more than the tolerance: an
    implementation taking p per shard fails this test."""
    from grin_jax import sharding
    from grin_jax.train import step as step_module
    from grin_jax.train import trainer
    config = presets.tiny("smoke", name="ds_moe")
    config.model.layout = "ds_moe"
    config.model.ds_moe = dict(num_experts=4, d_hidden=32, mi_coef=0.01)
    experiment = trainer.resolve(config, check_mesh=False)
    tx, _ = trainer.make_optimizer(config.train, experiment.model)
    graphdef, state = trainer.init_state(experiment, tx)
    B, S, shards = 8, 16, 4
    rng = np.random.default_rng(0)
    quarter = experiment.model.vocab_size // shards
    inputs_BS = np.concatenate([rng.integers(k * quarter, (k + 1) * quarter, (B // shards, S))
                                for k in range(shards)]).astype(np.int32)
    mask = np.ones((B, S), np.float32)
    mask[1, S - 5:] = 0.0
    mask[4, S // 2:] = 0.0
    mask[7, S - 1:] = 0.0
    batch = {"inputs": inputs_BS, "targets": rng.integers(0, 256, (B, S)).astype(np.int32), "loss_mask": mask}
    loss_fn = step_module.make_loss_fn(graphdef)
    key = jax.random.fold_in(state["rng"], state["step"])

    def mi_loss(params, batch):
        return loss_fn(params, batch, key)[1][1]["losses"]["ds_moe/mutual_information"]

    def numbers(params, batch):
        (total, (_, aux, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        mi, mi_grads = jax.value_and_grad(mi_loss)(params, batch)
        return total, grads, mi, mi_grads, aux["metrics"]

    ref = jax.jit(numbers)(state["params"], batch)
    config.mesh.data, config.mesh.expert, config.mesh.model = shards, 1, 1
    mesh = sharding.make_mesh(config.mesh)
    shardings = trainer.state_shardings(experiment, tx, mesh)
    placed = jax.device_put(state, shardings)
    sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
    assert sharded["inputs"].sharding.shard_shape((B, S)) == (B // shards, S)
    with jax.set_mesh(mesh):
        got = jax.jit(numbers)(placed["params"], sharded)

    mi_grads = models.flatten_params(ref[3])
    for name in ("layers.0.mlp.router", "layers.1.mlp.router", "layers.0.mlp.w_up", "layers.0.mlp.w_down"):
        assert np.max(np.abs(np.asarray(mi_grads[name]))) > 1e-4, name  # layer 0's experts: via layer 1's router
    assert abs(float(got[2]) - float(ref[2])) < 1e-6
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref[3]), jax.tree.leaves(got[3])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    assert abs(float(got[0]) - float(ref[0])) < 1e-5
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref[1]), jax.tree.leaves(got[1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))

    # The per-shard version differs: each shard's rows alone on one device, averaged over the shards.
    rows = B // shards
    per_shard = [jax.jit(jax.value_and_grad(mi_loss))(state["params"], {k: v[i * rows:(i + 1) * rows]
                                                                        for k, v in batch.items()})
                 for i in range(shards)]
    local_mi = np.mean([float(v) for v, _ in per_shard])
    local_router = np.mean([np.asarray(models.flatten_params(g)["layers.0.mlp.router"]) for _, g in per_shard],
                           axis=0)
    assert abs(local_mi - float(ref[2])) > 1e-2, (local_mi, float(ref[2]))
    assert np.max(np.abs(local_router - np.asarray(mi_grads["layers.0.mlp.router"]))) > 1e-3

    # The compiled train step on the mesh (it donates `placed`: last) reports the same losses and usage.
    step = trainer.compile_train_step(graphdef, tx, placed, shardings, mesh, sharded,
                                      compiler_options={"xla_backend_optimization_level": 0})
    _, metrics = step(placed, sharded)
    assert abs(float(metrics["total_loss"]) - float(ref[0])) < 1e-5
    assert abs(float(metrics["ds_moe/mutual_information"]) - float(ref[2])) < 1e-6
    for name in ("ds_moe/expert_load", "ds_moe/router_entropy", "ds_moe/threshold_active"):
        np.testing.assert_allclose(np.asarray(metrics[name]), np.asarray(ref[4][name]), rtol=0, atol=1e-6,
                                   err_msg=name)
        np.testing.assert_allclose(np.asarray(got[4][name]), np.asarray(ref[4][name]), rtol=0, atol=1e-6,
                                   err_msg=name)
