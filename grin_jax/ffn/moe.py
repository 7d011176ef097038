"""The MoE FFN kind: parameters in NNX, computation in `grin_jax.moe.layer.moe_layer` (one body for one device
and a mesh; the router and dispatcher come from their registries).

Axes: B batch, S sequence, T = B*S tokens, D model, F expert hidden, E experts.
Parameters (moe.init_moe_params): router [D, E] ('embed', 'experts'); w_gate, w_up [E, D, F]
('experts', 'embed', 'mlp'); w_down [E, F, D] ('experts', 'mlp', 'embed'); output_norm (optional).

On a mesh in context (`jax.set_mesh`, as the trainer traces its steps) with more than one device the layer runs
inside one shard_map over it; the mesh must have the axes ('data', 'expert', 'model') (grin_jax.sharding's mesh
adds 'fsdp', a data axis for the tokens), or the call raises naming the axes it found.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from grin_jax.ffn import register_ffn
from grin_jax.moe import experts as _experts
from grin_jax.moe import parallel as _parallel
from grin_jax.moe.layer import MoEConfig, init_moe_params, moe_layer
from grin_jax.nn.layers import make_norm, param


def context_mesh():
    """The mesh in context (jax.set_mesh) when it has more than one device, else None. A mesh without the
    ('data', 'expert', 'model') axes raises: the layer would not know how its tokens and experts are laid out."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return None
    missing = [a for a in _parallel.DEFAULT_AXIS_NAMES if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"the MoE layer runs on the mesh in context, whose axes are {tuple(mesh.axis_names)}: it "
                         f"needs the axes {_parallel.DEFAULT_AXIS_NAMES} (missing {missing}); build the mesh with "
                         "grin_jax.sharding.make_mesh")
    return mesh


@register_ffn("moe")
class MoEFFN(nnx.Module):
    Config = MoEConfig
    takes_batch_stats = True  # the load-balance loss's expert load f over a whole accumulated step (grin_jax.ffn)

    def __init__(self, config: MoEConfig, *, norm: str = "layernorm", norm_eps: float = 1e-5,
                 param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.output_norm = (make_norm(norm, config.d_model, eps=norm_eps, param_dtype=param_dtype, dtype=dtype)
                            if config.output_norm else None)
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

    def __call__(self, x_BSD: jax.Array, *, training: bool = False, rng=None, batch_stats: dict | None = None):
        """(y [B, S, D], aux {'losses', 'metrics', 'batch_stats': {'expert_load' [E]}}). batch_stats: the whole
        step's {'expert_load'} under gradient accumulation (the load-balance loss uses it), else None."""
        if training and rng is None:
            rng_needed = self.config.input_jitter > 0 or self.config.router_spec.draw is not None
            if rng_needed:
                raise ValueError(f"moe: training with router={self.config.router!r} / input_jitter="
                                 f"{self.config.input_jitter} needs an rng")
        mesh = context_mesh()
        data_axes = None if mesh is None else tuple(a for a in _parallel.BATCH_AXIS_NAMES if a in mesh.axis_names)
        y_BSD, aux = moe_layer(self.moe_params(), x_BSD.astype(self.dtype), config=self.config, training=training,
                               rng=rng, mesh=mesh, data_axes=data_axes,
                               expert_load_E=None if batch_stats is None else batch_stats["expert_load"])
        if self.output_norm is not None:
            y_BSD = self.output_norm(y_BSD)
        return y_BSD, {**aux, "batch_stats": {"expert_load": aux["metrics"]["expert_load"]}}

    @staticmethod
    def param_counts(config: MoEConfig) -> dict:
        matrices = 3 if _experts.get_activation(config.activation).gated else 2
        per_expert = matrices * config.d_model * config.d_hidden
        # The output norm (when on) is counted by params.count_params from the shapes, as every norm.
        return {"experts": (config.num_experts * per_expert, config.top_k * per_expert),
                "router": (config.d_model * config.num_experts,) * 2}

    @staticmethod
    def check_mesh(config: MoEConfig, sizes: dict) -> None:
        expert, model = sizes.get("expert", 1), sizes.get("model", 1)
        shards = math.prod(sizes.get(a, 1) for a in _parallel.BATCH_AXIS_NAMES)
        _parallel.check_sizes(config, num_data=shards, num_expert=expert, num_model=model)
        if shards * model > 1 and config.parallel == "ragged_alltoall" and sizes.get("platform") == "cpu":
            raise ValueError("moe.parallel='ragged_alltoall' is invalid on CPU (lax.ragged_all_to_all is not "
                             "implemented by XLA:CPU): accepted values are 'allgather' or 'alltoall'")
