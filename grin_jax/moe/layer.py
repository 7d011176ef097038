"""The MoE feed-forward layer as one pure function: router matmul -> router -> dispatch -> combine.

Axes: T tokens, D model, E experts, F expert hidden, K slots per token.

Parameters: {'router': [D, E] (no bias), 'experts': stacked expert weights (experts.py)}.
    y, aux = moe_layer(params, x_TD, config=MoEConfig(...), training=..., rng=...)
aux holds 'load_balance_loss', 'z_loss' (unscaled) and 'metrics' (expert_load [E], max_load, router_entropy,
router_grad_fraction, dropped_fraction). The coefficients are applied by the caller (the model / trainer).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grin_jax.moe import dispatch as _dispatch
from grin_jax.moe import experts as _experts
from grin_jax.moe import losses as _losses
from grin_jax.moe import routing as _routing


EXPERT_CHOICE = "expert_choice"  # not a token router (routing.ROUTERS): routed by expert_choice.expert_choice_ffn
PARALLEL_STRATEGIES = ("allgather", "alltoall", "ragged_alltoall")  # parallel.moe_layer_parallel's strategies


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Static description of one MoE layer; validated on construction.

    num_experts: E.  top_k: K slots per token.  d_model: D.  d_hidden: F (expert width).
    router: a name in routing.ROUTERS ('sparsemixer_v2' = GRIN, 'topk_softmax' = GShard/Mixtral/Switch), or
      'expert_choice' (Krajewski et al.; needs the [B, S, D] layout: moe.expert_choice.expert_choice_ffn, called
      by nn.MoEBlock; moe_layer itself rejects it).
    jitter_eps: SparseMixer-v2's mask eps (GRIN 0.01).  renormalize: top-k softmax renormalisation.
    input_jitter: multiplicative U(1-eps, 1+eps) jitter of the layer input in training (GRIN 0.01; 0 = off),
      applied once; the experts see the jittered input.
    activation: expert activation (experts.ACTIVATIONS).  backend: dispatch.BACKENDS; 'auto' (default) picks
      dispatch.default_backend() for the platform: 'kernel' on CPU, 'ragged_dot' on GPU / TPU.
    capacity_factor: for backend='capacity'.  router_dtype: dtype of the router matmul and softmax.
    load_balance_groups: 1 = global balance over the batch (GRIN); G > 1 = per-group (local) balance.
    parallel: the strategy of `parallel.moe_layer_parallel` when the layer runs on a mesh of more than one device
      (nn.MoEBlock under jax.set_mesh): 'allgather' (dropless), 'alltoall' (capacity_factor, drops),
      'ragged_alltoall' (dropless, GPU / TPU only). moe_layer itself ignores it.
    """

    num_experts: int
    top_k: int
    d_model: int
    d_hidden: int
    router: str = "sparsemixer_v2"
    jitter_eps: float = 0.01
    renormalize: bool = True
    input_jitter: float = 0.0
    activation: str = "swiglu"
    backend: str = "auto"
    capacity_factor: float = 1.25
    router_dtype: str = "float32"
    load_balance_groups: int = 1
    parallel: str = "allgather"

    def __post_init__(self):
        for name in ("num_experts", "top_k", "d_model", "d_hidden", "load_balance_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: accepted values are integers >= 1")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} is invalid: accepted values are 1..num_experts={self.num_experts}")
        if self.router not in _routing.ROUTERS and self.router != EXPERT_CHOICE:
            raise ValueError(f"router={self.router!r} is unknown: accepted values are "
                             f"{sorted(_routing.ROUTERS) + [EXPERT_CHOICE]}")
        _experts.get_activation(self.activation)
        _dispatch.check_backend(self.backend)
        if self.jitter_eps < 0:
            raise ValueError(f"jitter_eps={self.jitter_eps!r} is invalid: accepted values are >= 0")
        if not 0 <= self.input_jitter < 1:
            raise ValueError(f"input_jitter={self.input_jitter!r} is invalid: accepted values are in [0, 1)")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor!r} is invalid: accepted values are > 0")
        if self.router_dtype not in ("float32", "float64", "bfloat16"):
            raise ValueError(f"router_dtype={self.router_dtype!r} is invalid: accepted values are "
                             "'float32', 'float64', 'bfloat16'")
        if self.parallel not in PARALLEL_STRATEGIES:
            raise ValueError(f"parallel={self.parallel!r} is unknown: accepted values are {list(PARALLEL_STRATEGIES)}")

    def router_options(self) -> dict:
        if self.router == "sparsemixer_v2":
            return {"jitter_eps": self.jitter_eps}
        if self.router == "topk_softmax":
            return {"renormalize": self.renormalize}
        return {}


def init_moe_params(key, config: MoEConfig, dtype=jnp.float32) -> dict:
    k_router, k_experts = jax.random.split(key)
    router = (jax.random.normal(k_router, (config.d_model, config.num_experts), jnp.float32)
              / config.d_model ** 0.5).astype(dtype)
    experts = _experts.init_expert_params(k_experts, num_experts=config.num_experts, d_model=config.d_model,
                                          d_hidden=config.d_hidden, activation=config.activation, dtype=dtype)
    return {"router": router, "experts": experts}


def apply_input_jitter(x_TD, eps: float, rng):
    """GRIN's multiplicative input jitter: x * U(1 - eps, 1 + eps), elementwise."""
    noise = jax.random.uniform(rng, x_TD.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    return x_TD * noise.astype(x_TD.dtype)


def draw_noise(rng, config: MoEConfig, num_tokens: int, dtype=None) -> dict:
    """The layer's training noise for `num_tokens` tokens, drawn from `rng` exactly as `moe_layer(rng=rng)` draws
    it: {'jitter_TD': [T, D] float32 input-jitter factors U(1-eps, 1+eps) (when input_jitter > 0),
    'gumbel_KTE': [K, T, E], 'uniform_KT': [K, T] (sparsemixer_v2; dtype default config.router_dtype)}.

    Drawn on the GLOBAL token axis, the noise does not depend on how the tokens are sharded: pass it as
    `router_noise` to moe_layer or parallel.moe_layer_parallel (which splits it along T) and both give the same
    result on any mesh."""
    rng_jitter, rng_router = jax.random.split(rng)
    noise = {}
    if config.input_jitter > 0:
        eps = config.input_jitter
        noise["jitter_TD"] = jax.random.uniform(rng_jitter, (num_tokens, config.d_model), jnp.float32,
                                                1.0 - eps, 1.0 + eps)
    if config.router == "sparsemixer_v2":  # sparsemixer.sparsemixer_v2's own draws from the router key
        dtype = jnp.dtype(config.router_dtype if dtype is None else dtype)
        key_g, key_u = jax.random.split(rng_router)
        noise["gumbel_KTE"] = jax.random.gumbel(key_g, (config.top_k, num_tokens, config.num_experts), dtype)
        noise["uniform_KT"] = jax.random.uniform(key_u, (config.top_k, num_tokens), dtype)
    return noise


def moe_layer(params: dict, x_TD: jax.Array, *, config: MoEConfig, training: bool, rng=None,
              router_noise: dict | None = None):
    """One MoE FFN layer. x_TD: [T, D] -> (y_TD [T, D], aux).

    rng: needed in training for the router's sampling and the input jitter (see `draw_noise`).
    router_noise: optional explicit noise, e.g. {'gumbel_KTE': ..., 'uniform_KT': ...} and/or the input-jitter
      factors {'jitter_TD': ...} (`draw_noise`); what it holds is used instead of drawing from rng.
    """
    if x_TD.ndim != 2 or x_TD.shape[-1] != config.d_model:
        raise ValueError(f"x must be [tokens, d_model={config.d_model}], got shape {x_TD.shape}")
    if config.router == EXPERT_CHOICE:
        raise ValueError("moe_layer: router='expert_choice' groups tokens by position and needs x as [B, S, D]: "
                         "call grin_jax.moe.expert_choice.expert_choice_ffn (nn.MoEBlock does)")
    noise = dict(router_noise or {})
    rng_router = None
    if rng is not None:
        rng_router = jax.random.split(rng)[1]
        if training:
            noise = {**draw_noise(rng, config, x_TD.shape[0]), **noise}
    jitter_TD = noise.pop("jitter_TD", None)
    if training and config.input_jitter > 0:
        if jitter_TD is None:
            raise ValueError("moe_layer: training with input_jitter > 0 needs rng (or router_noise['jitter_TD'])")
        x_TD = x_TD * jitter_TD.astype(x_TD.dtype)
    router_dtype = jnp.dtype(config.router_dtype)
    logits_TE = x_TD.astype(router_dtype) @ params["router"].astype(router_dtype)
    routing = _routing.route(config.router, logits_TE, top_k=config.top_k, training=training, rng=rng_router,
                             **config.router_options(), **noise)
    y_TD, dispatch_metrics = _dispatch.moe_ffn(
        params["experts"], x_TD, routing.expert_ids, routing.weights.astype(x_TD.dtype),
        activation=config.activation, backend=config.backend, capacity_factor=config.capacity_factor)
    metrics = dict(routing.metrics)
    metrics.update(dispatch_metrics)
    metrics.update(_losses.routing_metrics(routing.expert_ids, routing.probs))
    aux = {
        "load_balance_loss": _losses.load_balance_loss(routing.expert_ids, routing.probs,
                                                       num_groups=config.load_balance_groups),
        "z_loss": _losses.router_z_loss(routing.logits),
        "metrics": metrics,
    }
    return y_TD, aux
