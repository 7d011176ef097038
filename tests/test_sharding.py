"""grin_jax.sharding and the sharded trainer on 8 fake CPU devices (conftest.py).

The GRIN model (SparseMixer-v2 with input jitter, training=True, the same rng) trained with the trainer's own
pieces (init_state, compile_train_step) on meshes (data, fsdp, expert, model) = (8,1,1,1), (2,1,4,1), (2,1,2,2),
(1,1,1,8), (1,8,1,1), (1,2,2,2) gives the single-device numbers: the loss, the gradient, the MoE metrics and three AdamW steps. Parameter shardings
against a golden table; a checkpoint moves between meshes; impossible layouts fail before compiling.

Compile time dominates: one train-step compile per mesh (plus one sharded init), on a one-layer smoke model,
compiled with XLA's backend optimisation level 0 (the SPMD partitioning under test is the same; LLVM does less).
"""

import os
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from grin_jax import models, sharding
from grin_jax.train import checkpoint as _checkpoint
from grin_jax.train import optim, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import grin_tiny  # noqa: E402

assert jax.device_count() >= 8, "these tests need 8 (fake) CPU devices: see tests/conftest.py"

B, S = 8, 16
STEPS = 3
TOL = 1e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0}
MESHES = {"data": (8, 1, 1, 1), "expert_x_data": (2, 1, 4, 1), "model_x_expert_x_data": (2, 1, 2, 2),
          "model": (1, 1, 1, 8), "fsdp": (1, 8, 1, 1), "fsdp_x_expert_x_model": (1, 2, 2, 2)}
ONE = (1, 1, 1, 1)


def small_config(mesh=(1, 1, 1, 1), **model):
    """grin_tiny:smoke with one layer and 8 heads (divisible by every model axis here), B x S = 8 x 16."""
    c = grin_tiny.get_config("smoke")
    c.model.num_layers = 1
    c.model.num_heads = 8
    c.model.head_dim = 8
    c.model.moe.router_options.jitter_eps = 0.3  # more tokens keep two candidates: more router gradient
    for key, value in model.items():
        target = c.model if key in c.model and key != "moe" else c.model.moe  # MoE keys go to the moe section
        target[key] = value
    c.data.seq_len = S
    c.train.batch_size = B
    c.train.clip_norm = 0.0  # plain AdamW: after step 1 its first moment is (1 - b1) * gradient (read back below)
    c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.model = mesh
    return c


def optimizer(config):
    tc = config.train
    tx, _ = optim.make_optimizer(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps,
                                 total_steps=tc.steps, weight_decay=tc.weight_decay, b1=tc.b1, b2=tc.b2,
                                 clip_norm=tc.clip_norm, final_lr_fraction=tc.final_lr_fraction)
    return tx


def host_batch():
    rng = np.random.default_rng(0)
    mask = np.ones((B, S), np.float32)
    mask[:, -3:] = 0.0
    return {"inputs": rng.integers(0, 259, (B, S), dtype=np.int32),
            "targets": rng.integers(0, 259, (B, S), dtype=np.int32), "loss_mask": mask}


def adam_grads(opt_state, b1):
    """The gradient of the first step: Adam's first moment starts at 0, so after one step mu = (1 - b1) * g."""
    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    return jax.tree.map(lambda m: np.asarray(m) / (1.0 - b1), models.flatten_params(adam[0].mu))


def run(mesh_shape, *, init_state=None):
    """Train STEPS steps on `mesh_shape`; init_state: a host copy of the state to start from (else the
    trainer's init_state: eager on one device, a sharded jit on more)."""
    config = small_config(mesh_shape)
    experiment = trainer.resolve(config)
    mesh = sharding.make_mesh(config.mesh)
    tx = optimizer(config)
    shardings = trainer.state_shardings(experiment, tx, mesh)
    if init_state is None:
        graphdef, state = trainer.init_state(experiment, tx, mesh)
    else:
        graphdef, _ = models.abstract_init(experiment.model)
        state = jax.device_put(init_state, shardings)
    initial = jax.device_get(state)
    spec = trainer.batch_spec(B, S, document_attention=False)
    step = trainer.compile_train_step(graphdef, tx, state, shardings, mesh, spec,
                                      compiler_options=FAST_COMPILE)
    batch = sharding.global_batch(host_batch(), mesh, B)
    losses, metrics = [], []
    for i in range(STEPS):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        metrics.append(jax.device_get(m))
        if i == 0:
            grads = adam_grads(state["opt_state"], config.train.b1)
    return {"mesh": mesh, "initial": initial, "losses": losses, "metrics": metrics, "grads": grads, "state": state,
            "shardings": shardings, "experiment": experiment, "tx": tx}


def _numbers(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x, np.float64)


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(_numbers(x) - _numbers(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def random_state(mesh_shape):
    """(experiment, tx, mesh, state): a train state of numpy random numbers placed on `mesh_shape`: no
    initialiser runs, nothing compiles (each eager initialiser would compile once per process)."""
    config = small_config(mesh_shape)
    experiment = trainer.resolve(config)
    mesh = sharding.make_mesh(config.mesh)
    tx = optimizer(config)
    _, abstract = trainer.abstract_state(experiment, tx)
    rng = np.random.default_rng(1)

    def fill(a):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.key(1)
        if jax.dtypes.issubdtype(a.dtype, np.floating):
            return (0.1 * rng.standard_normal(a.shape)).astype(a.dtype)
        return np.full(a.shape, 3, a.dtype)

    state = jax.tree.map(fill, abstract)
    return experiment, tx, mesh, jax.device_put(state, trainer.state_shardings(experiment, tx, mesh))


def test_sharded_training_equals_one_device():
    """Every mesh: the gradient (every parameter, router included), the loss and the MoE metrics of the first step,
    then three AdamW steps, equal one device. One test on purpose: under pytest-xdist (CI runs -n 2) a shared
    fixture would be recomputed by each worker."""
    reference = run(ONE)
    assert reference["metrics"][0]["moe/router_grad_fraction"] > 0.05  # the router gradient is really tested
    assert reference["losses"][-1] < reference["losses"][0]
    for name, shape in MESHES.items():
        # (2, 1, 2, 2) creates its state with the sharded (jitted) initialiser; the others start from a copy.
        result = run(shape, init_state=None if shape == (2, 1, 2, 2) else reference["initial"])
        print(f"{name} {shape}: max |d grad| {max_abs_diff(result['grads'], reference['grads']):.2e}, "
              f"max |d loss| {max_abs_diff(result['losses'], reference['losses']):.2e}")
        assert max_abs_diff(result["grads"], reference["grads"]) < TOL, name
        for key in ("loss", "total_loss", "aux_loss", "grad_norm", "moe/load_balance_loss", "moe/z_loss",
                    "moe/expert_load", "moe/router_grad_fraction"):
            assert max_abs_diff(result["metrics"][0][key], reference["metrics"][0][key]) < TOL, (name, key)
        np.testing.assert_allclose(result["losses"], reference["losses"], atol=TOL, rtol=0, err_msg=name)
        # The state stays laid out as the shardings say.
        for array, expected in zip(jax.tree.leaves(result["state"]), jax.tree.leaves(result["shardings"])):
            assert array.sharding.is_equivalent_to(expected, array.ndim), name
        if shape == (1, 2, 2, 2):  # FSDP: every weight is split along D as well
            w = result["state"]["params"]["layers"][0]["mlp"]["w_gate"]
            assert w.sharding.spec == P("expert", "fsdp", "model")
            assert w.addressable_shards[0].data.shape == (4, 32, 32)  # [E/2, D/2, F/2] of [8, 64, 64]
            mu = [s for s in jax.tree.leaves(result["state"]["opt_state"],
                                             is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                  if isinstance(s, optax.ScaleByAdamState)][0].mu
            assert mu["layers"][0]["mlp"]["w_gate"].addressable_shards[0].data.shape == (4, 32, 32)
        if shape == (2, 1, 2, 2):
            # The jitted, sharded initialiser gives the eager one's values (to rounding: XLA fuses the
            # initialisers' scaling differently under jit), and no device holds a whole expert weight.
            assert max_abs_diff(result["initial"], reference["initial"]) < 1e-7
            w = result["state"]["params"]["layers"][0]["mlp"]["w_down"]
            assert w.sharding.spec == P("expert", "model")
            assert w.addressable_shards[0].data.shape == (4, 32, 64)  # [E/2, F/2, D] of [8, 64, 64]


def forward(mesh_shape, params, **model):
    """Logits and per-layer aux of the training forward (fixed rng) on a mesh; params: a host copy."""
    config = small_config(mesh_shape, **model)
    experiment = trainer.resolve(config)
    mesh = sharding.make_mesh(config.mesh)
    graphdef, abstract = models.abstract_init(experiment.model)
    params = jax.device_put(params, sharding.named_shardings(abstract, mesh))
    tokens = sharding.global_batch({"inputs": host_batch()["inputs"]}, mesh, B)["inputs"]

    def fn(params, tokens):
        logits, aux = models.apply(graphdef, params, tokens, training=True, rng=jax.random.key(3))
        return logits, aux["losses"]["moe/load_balance_loss"], aux["metrics"]["moe/expert_load"]

    with jax.set_mesh(mesh):
        lowered = jax.jit(fn).lower(params, tokens)
        return lowered.as_text(), jax.device_get(lowered.compile(FAST_COMPILE)(params, tokens))


def test_alltoall_strategy_and_local_balance_match_one_device():
    """moe.parallel='alltoall' with capacity_factor = E / K (no drops) and per-data-shard balance
    (load_balance_groups = 8 data shards of the (2, 4, 1) mesh) equal one device with 8 balance groups."""
    params = jax.device_get(random_state(ONE)[3]["params"])
    options = dict(load_balance_groups=8, capacity_factor=4.0)
    _, expected = forward(ONE, params, **options)
    text, result = forward((2, 1, 4, 1), params, parallel="alltoall", **options)
    assert "all_to_all" in text  # the strategy reached the layer
    assert max_abs_diff(result, expected) < TOL


GOLDEN = {
    # (data, fsdp, expert, model) = (2, 1, 2, 2), vocab 264 (divisible): the rules as written.
    (2, 1, 2, 2): {
        "embed.embedding": P("model"),                        # ('vocab', 'embed')
        "final_norm.bias": P(), "final_norm.scale": P(),
        "layers.0.input_norm.scale": P(), "layers.0.post_attn_norm.bias": P(),
        "layers.0.attn.q.kernel": P(None, "model"),          # ('embed', 'heads', 'kv')
        "layers.0.attn.q.bias": P("model"),                  # ('heads', 'kv')
        "layers.0.attn.k.kernel": P(None, "model"),          # ('embed', 'kv_heads', 'kv'): 2 KV heads / 2
        "layers.0.attn.v.bias": P("model"),
        "layers.0.attn.o.kernel": P("model"),                # ('heads', 'kv', 'embed')
        "layers.0.attn.o.bias": P(),                         # ('embed',)
        "layers.0.mlp.router": P(None, "expert"),            # ('embed', 'experts')
        "layers.0.mlp.w_gate": P("expert", None, "model"),   # ('experts', 'embed', 'mlp')
        "layers.0.mlp.w_up": P("expert", None, "model"),
        "layers.0.mlp.w_down": P("expert", "model"),         # ('experts', 'mlp', 'embed')
        "lm_head.kernel": P(None, "model"),                  # ('embed', 'vocab')
        "lm_head.bias": P("model"),
    },
    # (1, 1, 1, 8), vocab 259: what does not divide stays replicated (vocab 259, 2 KV heads on 8 shards).
    (1, 1, 1, 8): {
        "embed.embedding": P(),
        "layers.0.attn.q.kernel": P(None, "model"),
        "layers.0.attn.k.kernel": P(),
        "layers.0.attn.k.bias": P(),
        "layers.0.attn.o.kernel": P("model"),
        "layers.0.mlp.router": P(),                          # mesh.expert = 1: nothing to shard
        "layers.0.mlp.w_up": P(None, None, "model"),
        "layers.0.mlp.w_down": P(None, "model"),
        "lm_head.kernel": P(),
        "lm_head.bias": P(),
    },
    # (1, 2, 2, 2), vocab 264: FSDP splits every 'embed' dimension (D = 64) in two, norms and biases included.
    (1, 2, 2, 2): {
        "embed.embedding": P("model", "fsdp"),
        "final_norm.scale": P("fsdp"),
        "layers.0.attn.q.kernel": P("fsdp", "model"),
        "layers.0.attn.o.kernel": P("model", None, "fsdp"),
        "layers.0.attn.o.bias": P("fsdp"),
        "layers.0.mlp.router": P("fsdp", "expert"),
        "layers.0.mlp.w_gate": P("expert", "fsdp", "model"),
        "layers.0.mlp.w_down": P("expert", "model", "fsdp"),
        "lm_head.kernel": P("fsdp", "model"),
        "lm_head.bias": P("model"),
    },
}


@pytest.mark.parametrize("mesh_shape", list(GOLDEN))
def test_parameter_shardings_golden_table(mesh_shape):
    config = small_config(mesh_shape, vocab_size=259 if mesh_shape == (1, 1, 1, 8) else 264)
    experiment = trainer.resolve(config)
    mesh = sharding.make_mesh(config.mesh)
    tx = optimizer(config)
    _, abstract = trainer.abstract_state(experiment, tx)  # shapes only: nothing is compiled or allocated
    specs = sharding.partition_specs(abstract, mesh)
    flat = {name: s for name, s in models.flatten_params(specs["params"]).items()}
    assert set(flat) == set(models.flatten_params(abstract["params"]))  # every parameter has a spec
    for name, expected in GOLDEN[mesh_shape].items():
        assert flat[name] == expected, (name, flat[name], expected)
    # The optimizer state mirrors the parameters (optax's mu / nu carry the same nnx.Param metadata), scalars P().
    adam = [s for s in jax.tree.leaves(specs["opt_state"], is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    assert models.flatten_params(adam.mu) == flat and models.flatten_params(adam.nu) == flat
    assert adam.count == P() and specs["step"] == P() and specs["rng"] == P()
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp", "expert"))


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    """Saved from the FSDP mesh (1, 8, 1, 1), restored onto (2, 1, 2, 2) through an abstract target carrying the new
    shardings."""
    experiment, tx, _, state = random_state((1, 8, 1, 1))
    target_mesh = sharding.make_mesh(small_config((2, 1, 2, 2)).mesh)
    target_shardings = trainer.state_shardings(experiment, tx, target_mesh)
    checkpointer = _checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    checkpointer.save(STEPS, state, {"note": "from (1, 8, 1, 1)"})
    checkpointer.wait()
    _, abstract = trainer.abstract_state(experiment, tx)
    restored, meta = checkpointer.restore(STEPS, sharding.abstract_with_shardings(abstract, target_shardings))
    checkpointer.close()
    assert meta == {"note": "from (1, 8, 1, 1)"}
    assert max_abs_diff(restored, jax.device_get(state)) == 0.0
    for array, expected in zip(jax.tree.leaves(restored), jax.tree.leaves(target_shardings)):
        assert array.sharding == expected
    before = state["params"]["layers"][0]["mlp"]["w_gate"].sharding
    after = restored["params"]["layers"][0]["mlp"]["w_gate"].sharding
    assert before.spec == P(None, "fsdp")
    assert state["params"]["layers"][0]["mlp"]["w_gate"].addressable_shards[0].data.shape == (8, 8, 64)
    assert before.mesh.axis_sizes == (1, 8, 1, 1) and after.mesh.axis_sizes == (2, 1, 2, 2)
    assert after.spec == P("expert", None, "model")
    assert restored["params"]["layers"][0]["mlp"]["w_gate"].addressable_shards[0].data.shape == (4, 64, 32)


@pytest.mark.parametrize("changes,message", [
    (dict(mesh=(16, 1, 1, 1)), r"mesh.data=16 x mesh.fsdp=1 x mesh.expert=1 x mesh.model=1 = 16 devices is larger than the 8"),
    (dict(mesh=(-1, 1, 3, 1)), r"mesh.data=-1 cannot be filled: mesh.fsdp=1 x mesh.expert=3 x mesh.model=1 = 3 does not divide"),
    (dict(mesh=(-1, 1, -1, 1)), r"mesh.expert=-1 is invalid: only one of"),
    (dict(mesh=(0, 1, 1, 1)), r"mesh.data=0 is invalid"),
    (dict(mesh=(1, 1, 4, 2), model=dict(num_experts=6)), r"moe.num_experts=6 is not divisible by the expert axis 'expert' of size 4"),
    (dict(mesh=(1, 1, 1, 8), model=dict(num_heads=4, head_dim=16)),
     r"model.num_heads=4 is not divisible by mesh.model=8"),
    (dict(mesh=(1, 1, 1, 8), model=dict(d_hidden=20)), r"moe.d_hidden=20 is not divisible by the model axis 'model' of size 8"),
    (dict(mesh=(8, 1, 1, 1), train=dict(batch_size=4)), r"train.batch_size=4 is not divisible by the 8 data shards"),
    (dict(mesh=(8, 1, 1, 1), model=dict(load_balance_groups=2)), r"moe.load_balance_groups=2 is not supported"),
    (dict(mesh=(1, 8, 1, 1), model=dict(load_balance_groups=2)), r"moe.load_balance_groups=2 is not supported"),
    (dict(mesh=(1, 8, 1, 1), model=dict(d_model=60)), r"model.d_model=60 is not divisible by mesh.fsdp=8"),
    (dict(mesh=(1, 8, 1, 1), train=dict(batch_size=4)), r"train.batch_size=4 is not divisible by the 8 data shards "
                                                        r"\(mesh.data=1 x mesh.fsdp=8 x mesh.expert=1\)"),
    (dict(mesh=(2, 1, 4, 1), model=dict(parallel="ragged_alltoall")),
     r"moe.parallel='ragged_alltoall' is invalid on CPU"),
])
def test_impossible_layouts_fail_before_compiling(changes, message):
    config = small_config(changes["mesh"], **changes.get("model", {}))
    for key, value in changes.get("train", {}).items():
        config.train[key] = value
    with pytest.raises(ValueError, match=message):
        trainer.resolve(config)  # what train() runs first: nothing is initialised or compiled yet


def test_mesh_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"mesh.tensor is unknown"):
        sharding.mesh_config_of({"mesh": {"tensor": 2}})
    with pytest.raises(ValueError, match=r"must use every device"):
        sharding.resolve_mesh_shape(sharding.mesh_config_of({"mesh": {"data": 2}}), 8, process_count=2)
    assert sharding.resolve_mesh_shape(sharding.default_mesh_config(), 8) == (8, 1, 1, 1)
    assert sharding.resolve_mesh_shape(sharding.mesh_config_of({"mesh": {"model": 2, "expert": 2}}), 8) == (2, 1, 2, 2)
    assert sharding.resolve_mesh_shape(sharding.mesh_config_of({"mesh": {"fsdp": -1, "data": 2}}), 8) == (2, 4, 1, 1)
    assert sharding.resolve_mesh_shape({"model": 2}, 8) == (1, 1, 1, 2)  # a bare mapping: missing axes are 1


def test_data_process_layout_single_process():
    mesh = sharding.make_mesh(sharding.mesh_config_of({"mesh": {"data": 2, "expert": 2, "model": 2}}))
    assert sharding.data_process_layout(mesh, B) == (0, 1)


def test_distributed_initialisation_is_skipped_for_a_single_process():
    assert sharding.detected_cluster({}) is None
    assert sharding.detected_cluster({"SLURM_NTASKS": "1"}) is None
    assert sharding.detected_cluster({"SLURM_NTASKS": "16"}) == "SLURM_NTASKS"
    assert sharding.detected_cluster({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}) == "TPU_WORKER_HOSTNAMES"
    assert sharding.initialize_distributed(small_config(), environ={}) is False
    with pytest.raises(ValueError, match=r"distributed.enabled='maybe' is invalid"):
        config = small_config()
        config.distributed.enabled = "maybe"
        sharding.initialize_distributed(config, environ={})
