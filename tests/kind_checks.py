"""Shared test helpers: the grin_tiny smoke config with train overrides and a run's logged train losses (trainer
and fault tests); for FFN kinds and routers, train an experiment config for a few steps and return the last logged
record, and check a model config's training loss and gradients on a mesh of fake devices equal one device's."""

import json
import os

import jax
import numpy as np

from grin_jax import models, sharding
from grin_jax.train import trainer
from grin_jax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**train_overrides):
    """configs/grin_tiny.py:smoke with a 2-batch final evaluation and the given train.* overrides."""
    from grin_jax.presets import tiny
    config = tiny("smoke", name="grin_tiny")
    config.train.final_eval_batches = 2  # the whole split (the default) is tested on a small corpus in test_train
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def train_losses(workdir) -> dict:
    """{step: train/loss} of a run's metrics.jsonl."""
    return {r["step"]: r["train/loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if r.get("train/loss") is not None}


def train_steps(config, workdir: str, steps: int = 2) -> dict:
    """Train `config` for `steps` steps (from step 1 on, no warm-up, no eval or checkpoint in between) and return
    the last train record of metrics.jsonl, after checking every logged loss is finite."""
    config.train.steps = steps
    config.train.eval_every = 0
    config.train.warmup_steps = 0
    config.train.checkpoint_every = 0
    summary = trainer.train(config, str(workdir))
    assert summary["steps"] == steps
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if "train/loss" in r]
    assert len(train) == steps and all(np.isfinite(r["train/loss"]) for r in train)
    return train[-1]


def assert_mesh_equals_one_device(config, mesh_shape=(2, 2, 2), *, atol=1e-5):
    """config: an experiment config (its model section and mesh section are used). mesh_shape: (data, expert,
    model), or (data, fsdp, expert, model)."""
    model = models.model_config_from(config.model)
    graphdef, params = models.init(model, 0)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, model.vocab_size)

    def loss(params, tokens):
        logits, aux = models.apply(graphdef, params, tokens, training=True, rng=jax.random.key(2))
        return models.cross_entropy(logits, tokens) + aux["aux_loss"]

    value, grads = jax.jit(jax.value_and_grad(loss))(params, tokens)
    axes = sharding.MESH_AXES if len(mesh_shape) == 4 else ("data", "expert", "model")
    for axis, size in zip(axes, mesh_shape):
        config.mesh[axis] = size
    mesh = sharding.make_mesh(config.mesh)
    _, abstract = models.abstract_init(model)
    placed = jax.device_put(params, sharding.named_shardings(abstract, mesh))
    with jax.set_mesh(mesh):
        value_mesh, grads_mesh = jax.jit(jax.value_and_grad(loss))(placed, tokens)
    assert abs(float(value) - float(value_mesh)) < atol
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_mesh)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol)
