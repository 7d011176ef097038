"""Feed-forward blocks: a dense (gated) FFN and the MoE block that calls `grin_jax.moe.moe_layer`.

Axes: B batch, S sequence, T = B*S tokens, D model, F hidden, E experts.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from grin_jax.moe import experts as _experts
from grin_jax.moe.expert_choice import expert_choice_ffn
from grin_jax.moe import parallel as _parallel
from grin_jax.moe.layer import EXPERT_CHOICE, MoEConfig, draw_noise, init_moe_params, moe_layer
from grin_jax.nn.layers import make_norm, normal_init, param


class DenseFFN(nnx.Module):
    """Dense FFN with the experts' activations (experts.ACTIVATIONS): gated y = (act(x Wg) * x Wu) Wd, else
    y = act(x Wu) Wd. No biases. w_gate/w_up [D, F] ('embed', 'mlp'), w_down [F, D] ('mlp', 'embed')."""

    def __init__(self, d_model: int, d_hidden: int, *, activation: str = "swiglu", param_dtype=jnp.float32,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.act = _experts.get_activation(activation)
        self.activation = activation
        self.w_up = param(normal_init(rngs.params(), (d_model, d_hidden), param_dtype, d_model ** -0.5),
                          ("embed", "mlp"))
        self.w_gate = (param(normal_init(rngs.params(), (d_model, d_hidden), param_dtype, d_model ** -0.5),
                             ("embed", "mlp")) if self.act.gated else None)
        self.w_down = param(normal_init(rngs.params(), (d_hidden, d_model), param_dtype, d_hidden ** -0.5),
                            ("mlp", "embed"))
        self.dtype = dtype

    def __call__(self, x_BSD: jax.Array) -> jax.Array:
        x = x_BSD.astype(self.dtype)
        up = x @ self.w_up[...].astype(self.dtype)
        h = self.act.fn(x @ self.w_gate[...].astype(self.dtype)) * up if self.act.gated else self.act.fn(up)
        return h @ self.w_down[...].astype(self.dtype)


class MoEBlock(nnx.Module):
    """The MoE FFN: parameters in NNX, computation in `grin_jax.moe.moe_layer` (routing is not reimplemented).

    Parameters (initialised by `grin_jax.moe.init_moe_params`):
      router [D, E] ('embed', 'experts');  w_gate, w_up [E, D, F] ('experts', 'embed', 'mlp');
      w_down [E, F, D] ('experts', 'mlp', 'embed');  output_norm (optional: a norm on the MoE output).

    router='expert_choice': `moe.expert_choice.expert_choice_ffn` on x [B, S, D] (grouped by position), with
    capacity_factor from the config; otherwise `moe_layer` on the flattened tokens [T, D].
    """

    def __init__(self, config: MoEConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs,
                 output_norm: str | None = None, norm_eps: float = 1e-5):
        self.config = config
        # Krajewski et al.'s norm on the MoE output ("crucial for G > 1"): None = off, else a NORMS kind.
        self.output_norm = (make_norm(output_norm, config.d_model, eps=norm_eps, param_dtype=param_dtype, dtype=dtype)
                            if output_norm else None)
        p = init_moe_params(rngs.params(), config, dtype=param_dtype)
        self.router = param(p["router"], ("embed", "experts"))
        self.w_up = param(p["experts"]["w_up"], ("experts", "embed", "mlp"))
        self.w_gate = (param(p["experts"]["w_gate"], ("experts", "embed", "mlp"))
                       if "w_gate" in p["experts"] else None)
        self.w_down = param(p["experts"]["w_down"], ("experts", "mlp", "embed"))
        self.dtype = dtype

    def moe_params(self) -> dict:
        """The core's parameter pytree; experts cast to the compute dtype (the core casts the router itself)."""
        experts = {"w_up": self.w_up[...].astype(self.dtype), "w_down": self.w_down[...].astype(self.dtype)}
        if self.w_gate is not None:
            experts["w_gate"] = self.w_gate[...].astype(self.dtype)
        return {"router": self.router[...], "experts": experts}

    def __call__(self, x_BSD: jax.Array, *, training: bool, rng=None):
        """Returns (y [B, S, D], aux from moe_layer: load_balance_loss, z_loss, metrics)."""
        if self.config.router == EXPERT_CHOICE:
            y_BSD, aux = self._expert_choice(x_BSD)
        else:
            y_BSD, aux = self._token_choice(x_BSD, training=training, rng=rng)
        if self.output_norm is not None:
            y_BSD = self.output_norm(y_BSD)
        return y_BSD, aux

    def _expert_choice(self, x_BSD: jax.Array):
        p = self.moe_params()
        return expert_choice_ffn(p["experts"], p["router"], x_BSD.astype(self.dtype), top_k=self.config.top_k,
                                 capacity_factor=self.config.capacity_factor, activation=self.config.activation,
                                 router_dtype=jnp.dtype(self.config.router_dtype))

    def _token_choice(self, x_BSD: jax.Array, *, training: bool, rng=None):
        """moe_layer on one device; on a ('data', 'expert', 'model') mesh of more than one device in context
        (jax.set_mesh: the trainer traces its steps under it) moe_layer_parallel with strategy config.parallel.
        The training noise is drawn on the global token axis (draw_noise), so both give the same numbers;
        load_balance_groups 1 is GRIN's global balance (all-reduced over the data shards), G = the number of
        data shards is per-shard ('local') balance."""
        batch, seq, d_model = x_BSD.shape
        x_TD = x_BSD.reshape(batch * seq, d_model).astype(self.dtype)
        mesh = parallel_mesh()
        if mesh is None:
            y_TD, aux = moe_layer(self.moe_params(), x_TD, config=self.config, training=training, rng=rng)
            return y_TD.reshape(batch, seq, d_model), aux
        config, groups = self.config, self.config.load_balance_groups
        if groups != 1:
            layout = _parallel.resolve_layout(config, mesh)
            if groups != layout.num_data_shards:
                raise ValueError(f"load_balance_groups={groups} is not supported on a mesh with "
                                 f"{layout.num_data_shards} data shards: accepted values are 1 (global) or "
                                 f"{layout.num_data_shards} (per data shard)")
            config = dataclasses.replace(config, load_balance_groups=1)
        noise = draw_noise(rng, config, batch * seq) if training and rng is not None else None
        y_TD, aux = _parallel.moe_layer_parallel(
            self.moe_params(), x_TD, config=config, mesh=mesh, strategy=config.parallel, training=training,
            router_noise=noise, load_balance="global" if groups == 1 else "local")
        return y_TD.reshape(batch, seq, d_model), aux


def parallel_mesh():
    """The mesh in context (`jax.set_mesh`) when the MoE block should run `moe_layer_parallel` on it: one with the
    ('data', 'expert', 'model') axes (grin_jax.sharding) and more than one device; else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    if not all(a in sizes for a in _parallel.DEFAULT_AXIS_NAMES) or math.prod(sizes.values()) == 1:
        return None
    return mesh
