"""Gradient accumulation (train.grad_accum_steps, train/step.py) against the whole batch in one step.

With M micro-batches the step must give the whole batch's loss, aux losses and gradients: the cross-entropy is
weighted by each micro-batch's share of the real tokens (rows padded differently here), and the aux losses that
need the whole batch (the MoE load balance's expert load, DS-MoE's mutual information over the FFN and the
attention experts) get its statistics from the forward-only first pass. Routers without noise (top-k softmax, no
jitter; DS-MoE's softmax) so that the micro-batches route exactly as the whole batch. Then everything at once on
an fsdp x expert x model mesh of 8 fake devices with scanned, rematerialised layers.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grin_jax import models, sharding
from grin_jax.models.config import model_config_from
from grin_jax.train import step as _step
from grin_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import ds_moe_tiny  # noqa: E402
import grin_tiny  # noqa: E402

TOL = 1e-5
B, S = 8, 16
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def grin_config(**changes):
    """grin_tiny:smoke, 2 layers, the top-2 softmax router without jitter (deterministic routing), both aux losses
    weighted strongly enough to matter in the gradient."""
    c = model_config_from(grin_tiny.get_config("smoke").model)
    moe = dict(router="topk_softmax", router_options={"renormalize": True}, input_jitter=0.0,
               load_balance_coef=0.1, z_loss_coef=0.01)
    return c.replace(**{"num_layers": 2, "moe": moe, **changes})


def ds_moe_config(**changes):
    """ds_moe_tiny:smoke (DS-MoE FFN + attention experts, MI loss on both), 2 layers, MI weight 0.1."""
    c = model_config_from(ds_moe_tiny.get_config("smoke").model)
    return c.replace(**{"num_layers": 2, "ds_moe": {"mi_coef": 0.1}, "moa": {**c.moa.to_section(), "mi_coef": 0.1},
                        **changes})


def batch(config):
    rng = np.random.default_rng(0)
    mask = np.ones((B, S), np.float32)
    for row in range(B):  # a different amount of padding in every row: micro-batches hold unequal token counts
        mask[row, S - row:] = 0.0
    return {"inputs": rng.integers(0, config.vocab_size, (B, S), dtype=np.int32),
            "targets": rng.integers(0, config.vocab_size, (B, S), dtype=np.int32), "loss_mask": mask}


def one_step(config, accum, *, mesh_shape=None, variables=None):
    """(gradient, metrics) of one train step with plain SGD at rate 1 (the update is minus the gradient)."""
    if variables is None:
        variables = models.init(config, 0)[1]
    graphdef, _ = models.abstract_init(config)
    params, model_state = models.split_variables(variables)
    tx = optax.sgd(1.0)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": jax.random.key(0)}
    if model_state:
        state["model_state"] = model_state
    host = batch(config)
    before = jax.device_get(params)  # the step donates its state
    if mesh_shape is None:
        step = jax.jit(_step.make_train_step(graphdef, tx, accum)).lower(state, host).compile(FAST_COMPILE)
        new_state, metrics = step(state, host)
    else:
        mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
        shardings = sharding.state_shardings(state, mesh)
        state = jax.device_put(state, shardings)
        spec = _step.batch_spec(B, S, document_attention=False)
        step = _step.compile_train_step(graphdef, tx, state, shardings, mesh, spec, grad_accum_steps=accum,
                                        compiler_options=FAST_COMPILE)
        new_state, metrics = step(state, sharding.global_batch(host, mesh, B))
    grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), before, jax.device_get(new_state["params"]))
    return grads, jax.device_get(metrics)


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


METRICS = {"grin": ("loss", "total_loss", "aux_loss", "grad_norm", "moe/load_balance_loss", "moe/z_loss",
                    "moe/expert_load"),
           "ds_moe": ("loss", "total_loss", "aux_loss", "grad_norm", "ds_moe/mutual_information",
                      "moa/mutual_information")}


@pytest.mark.parametrize("name", ["grin", "ds_moe"])
def test_accumulated_micro_batches_equal_the_whole_batch(name, monkeypatch):
    config = grin_config() if name == "grin" else ds_moe_config()
    variables = models.init(config, 0)[1]
    grads, metrics = one_step(config, 1, variables=variables)
    accumulated, accumulated_metrics = one_step(config, 4, variables=variables)
    assert max_diff(accumulated, grads) < TOL
    for key in METRICS[name]:
        assert max_diff(accumulated_metrics[key], metrics[key]) < TOL, key
    # The check can fail: without the whole batch's statistics (each micro-batch's own expert load / usage) the
    # aux losses' gradients differ.
    monkeypatch.setattr(_step, "_whole_batch_statistics", lambda *args: None)
    local, _ = one_step(config, 4, variables=variables)
    assert max_diff(local, grads) > 10 * TOL


def test_fsdp_expert_model_mesh_scanned_rematerialised_and_accumulated_equal_one_device():
    """data x fsdp x expert x model = (1, 2, 2, 2), layers scanned with remat='full', 2 micro-batches, against one
    device, unrolled, without remat, the whole batch at once: loss, aux and gradients to 1e-5."""
    config = grin_config()
    variables = models.init(config, 0)[1]
    grads, metrics = one_step(config, 1, variables=variables)
    everything = config.replace(scan_layers=True, remat="full")
    result, result_metrics = one_step(everything, 2, mesh_shape=(1, 2, 2, 2), variables=variables)
    assert max_diff(result, grads) < TOL
    for key in METRICS["grin"]:
        assert max_diff(result_metrics[key], metrics[key]) < TOL, key


def test_training_with_accumulation_runs(tmp_path):
    """The trainer with train.grad_accum_steps = 2 trains, checkpoints and evaluates."""
    config = grin_tiny.get_config("smoke")
    config.train.grad_accum_steps = 2
    config.train.steps = 4
    config.train.checkpoint_every = 2
    config.train.eval_every = 0
    config.mesh.data = 1
    workdir = str(tmp_path / "run")
    summary = trainer.train(config, workdir)
    assert summary["steps"] == 4 and np.isfinite(summary["validation_loss"])


@pytest.mark.parametrize("change,message", [
    (dict(grad_accum_steps=0), r"train.grad_accum_steps=0 is invalid: accepted values are integers >= 1"),
    (dict(grad_accum_steps=3), r"train.batch_size=\d+ is not divisible by train.grad_accum_steps=3"),
    (dict(grad_accum_steps=4, batch_size=8, mesh_data=4),
     r"train.batch_size=8 is not divisible by train.grad_accum_steps=4 x the 4 data shards"),
    (dict(grad_accum_steps=2, load_balance_groups=2), r"model.moe.load_balance_groups=2 is invalid with it"),
])
def test_bad_accumulation_settings_name_the_key(change, message):
    config = grin_tiny.get_config("smoke")
    config.mesh.data = change.pop("mesh_data", 1)
    if "load_balance_groups" in change:
        config.model.moe.load_balance_groups = change.pop("load_balance_groups")
    for key, value in change.items():
        config.train[key] = value
    with pytest.raises(ValueError, match=message):
        trainer.resolve(config)
