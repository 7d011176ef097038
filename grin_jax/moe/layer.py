"""The MoE feed-forward layer: ONE body for one device and for a mesh.

Axes: B batch, S sequence, T tokens, L tokens of one data shard, D model, E experts, F expert hidden, K slots.

    y, aux = moe_layer(params, x, config=MoEConfig(...), training=..., rng=...)              # one device
    y, aux = moe_layer(params, x, config=..., training=..., rng=..., mesh=mesh)              # a mesh (shard_map)

x is [T, D] (token-choice routers) or [B, S, D] (any router; expert choice needs it). Parameters:
{'router': [D, E] (no bias), 'experts': stacked expert weights (experts.py)}.

The body: input jitter -> router matmul -> the router (routing.py registry) -> the router's dispatcher
(`DISPATCHERS`: token choice = dispatch.moe_ffn on one device, a parallel strategy of parallel.py on a mesh;
expert choice = expert_choice.expert_choice_dispatch) -> aux. On a mesh the same body runs inside one
`jax.shard_map` with the mesh axes passed in explicitly (a `parallel.ParallelLayout`); collectives are skipped
when the layout is None. Training noise (the input jitter and the router's draws) is drawn on the GLOBAL token
axis before the shard_map (`draw_noise`), so any mesh gives one device's numbers.

aux: {'losses': {'load_balance_loss', 'z_loss'} (unweighted scalars), 'metrics': {expert_load [E], max_load,
router_entropy, dropped_fraction, router metrics ...}}; `MoEConfig.loss_weights` are the coefficients the model
applies.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grin_jax import sections as _sections
from grin_jax.moe import dispatch as _dispatch
from grin_jax.moe import expert_choice as _expert_choice
from grin_jax.moe import experts as _experts
from grin_jax.moe import losses as _losses
from grin_jax.moe import parallel as _parallel
from grin_jax.moe import routing as _routing

PARALLEL_STRATEGIES = tuple(_parallel.STRATEGIES)
ROUTER_DTYPES = ("float32", "float64", "bfloat16")
DEFAULT_SHAPE = {"num_experts": 16, "top_k": 2, "d_hidden": 1024}  # when not fine-grained and not given


def _fail(name, value, accepted):
    raise ValueError(f"moe.{name}={value!r} is invalid: accepted values are {accepted}")


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, value, f"integers >= {minimum}")


def _check_number(name, value, *, low=0.0, low_open=False, high=math.inf, high_open=True):
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        _fail(name, value, f"finite numbers in {bounds}")


def fine_grained_shape(d_ff: int, expansion_rate, granularity: int) -> dict:
    """Krajewski et al.'s parametrisation (docs/fine_grained.md): E*G experts of width d_ff/G, top_k = G, so the
    active expert parameters do not change with G. Returns {'num_experts', 'd_hidden', 'top_k'}."""
    _check_int("granularity", granularity)
    _check_number("expansion_rate", expansion_rate, low_open=True)
    if d_ff % granularity:
        divisors = [k for k in range(1, min(d_ff, 256) + 1) if d_ff % k == 0]
        _fail("granularity", granularity, f"divisors of the dense FFN width d_ff={d_ff}, e.g. {divisors}")
    num_experts = expansion_rate * granularity
    if not float(num_experts).is_integer():
        _fail("expansion_rate", expansion_rate, f"numbers that make expansion_rate * granularity={granularity} an "
              "integer number of experts")
    return {"num_experts": int(num_experts), "d_hidden": d_ff // granularity, "top_k": granularity}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One MoE layer (the config section `model.moe`; d_model comes from the model). Validated on construction.

    Shape: num_experts E, top_k K, d_hidden F (expert width); None = 16, 2, 1024. Fine-grained (docs/fine_grained.md):
      expansion_rate (None = off) and granularity G derive num_experts = E*G, d_hidden = d_ff/G, top_k = G from the
      dense width d_ff (None = 4 * d_model); leave the derived fields None (or give exactly the derived values).
    activation: expert activation (experts.ACTIVATIONS).
    router: a name in routing.ROUTERS; router_options: that router's options (a mapping or its dataclass).
    input_jitter: multiplicative U(1-eps, 1+eps) jitter of the layer input in training (GRIN 0.01; 0 = off),
      applied once; the experts see the jittered input.
    backend: dispatch.BACKENDS for token-choice routers on one device ('auto': the platform's fastest dropless
      backend). capacity_factor: for backend 'capacity' and the 'alltoall' strategy.
    parallel: the token-choice strategy on a mesh of more than one device ('allgather' dropless, 'alltoall'
      capacity, 'ragged_alltoall' GPU / TPU). load_balance_groups: 1 = global balance over the batch (GRIN);
      G > 1 = per-group ("local"; on a mesh G must equal the number of data shards).
    router_dtype: dtype of the router matmul (at precision HIGHEST) and softmax.
    output_norm: a norm (of the model's norm kind) on the layer output before the residual add ("crucial for
      G > 1" in the fine-grained paper; applied by the FFN kind, not here).
    load_balance_coef, z_loss_coef: the weights of the aux losses (`loss_weights`).
    """

    d_model: int
    num_experts: int | None = None
    top_k: int | None = None
    d_hidden: int | None = None
    granularity: int = 1
    expansion_rate: float | None = None
    d_ff: int | None = None
    activation: str = "swiglu"
    router: str = "sparsemixer_v2"
    router_options: Any = None
    input_jitter: float = 0.0
    backend: str = "auto"
    capacity_factor: float = 1.25
    parallel: str = "allgather"
    load_balance_groups: int = 1
    router_dtype: str = "float32"
    output_norm: bool = False
    load_balance_coef: float = 0.0
    z_loss_coef: float = 0.0

    def __post_init__(self):
        _check_int("d_model", self.d_model)
        self._derive_shape()
        for name in ("num_experts", "top_k", "d_hidden", "load_balance_groups"):
            _check_int(name, getattr(self, name))
        if self.top_k > self.num_experts:
            _fail("top_k", self.top_k, f"1..num_experts={self.num_experts}")
        if self.activation not in _experts.ACTIVATIONS:
            _fail("activation", self.activation, sorted(_experts.ACTIVATIONS))
        if self.router not in _routing.ROUTERS:
            _fail("router", self.router, sorted(_routing.ROUTERS))
        object.__setattr__(self, "router_options", _routing.make_options(self.router, self.router_options))
        _dispatch.check_backend(self.backend)
        if self.parallel not in PARALLEL_STRATEGIES:
            _fail("parallel", self.parallel, list(PARALLEL_STRATEGIES))
        if self.router_dtype not in ROUTER_DTYPES:
            _fail("router_dtype", self.router_dtype, list(ROUTER_DTYPES))
        _check_number("input_jitter", self.input_jitter, high=1.0)
        _check_number("capacity_factor", self.capacity_factor, low_open=True)
        for name in ("load_balance_coef", "z_loss_coef"):
            _check_number(name, getattr(self, name))
        if not isinstance(self.output_norm, bool):
            _fail("output_norm", self.output_norm, "True or False")

    def _derive_shape(self) -> None:
        if self.expansion_rate is None:
            if self.granularity != 1:
                _fail("granularity", self.granularity, "1 without expansion_rate (set expansion_rate E to derive "
                      "num_experts = E*G, d_hidden = d_ff/G, top_k = G)")
            derived = {}
        else:
            d_ff = 4 * self.d_model if self.d_ff is None else self.d_ff
            _check_int("d_ff", d_ff)
            derived = fine_grained_shape(d_ff, self.expansion_rate, self.granularity)
        for name, default in DEFAULT_SHAPE.items():
            given = getattr(self, name)
            if name in derived and given is not None and given != derived[name]:
                _fail(name, given, f"None or {derived[name]}, the value derived from expansion_rate="
                      f"{self.expansion_rate}, granularity={self.granularity}, d_ff={self.d_ff}")
            value = derived.get(name, default if given is None else given)
            object.__setattr__(self, name, value)

    @classmethod
    def from_section(cls, values, *, d_model: int) -> "MoEConfig":
        """From a config section (mapping or ConfigDict); unknown keys raise naming the accepted ones."""
        return _sections.from_section(cls, values, d_model=d_model, section="moe")

    def to_section(self) -> dict:
        """The config section (router_options as a plain dict; a fine-grained config leaves out the derived
        num_experts, top_k, d_hidden, so they re-derive when d_model or the granularity changes)."""
        values = dataclasses.asdict(self)
        del values["d_model"]
        if self.expansion_rate is not None:
            for name in DEFAULT_SHAPE:
                del values[name]
        return values

    @property
    def router_spec(self) -> _routing.RouterSpec:
        return _routing.get_router(self.router)

    @property
    def loss_weights(self) -> dict:
        return {"load_balance_loss": float(self.load_balance_coef), "z_loss": float(self.z_loss_coef)}


def init_moe_params(key, config: MoEConfig, dtype=jnp.float32) -> dict:
    k_router, k_experts = jax.random.split(key)
    router = (jax.random.normal(k_router, (config.d_model, config.num_experts), jnp.float32)
              / config.d_model ** 0.5).astype(dtype)
    experts = _experts.init_expert_params(k_experts, num_experts=config.num_experts, d_model=config.d_model,
                                          d_hidden=config.d_hidden, activation=config.activation, dtype=dtype)
    return {"router": router, "experts": experts}


def draw_noise(rng, config: MoEConfig, num_tokens: int, dtype=None) -> dict:
    """The layer's training noise for `num_tokens` tokens, every array with the token axis first:
    {'jitter': [T, D] float32 input-jitter factors U(1-eps, 1+eps) (when input_jitter > 0), plus the router's own
    draws (routing.draw; e.g. SparseMixer-v2's 'gumbel_TKE', 'uniform_TK', dtype default config.router_dtype)}."""
    rng_jitter, rng_router = jax.random.split(rng)
    noise = {}
    if config.input_jitter > 0:
        eps = config.input_jitter
        noise["jitter"] = jax.random.uniform(rng_jitter, (num_tokens, config.d_model), jnp.float32, 1.0 - eps,
                                             1.0 + eps)
    dtype = jnp.dtype(config.router_dtype if dtype is None else dtype)
    noise.update(_routing.draw(config.router, rng_router, config.router_options, num_tokens=num_tokens,
                               num_experts=config.num_experts, top_k=config.top_k, dtype=dtype))
    return noise


# ------------------------------------------------------------------------------------------------ dispatchers
def _token_choice_dispatcher(params, x, routing, *, config, layout, options):
    """Token choice: dispatch.moe_ffn on one device, else the mesh strategy config.parallel. x: [L, D]."""
    weights = routing.weights.astype(x.dtype)
    if layout is None:
        y, metrics = _dispatch.moe_ffn(params["experts"], x, routing.expert_ids, weights,
                                       activation=config.activation, backend=config.backend,
                                       capacity_factor=config.capacity_factor)
    else:
        y, metrics = _parallel.run_strategy(config.parallel, params["experts"], x, routing.expert_ids, weights,
                                            layout=layout, num_experts=config.num_experts,
                                            activation=config.activation, backend=config.backend,
                                            capacity_factor=config.capacity_factor, **options)
    axis = layout.data_axis_name if layout else None
    load_E = _losses.expert_load(routing.expert_ids, config.num_experts, axis)
    groups = config.load_balance_groups
    if groups == 1:
        lb = _losses.load_balance_loss(routing.expert_ids, routing.probs, axis_name=axis)
    elif layout is None or layout.num_data_shards == 1:  # all the tokens are here
        lb = _losses.load_balance_loss(routing.expert_ids, routing.probs, num_groups=groups)
    else:  # one group per data shard (checked by resolve_layout)
        lb = _parallel.pmean(_losses.load_balance_loss(routing.expert_ids, routing.probs), axis)
    return y, lb, load_E, metrics


def _expert_choice_dispatcher(params, x_SBD, routing, *, config, layout, options):
    """Expert choice over the whole batch (on a mesh the batch was gathered: every device routes all groups and
    runs its local experts; the expert shards' outputs are summed)."""
    del options
    token_SEC, weights_SEC = routing.expert_ids, routing.weights
    if layout is not None and layout.expert_axis:
        local = config.num_experts // layout.num_expert_shards
        start = jax.lax.axis_index(layout.expert_axis) * local
        token_SEC = jax.lax.dynamic_slice_in_dim(token_SEC, start, local, axis=1)
        weights_SEC = jax.lax.dynamic_slice_in_dim(weights_SEC, start, local, axis=1)
    y_SBD = _expert_choice.expert_choice_dispatch(params["experts"], x_SBD,
                                                  routing._replace(expert_ids=token_SEC, weights=weights_SEC),
                                                  activation=config.activation)
    if layout is not None and layout.expert_axis:
        y_SBD = jax.lax.psum(y_SBD, layout.expert_axis)
    load_E = jnp.full((config.num_experts,), 1.0 / config.num_experts, jnp.float32)  # balanced by construction
    lb = config.num_experts * jnp.sum(load_E * jnp.mean(routing.probs, axis=0))
    return y_SBD, lb, load_E, {"dropped_fraction": routing.metrics["dropped_fraction"]}


DISPATCHERS = {"token_choice": _token_choice_dispatcher, "expert_choice": _expert_choice_dispatcher}


# ------------------------------------------------------------------------------------------------ the body
def _gather_invariant(x_local, layout):
    """The whole batch on every device, typed as replicated over the data axes (a psum of each shard's rows
    placed in zeros: lax.all_gather's result counts as varying, which out_specs P() would reject)."""
    rows = x_local.shape[0]
    index = jax.lax.axis_index(layout.data_axes)
    full = jnp.zeros((rows * layout.num_data_shards,) + x_local.shape[1:], x_local.dtype)
    full = jax.lax.dynamic_update_slice_in_dim(full, x_local, index * rows, axis=0)
    return jax.lax.psum(full, layout.data_axes)


def _body(params, x, noise, expert_load_E=None, *, config: MoEConfig, training: bool, layout, options):
    """x: [L, D] token choice or [B_l, S, D]; noise: this shard's rows of draw_noise's arrays (or None);
    expert_load_E: the whole step's expert load for the load-balance loss (moe_layer), or None."""
    shape = x.shape
    noise = dict(noise or {})
    jitter = noise.pop("jitter", None)
    if training and config.input_jitter > 0:
        x = x * jitter.reshape(x.shape).astype(x.dtype)
    spec = config.router_spec
    router_dtype = jnp.dtype(config.router_dtype)
    gathered = spec.dispatch == "expert_choice" and layout is not None and layout.data_axes
    if spec.dispatch == "expert_choice":
        if gathered:  # groups (the batch at one position) span the data shards
            x = _gather_invariant(x, layout)
        x = jnp.swapaxes(x, 0, 1)                                        # [S, B, D]
    else:
        x = x.reshape(-1, x.shape[-1])
    # precision HIGHEST: a float32 router computes in float32 on every platform (a float32 matmul's default is one
    # bfloat16 pass on TPU, TF32 on recent GPUs; ds_moe, moa and peer ask the same); nothing changes on CPU.
    logits = jnp.matmul(x.astype(router_dtype), params["router"].astype(router_dtype),
                        precision=jax.lax.Precision.HIGHEST)
    routing = _routing.route(config.router, logits, top_k=config.top_k, training=training,
                             options=config.router_options, noise=noise or None)
    y, lb, load_E, dispatch_metrics = DISPATCHERS[spec.dispatch](params, x, routing, config=config, layout=layout,
                                                                 options=options)
    axis = layout.data_axis_name if layout is not None and not gathered else None
    if expert_load_E is not None and spec.dispatch == "token_choice":
        lb = _losses.load_balance_loss(routing.expert_ids, routing.probs, axis_name=axis, expert_load_E=expert_load_E)
    if layout is not None and layout.model_axis:
        y = jax.lax.psum(y, layout.model_axis)                          # tensor parallelism: sum F-slices
    if spec.dispatch == "expert_choice":
        y = jnp.swapaxes(y, 0, 1)
        if gathered:
            rows = y.shape[0] // layout.num_data_shards
            y = jax.lax.dynamic_slice_in_dim(y, jax.lax.axis_index(layout.data_axes) * rows, rows, axis=0)
    y = y.reshape(shape)
    probs = routing.probs.astype(jnp.float32)
    entropy = -jnp.mean(jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30, 1.0)), axis=-1))
    metrics = {k: _parallel.pmean(jnp.asarray(v, jnp.float32), axis) for k, v in routing.metrics.items()}
    metrics.update(dispatch_metrics)
    metrics.update({"expert_load": load_E, "max_load": jnp.max(load_E) * config.num_experts,
                    "router_entropy": _parallel.pmean(entropy, axis)})
    losses = {"load_balance_loss": lb, "z_loss": _losses.router_z_loss(routing.logits, axis_name=axis)}
    return y, {"losses": losses, "metrics": metrics}


def moe_layer(params: dict, x: jax.Array, *, config: MoEConfig, training: bool, rng=None,
              noise: dict | None = None, mesh=None, data_axes=("data", "expert"), expert_axis: str | None = "expert",
              model_axis: str | None = "model", ragged_all_to_all=None, expert_load_E: jax.Array | None = None):
    """One MoE FFN layer. x: [T, D] or [B, S, D] -> (y of x's shape, aux).

    expert_load_E [E]: gradient accumulation's whole-batch expert load f (losses.load_balance_loss), used by the
      token-choice load-balance loss instead of this batch's (load_balance_groups must be 1); None: this batch's.

    rng: the training noise is drawn from it on the global token axis (`draw_noise`); noise: explicit arrays
      instead (what it holds wins over rng's draws).
    mesh: run the same body inside one shard_map over `mesh` (tokens over `data_axes`, experts over `expert_axis`,
      expert width over `model_axis`; parallel.py documents the layouts). A mesh the layer cannot use raises
      ValueError naming what is wrong. ragged_all_to_all: the collective of the 'ragged_alltoall' strategy (tests
      pass parallel.emulated_ragged_all_to_all on CPU).
    """
    if x.ndim not in (2, 3) or x.shape[-1] != config.d_model:
        raise ValueError(f"x must be [tokens, d_model={config.d_model}] or [batch, seq, d_model], got {x.shape}")
    if config.router_spec.dispatch == "expert_choice" and x.ndim != 3:
        raise ValueError(f"router={config.router!r} groups tokens by position and needs x as [batch, seq, d_model], "
                         f"got shape {x.shape}")
    num_tokens = math.prod(x.shape[:-1])
    if training:
        drawn = draw_noise(rng, config, num_tokens) if rng is not None else {}
        noise = {**drawn, **(noise or {})}
        if config.input_jitter > 0 and "jitter" not in noise:
            raise ValueError("moe_layer: training with input_jitter > 0 needs rng (or noise['jitter'])")
    else:
        noise = None
    if expert_load_E is not None and config.load_balance_groups != 1:
        raise ValueError(f"moe.load_balance_groups={config.load_balance_groups} with a whole-batch expert load "
                         "(gradient accumulation): accepted value is 1")
    if mesh is None:
        return _body(params, x, noise, expert_load_E, config=config, training=training, layout=None, options={})
    layout = _parallel.resolve_layout(config, mesh, x.shape[0], data_axes=data_axes, expert_axis=expert_axis,
                                      model_axis=model_axis)
    options = _parallel.strategy_options(config.parallel, mesh, ragged_all_to_all=ragged_all_to_all)
    _experts.check_expert_params(params["experts"], config.activation)
    token_spec = P(layout.data_axes or None, *([None] * (x.ndim - 1)))
    noise_specs = None if noise is None else {k: P(layout.data_axes or None, *([None] * (v.ndim - 1)))
                                              for k, v in noise.items()}
    specs = (layout.param_specs(params["experts"]), token_spec, noise_specs,
             None if expert_load_E is None else P())
    args = _parallel.reshard_explicit((params, x, noise, expert_load_E), specs, mesh)
    body = jax.shard_map(lambda p, xs, n, load: _body(p, xs, n, load, config=config, training=training,
                                                       layout=layout, options=options),
                         mesh=mesh, in_specs=specs, out_specs=(token_spec, P()))
    return body(*args)
