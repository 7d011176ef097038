"""A shared check for the tests: a model config's training loss and gradients on a mesh of fake devices equal
one device's."""

import jax
import numpy as np

from grin_jax import models, sharding


def assert_mesh_equals_one_device(config, mesh_shape=(2, 2, 2), *, atol=1e-5):
    """config: an experiment config (its model section and mesh section are used)."""
    model = models.model_config_from(config.model)
    graphdef, params = models.init(model, 0)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, model.vocab_size)

    def loss(params, tokens):
        logits, aux = models.apply(graphdef, params, tokens, training=True, rng=jax.random.key(2))
        return models.cross_entropy(logits, tokens) + aux["aux_loss"]

    value, grads = jax.jit(jax.value_and_grad(loss))(params, tokens)
    config.mesh.data, config.mesh.expert, config.mesh.model = mesh_shape
    mesh = sharding.make_mesh(config.mesh)
    _, abstract = models.abstract_init(model)
    placed = jax.device_put(params, sharding.named_shardings(abstract, mesh))
    with jax.set_mesh(mesh):
        value_mesh, grads_mesh = jax.jit(jax.value_and_grad(loss))(placed, tokens)
    assert abs(float(value) - float(value_mesh)) < atol
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_mesh)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol)
