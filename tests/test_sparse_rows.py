"""The row-sparse update of PEER's expert tables (grin_jax/train/sparse_rows.py, peer.table_update='sparse'): the
sinks' gradients are the tables' gradient rows; lazy AdamW against optax.adamw (every row retrieved: the same
update; otherwise the retrieved rows as dense AdamW's first step and the others untouched); the train step against
the dense one; on a (2, 2, 2) mesh equal to one device; trained, checkpointed and resumed by the trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import grin_jax.ffn.peer as peer
from grin_jax import models, presets
from grin_jax.train import sparse_rows, step as step_module, trainer


def peer_config(N=16, heads=2, top_k=4, table_update="sparse", **peer_options):
    config = presets.tiny("smoke", name="peer_rows")
    config.model.layout = "moe,peer"
    config.model.peer = dict(num_experts=N, heads=heads, top_k=top_k, d_key=16, chunk_tokens=32,
                             table_update=table_update, **peer_options)
    config.train.final_eval_batches = 2
    return config


def batch(B=4, S=32, seed=0):
    rng = np.random.default_rng(seed)
    return {"inputs": jnp.asarray(rng.integers(0, 256, (B, S)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, 256, (B, S)), jnp.int32),
            "loss_mask": jnp.ones((B, S), jnp.float32)}


@pytest.mark.parametrize("shared_experts,expert_type", [(True, "singleton"), (False, "singleton"), (True, "value")])
def test_sink_gradients_are_the_tables_gradient_rows(shared_experts, expert_type):
    """The sinks' gradients, summed per id (row_gradient) and scattered, equal jax.grad with respect to the tables
    (chunked forward, separate pools and the value tables included); the rest of the output is unchanged."""
    c = peer.PEERConfig(d_model=16, num_experts=8 * 8, heads=2, top_k=3, d_key=8, query_norm="none", chunk_tokens=5,
                        shared_experts=shared_experts, expert_type=expert_type, table_update="sparse")
    module = peer.PEERFFN(c, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    x = jax.random.normal(jax.random.key(1), (2, 7, 16))
    cot = jax.random.normal(jax.random.key(2), (2, 7, 16))
    names = list(module.row_sink_shapes(14))
    assert names == (["w_out"] if expert_type == "value" else ["w_in", "w_out"])

    def dense(state):
        return jnp.sum(nnx.merge(graphdef, state)(x)[0] * cot)

    def sparse(sinks):
        y, aux = nnx.merge(graphdef, state)(x, row_sinks=sinks)
        return jnp.sum(y * cot), aux["row_ids"]

    sinks = {name: jnp.zeros(s.shape, s.dtype) for name, s in module.row_sink_shapes(14).items()}
    (value, ids), sink_grads = jax.value_and_grad(sparse, has_aux=True)(sinks)
    assert abs(float(value) - float(dense(state))) < 1e-5
    table_grads = jax.grad(dense)(state)
    for name in names:
        expected = np.asarray(getattr(table_grads, name)[...]).reshape(-1, 16)
        unique, rows = sparse_rows.row_gradient(ids[name], sink_grads[name], expected.shape[0])
        got = np.zeros_like(expected)
        keep = np.asarray(unique) < expected.shape[0]
        got[np.asarray(unique)[keep]] = np.asarray(rows)[keep]
        assert np.sum(np.abs(expected).sum(-1) > 0) == keep.sum()     # the rows with a gradient are the ids
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_lazy_adamw_equals_optax_adamw_when_every_row_is_retrieved():
    """Three steps: each step's ids cover every row of the table (in a random order, with repeats whose gradients
    add up): lazy AdamW's table, mu and nu equal optax.adamw's on the dense gradient."""
    R, D, lr, wd = 6, 3, 0.1, 0.1
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((R, D)), jnp.float32)
    tx = optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd)
    dense_p, dense_state = table, tx.init(table)
    lazy_p, mu, nu = table, jnp.zeros((R, D)), jnp.zeros((R, D))
    for count in range(3):
        ids = np.concatenate([rng.permutation(R), rng.integers(0, R, 5)])
        rows = rng.standard_normal((ids.size, D)).astype(np.float32)
        grad = np.zeros((R, D), np.float32)
        np.add.at(grad, ids, rows)
        updates, dense_state = tx.update(jnp.asarray(grad), dense_state, dense_p)
        dense_p = dense_p + updates
        unique, summed = sparse_rows.row_gradient(jnp.asarray(ids), jnp.asarray(rows), R)
        lazy_p, mu, nu = sparse_rows.lazy_adamw_rows(lazy_p, mu, nu, unique, summed, learning_rate=lr, b1=0.9, b2=0.95,
                                                     eps=1e-8, weight_decay=wd, count=jnp.int32(count))
        np.testing.assert_allclose(np.asarray(lazy_p), np.asarray(dense_p), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(mu), np.asarray(dense_state[0].mu), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(nu), np.asarray(dense_state[0].nu), rtol=1e-6, atol=1e-7)


def _init(config):
    experiment = trainer.resolve(config, check_mesh=False)
    tx, _ = trainer.make_optimizer(config.train, experiment.model)
    graphdef, state = trainer.init_state(experiment, tx)
    return experiment, tx, graphdef, state


def test_train_step_against_the_dense_update():
    """Two steps (the first at learning rate 0: warm-up). N = 16 experts, 128 tokens x 2 heads x top-4: every row
    retrieved in every step, so the sparse steps equal the dense ones (loss, gradient norm, every parameter).
    N = 64^2: the second step moves exactly the rows it retrieved, as the dense step moves them (their moments
    agree: a row not retrieved in the first step has zero moments in both); the others keep their values (the
    dense step moves every row: weight decay), and only retrieved rows have optimizer state."""
    for N in (16, 64 ** 2):
        results = {}
        for update in ("dense", "sparse"):
            experiment, tx, graphdef, state = _init(peer_config(N=N, table_update=update))
            assert isinstance(tx, sparse_rows.RowSparseAdamW) == (update == "sparse")
            train_step = jax.jit(step_module.make_train_step(graphdef, tx))
            metrics = []
            for i in range(2):
                state, m = train_step(state, batch(seed=i))
                metrics.append(m)
            results[update] = (state, metrics)
        (dense_state, dense_metrics), (sparse_state, sparse_metrics) = results["dense"], results["sparse"]
        for a, b in zip(dense_metrics, sparse_metrics):
            for name in ("loss", "grad_norm"):
                assert abs(float(a[name]) - float(b[name])) < 1e-5 * max(1.0, abs(float(a[name]))), name
        dense_p, sparse_p = models.flatten_params(dense_state["params"]), models.flatten_params(sparse_state["params"])
        assert sorted(dense_p) == sorted(sparse_p)
        tables = {f"layers.1.mlp.{t}" for t in ("w_in", "w_out")}
        for name in dense_p:
            if N == 16 or name not in tables:
                np.testing.assert_allclose(np.asarray(sparse_p[name]), np.asarray(dense_p[name]), rtol=1e-5,
                                           atol=1e-6, err_msg=name)
        if N == 16:
            continue
        init_p = models.flatten_params(_init(peer_config(N=N))[3]["params"])
        mu = models.flatten_params(sparse_state["opt_state"]["rows"]["mu"])
        for name in sorted(tables):
            initial, sparse, dense = (np.asarray(p[name]) for p in (init_p, sparse_p, dense_p))
            moved = np.any(sparse != initial, axis=-1)
            assert 0 < moved.sum() < N // 4                                   # the rows retrieved in step 2
            np.testing.assert_allclose(sparse[moved], dense[moved], rtol=1e-5, atol=1e-6, err_msg=name)
            assert np.all(np.any(dense[~moved] != initial[~moved], axis=-1))  # dense AdamW moved every row
            with_state = np.any(np.asarray(mu[name]) != 0, axis=-1)
            assert np.all(with_state[moved]) and with_state.sum() < N // 2


def test_sparse_train_step_on_a_mesh_equals_one_device():
    """The compiled train step on a (2, 2, 2) mesh of fake devices (the tables' rows and their mu, nu sharded over
    the expert axis) equals one device's: loss and the updated tables."""
    from grin_jax import sharding
    config = peer_config(N=32 ** 2)
    experiment, tx, graphdef, state = _init(config)
    B, S = 8, config.data.seq_len
    host_batch = batch(B, S)
    ref_state, ref_metrics = jax.jit(step_module.make_train_step(graphdef, tx))(state, host_batch)
    _, _, _, state = _init(config)
    config.mesh.data, config.mesh.expert, config.mesh.model = 2, 2, 2
    mesh = sharding.make_mesh(config.mesh)
    shardings = trainer.state_shardings(experiment, tx, mesh)
    placed = jax.device_put(state, shardings)
    table_sharding = models.flatten_params(shardings["opt_state"]["rows"]["mu"])["layers.1.mlp.w_in"]
    assert table_sharding.spec[0] == "expert"
    sharded = jax.device_put(host_batch, sharding.batch_sharding(mesh))
    step = trainer.compile_train_step(graphdef, tx, placed, shardings, mesh, sharded)
    new_state, metrics = step(placed, sharded)
    assert abs(float(metrics["loss"]) - float(ref_metrics["loss"])) < 1e-5
    got, want = models.flatten_params(new_state["params"]), models.flatten_params(ref_state["params"])
    for name in ("layers.1.mlp.w_in", "layers.1.mlp.w_out", "layers.1.mlp.w_query"):
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-5, atol=1e-5, err_msg=name)


def test_trained_checkpointed_and_resumed(tmp_path):
    """The trainer runs a sparse-update PEER model 2 steps, checkpoints it (the rows' mu and nu in the optimizer
    state) and a rerun with more steps resumes from it; the config key is validated."""
    from kind_checks import train_steps
    config = peer_config(N=32 ** 2)
    last = train_steps(config, tmp_path)
    assert 0 < last["train/peer/usage"] <= 1
    config.train.steps = 3
    summary = trainer.train(config, str(tmp_path))
    assert summary["steps"] == 3
    with pytest.raises(ValueError, match=r"peer.table_update='rows' is invalid: accepted values are \['dense', 'sp"):
        peer.PEERConfig(d_model=16, num_experts=16, top_k=2, table_update="rows")
