"""The extension points: a new FFN kind and a new router, both defined in this file (no edit under grin_jax/),
registered, and trained for two steps in a model that uses the new router in layer 1 and the new kind in layer 2;
the trainer logs their metrics without knowing them; the same model on a (2, 2, 2) mesh equals one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grin_jax import ffn, models, params as _params, presets
from grin_jax.moe import routing
from grin_jax.nn.layers import normal_init, param
from grin_jax.train import trainer


# ------------------------------------------------------------------------------------------ a new router
@dataclasses.dataclass(frozen=True)
class NoisyTopKOptions:
    noise_scale: float = 1.0

    def __post_init__(self):
        if not self.noise_scale >= 0:
            raise ValueError(f"router_options.noise_scale={self.noise_scale!r} is invalid: accepted values are >= 0")


def noisy_topk_draw(rng, options, *, num_tokens, num_experts, top_k, dtype):
    return {"normal_TE": jax.random.normal(rng, (num_tokens, num_experts), dtype)}


def noisy_topk_route(logits_TE, *, options, top_k, training, noise=None):
    """Top-k of logits + scale * N(0, 1) in training; weights = softmax over the kept logits."""
    scores = logits_TE + (options.noise_scale * noise["normal_TE"] if training else 0.0)
    _, ids = jax.lax.top_k(jax.lax.stop_gradient(scores), top_k)
    kept = jnp.take_along_axis(logits_TE, ids, axis=-1)
    probs = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    metrics = {"router_grad_fraction": jnp.float32(1.0), "noise_scale": jnp.float32(options.noise_scale)}
    return routing.Routing(ids.astype(jnp.int32), jax.nn.softmax(kept, axis=-1), probs, logits_TE, metrics)


routing.register_router("noisy_topk", routing.RouterSpec(NoisyTopKOptions, noisy_topk_route, noisy_topk_draw))


# ------------------------------------------------------------------------------------------ a new FFN kind
@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedGeluConfig:
    d_model: int
    d_hidden: int = 32
    l2: float = 0.01

    @classmethod
    def from_section(cls, values, *, d_model):
        return cls(d_model=d_model, **dict(values))

    def to_section(self):
        return {"d_hidden": self.d_hidden, "l2": self.l2}

    @property
    def loss_weights(self):
        return {"l2": self.l2}


@ffn.register_ffn("gated_gelu")
class GatedGelu(nnx.Module):
    """y = gate * gelu(x W1) W2, a learnable scalar gate; aux loss mean(W1^2)."""

    Config = GatedGeluConfig

    def __init__(self, config, *, norm, norm_eps, param_dtype, dtype, rngs):
        self.w1 = param(normal_init(rngs.params(), (config.d_model, config.d_hidden), param_dtype,
                                    config.d_model ** -0.5), ("embed", "mlp"))
        self.w2 = param(normal_init(rngs.params(), (config.d_hidden, config.d_model), param_dtype,
                                    config.d_hidden ** -0.5), ("mlp", "embed"))
        self.gate = param(jnp.ones((), param_dtype), ())

    def __call__(self, x_BSD, *, training=False, rng=None):
        y = self.gate[...] * (jax.nn.gelu(x_BSD @ self.w1[...]) @ self.w2[...])
        return y, {"losses": {"l2": jnp.mean(jnp.square(self.w1[...]))}, "metrics": {"gate": self.gate[...]}}

    @staticmethod
    def param_counts(config):
        n = 2 * config.d_model * config.d_hidden + 1
        return {"gated_gelu": (n, n)}

    @staticmethod
    def check_mesh(config, sizes):
        if config.d_hidden % sizes.get("model", 1):
            raise ValueError(f"gated_gelu.d_hidden={config.d_hidden} is not divisible by mesh.model")


def experiment_config():
    config = presets.tiny("smoke", name="seam")
    config.model.layout = "routed,gelu"
    config.model.routed = dict(kind="moe", num_experts=4, top_k=2, d_hidden=32, router="noisy_topk",
                               router_options={"noise_scale": 0.5}, load_balance_coef=0.01)
    config.model.gelu = dict(kind="gated_gelu", d_hidden=48)
    return config


def test_new_kind_and_router_train_two_steps(tmp_path):
    config = experiment_config()
    model = models.model_config_from(config.model)
    assert [model.layer_config(i)[1] for i in range(2)] == ["moe", "gated_gelu"]
    counts = _params.count_params(model)
    assert counts["gated_gelu"] == 2 * 64 * 48 + 1 and counts["router"] == 64 * 4
    from kind_checks import train_steps
    last = train_steps(config, tmp_path)  # 2 steps, no warm-up: the first step already moves the parameters
    assert "train/gelu/gate" in last                    # the new kind's metric, under its section's name
    assert last["train/gelu/l2"] > 0                    # its loss, logged under its section's name
    assert last["train/routed/noise_scale"] == 0.5      # the new router's metric
    assert np.allclose(np.sum(last["train/routed/expert_load"]), 1.0)
    _, _, params, _ = trainer.load_trained(str(tmp_path))
    flat = models.flatten_params(params)
    assert float(flat["layers.1.mlp.gate"]) != 1.0      # the new kind's parameter was trained (initialised to 1)
    assert flat["layers.0.mlp.router"].shape == (64, 4)


def test_new_kind_and_router_on_a_mesh_equal_one_device():
    from kind_checks import assert_mesh_equals_one_device
    assert_mesh_equals_one_device(experiment_config())
