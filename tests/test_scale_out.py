"""Scanned and rematerialised layers (models/lm.py, model.scan_layers / model.remat) against the unrolled model.

Every check compares against the plain Python loop over the layers: the loss, every gradient and every aux entry
to 1e-5, for the GRIN MoE, a period-2 layout, PEER with its query BatchNorm (running statistics written back from
inside the scan) and DS-MoE with attention experts.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grin_jax import models
from grin_jax.models.config import model_config_from

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import ds_moe_tiny  # noqa: E402
import grin_tiny  # noqa: E402
import peer_tiny  # noqa: E402

TOL = 1e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # LLVM does less; the numbers under test are XLA's


def model_config(name: str, **changes):
    module = {"grin": grin_tiny, "peer": peer_tiny, "ds_moe": ds_moe_tiny}[name]
    return model_config_from(module.get_config("smoke").model).replace(**{"num_layers": 4, **changes})


def tokens(config, batch=2, seq=16):
    return jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq)), jnp.int32)


def loss_grads_state(config, variables, tokens_BS):
    """(loss, aux, gradients, updated running statistics) of one training forward + backward, jitted."""
    graphdef, _ = models.abstract_init(config)
    params, model_state = models.split_variables(variables)

    def objective(params):
        logits, aux, new_state = models.apply_train(graphdef, params, model_state, tokens_BS, rng=jax.random.key(1))
        return models.cross_entropy(logits[:, :-1], tokens_BS[:, 1:]) + aux["aux_loss"], (aux, new_state)

    step = jax.jit(jax.value_and_grad(objective, has_aux=True)).lower(params).compile(FAST_COMPILE)
    (loss, (aux, new_state)), grads = step(params)
    return loss, aux, grads, new_state


def max_diff(a, b) -> float:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                for x, y in zip(leaves_a, leaves_b)), default=0.0)


CASES = {
    "grin": dict(),
    "grin_dense_moe": dict(layout="dense,moe"),
    "peer_batchnorm": dict(),     # layout 'moe,peer': period 2, running statistics
    "ds_moe_moa": dict(),         # DS-MoE FFN and attention experts
}


@pytest.mark.parametrize("case", list(CASES))
def test_scanned_and_rematerialised_layers_equal_the_unrolled_model(case):
    name = case.split("_")[0] if case.startswith(("grin", "peer")) else "ds_moe"
    config = model_config(name, **CASES[case])
    _, variables = models.init(config, 0)
    tokens_BS = tokens(config)
    reference = loss_grads_state(config, variables, tokens_BS)
    variants = [dict(scan_layers=True), dict(remat="full"), dict(scan_layers=True, remat="save_matmuls"),
                dict(scan_layers=True, remat="save_names", remat_names=("attention_out",))]
    for changes in variants if case == "grin" else [dict(scan_layers=True, remat="full")]:
        result = loss_grads_state(config.replace(**changes), variables, tokens_BS)
        for what, got, expected in zip(("loss", "aux", "gradients", "running statistics"), result, reference):
            assert max_diff(got, expected) < TOL, (case, changes, what)
    if case == "peer_batchnorm":  # the running statistics really moved (the scan wrote them back)
        assert max_diff(reference[3], models.split_variables(variables)[1]) > 1e-3


def test_scan_period_is_the_shortest_repeat_of_the_layers():
    cases = {"moe": 1, "dense,moe": 2, "moe,moe,dense,moe": 4}
    for layout, period in cases.items():
        model = nnx.eval_shape(lambda: models.DecoderLM(model_config("grin", layout=layout), rngs=nnx.Rngs(0)))
        assert models.lm.scan_period(model) == period, layout


def test_scanned_program_barely_grows_with_depth():
    """The lowered train-step program (StableHLO) of the scanned model is nearly the same size at 4 and 32 layers,
    while the unrolled one grows with the layers. (Compile times, measured: docs/scale_out.md.)"""

    def program_size(num_layers, scan):
        config = model_config("grin", num_layers=num_layers, scan_layers=scan)
        graphdef, abstract = models.abstract_init(config)
        tokens_BS = jax.ShapeDtypeStruct((2, 16), jnp.int32)

        def objective(params, tokens_BS):
            logits, aux = models.apply(graphdef, params, tokens_BS, training=True, rng=jax.random.key(1))
            return models.cross_entropy(logits[:, :-1], tokens_BS[:, 1:]) + aux["aux_loss"]

        return len(jax.jit(jax.grad(objective)).lower(abstract, tokens_BS).as_text().splitlines())

    # What the scanned program adds per layer is the stacking of the layer's variables and the unstacking of its
    # aux (a few ops per array); the unrolled one adds the whole layer, forward and backward.
    scanned = program_size(32, True) - program_size(4, True)
    unrolled = program_size(32, False) - program_size(4, False)
    print(f"lines added by 28 more layers: scanned {scanned}, unrolled {unrolled}")
    assert scanned < 0.15 * unrolled, (scanned, unrolled)


@pytest.mark.parametrize("changes,message", [
    (dict(remat="some"), r"model.remat='some' is invalid: accepted values are \['none', 'full', 'save_matmuls'"),
    (dict(remat="save_names"), r"model.remat_names=\(\) is invalid: accepted values are a non-empty tuple"),
    (dict(remat="full", remat_names=("ffn_out",)), r"model.remat_names=\('ffn_out',\) is invalid"),
    (dict(remat="save_names", remat_names=("qkv",)), r"model.remat_names=\('qkv',\) is invalid: .*'attention_out'"),
    (dict(scan_layers=1), r"model.scan_layers=1 is invalid: accepted values are True or False"),
])
def test_bad_layer_loop_settings_name_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        model_config("grin", **changes)


@pytest.mark.parametrize("name", ["peer", "ds_moe"])
def test_every_ffn_kind_on_an_fsdp_expert_model_mesh_equals_one_device(name):
    """PEER (expert tables [N, D] split along D over fsdp, rows over expert) with an MoE layer, and DS-MoE with
    attention experts, on data x fsdp x expert x model = (1, 2, 2, 2): loss and gradients of one device."""
    from kind_checks import assert_mesh_equals_one_device

    module = {"peer": peer_tiny, "ds_moe": ds_moe_tiny}[name]
    assert_mesh_equals_one_device(module.get_config("smoke"), (1, 2, 2, 2))
