"""Expert- and tensor-parallel MoE layer: ONE `jax.shard_map` boundary around router, dispatch and combine.

Axes: T tokens (global), L = T / N_data tokens per data shard, D model, E experts, S = N_expert expert shards,
E_l = E / S experts per shard, F expert hidden, F_l = F / N_model, K slots per token, C capacity,
M token-slot rows.

    y_TD, aux = moe_layer_parallel(params, x_TD, config=MoEConfig(...), mesh=mesh, strategy='allgather',
                                   training=True, rng=key)

The layer body is `layer.moe_layer`'s (one body for one device and a mesh); this module holds the mesh layout and
the token-choice strategies the body calls inside its shard_map. aux is replicated.

Layout (the PartitionSpecs are in `ParallelLayout`):
  tokens x_TD           P(data_axes, None)   data_axes = ('data', 'expert') by default: the expert axis is also a
                                              data axis for tokens (GShard / MaxText); tokens are replicated over
                                              the model axis.
  router [D, E]         P()                   replicated; routing is computed redundantly on the model shards.
  w_gate, w_up [E,D,F]  P(expert, None, model)
  w_down [E, F, D]      P(expert, model, None)
  router noise [.., T, ..]  T sharded like the tokens (e.g. gumbel_KTE: P(None, data_axes, None)).

Tensor parallelism (GRIN's proposal instead of expert parallelism) applies to every strategy: each model shard
holds an F-slice of every local expert; the expert MLP is exact per F-column (act(x W_gate) * (x W_up) is
elementwise in F), so each model shard computes a partial output with its slice and one `psum` over the model
axis of the [L, D] layer output completes it. No drops, no token movement over the model axis.

Strategies (`STRATEGIES`); worst-case per-device buffers for one layer:

  'allgather' (dropless, the default). all_gather the tokens and their routing over the expert axis; each
      expert shard sorts the S*L*K gathered token-slots by LOCAL expert id (slots routed to other shards' experts
      get the key E_l and sort to the end: the gmm contract allows sum(group_sizes) < M and gives them zeros),
      runs its E_l experts with a grouped matmul, combines the weighted slot outputs per gathered token, and
      `psum_scatter`s the [S*L, D] partial outputs back to the token shards (which also sums the expert shards'
      contributions); then `psum` over the model axis.
        buffers: gathered tokens [S*L, D] + routing [S*L, K]; sorted rows [S*L*K, D]; hidden [S*L*K, F_l]
        (x2 for gated activations); expert output [S*L*K, D]; combined [S*L, D]. S*L*K rows is the true worst
        case (every token-slot of the expert-group routed to this shard); the 'tiled' gmm pads it to
        (ceil(S*L*K / tile_rows) + E_l) * tile_rows rows and computes all of them.
        communication: all_gather (S-1)*L*(D + 2K) in, psum_scatter (S-1)*L*D, psum over model L*D.
  'alltoall' (capacity, drops). Each shard buckets its own L*K token-slots per destination expert into
      [E, C, D], C = ceil(capacity_factor * L * K / E) per (source shard, expert); priority is slot-major
      (every token's first choice before any second choice), then token order, as `dispatch` 'capacity'
      on the shard's tokens. `lax.all_to_all` over the expert axis delivers [S, E_l, C, D] to the expert
      shards, each runs its experts as a batched matmul on [E_l, S*C, D], all_to_all back, combine.
      Dropped token-slots contribute zero; metric 'dropped_fraction' is global (psum over the data axes).
      Exact (equal to the dropless layer) when C >= L, i.e. capacity_factor >= E / K.
        buffers: dispatch [E*C, D] ~ capacity_factor * L * K * D; received the same; hidden [E_l, S*C, F_l];
        return buffer [E*C, D]. communication: 2 all_to_all of (S-1)/S * E*C*D; psum over model L*D.
  'ragged_alltoall' (dropless, accelerators). Sort the L*K slots by global expert, all_gather the [E] counts
      over the expert axis, `lax.ragged_all_to_all` sends every expert's rows straight into the receiving
      shard's buffer at an offset such that the buffer comes out sorted by (local expert, source shard): no
      re-sort. Grouped matmul, ragged_all_to_all back to the sending positions, unsort, combine.
        buffers: send [L*K, D]; receive [S*L*K, D] (worst case: all slots of all S shards routed to this
        shard; MaxText allocates the same without a buffer factor); hidden [S*L*K, F_l]; return [L*K, D].
        communication: counts all_gather S*E ints, then exactly the routed rows (no padding) each way.
      XLA:CPU does not implement ragged_all_to_all: on CPU meshes this strategy raises NotImplementedError
      before anything is traced. Its offset arithmetic is tested on CPU with `emulated_ragged_all_to_all`
      (pass `ragged_all_to_all=emulated_ragged_all_to_all`), which has the primitive's semantics built from
      all_gather + scatter; the real primitive is untested here (no accelerator).

Load balance: 'global' (GRIN) all-reduces f_i (and P_i) over the data axes, equal to the single-device loss on
the whole batch; 'local' computes the Switch loss per data shard and averages over the shards (equal to the
single-device loss with load_balance_groups = number of data shards).

Routing randomness: `layer.moe_layer` draws the training noise (`layer.draw_noise`: every array token-first)
on the global token axis before the shard_map and splits it along axis 0 like the tokens, so the result equals
the single-device layer on any mesh.

Expert choice (a router whose dispatcher groups tokens by position): its groups span the data shards, so the body
all_gathers the batch over the data axes, routes every group on every device, runs the local experts and sums the
expert shards' outputs (psum over the expert axis); each device keeps its own rows. Exact, but the expert
compute is repeated over the data axis (a data-parallel mesh gains nothing in this layer): use it for
correctness at small scale, token-choice routers for scale.

Meshes: `make_mesh` builds ('data', 'expert', 'model') with Explicit axes by default: jax.make_mesh's default
and the mode the Flax NNX modules use (parameter shardings are part of the array types under jax.set_mesh).
Under Explicit axes shard_map requires its inputs' shardings to equal in_specs, so this layer `jax.reshard`s
its inputs to the layout above (a no-op when they already match, a visible collective when not: shard the
parameters with `param_shardings` once rather than per step). Under Auto axes the layer passes the inputs as
they are and shard_map inserts the same resharding under jit. Both are tested.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from grin_jax.moe import dispatch as _dispatch
from grin_jax.moe import experts as _experts
from grin_jax.moe import gmm as _gmm

STRATEGIES = ("allgather", "alltoall", "ragged_alltoall")
LOAD_BALANCE_MODES = ("global", "local")
DEFAULT_AXIS_NAMES = ("data", "expert", "model")
# The axes tokens are sharded over on the trainer's ('data', 'fsdp', 'expert', 'model') mesh (grin_jax.sharding):
# the layer's data_axes there are those of them the mesh has.
BATCH_AXIS_NAMES = ("data", "fsdp", "expert")


# ----------------------------------------------------------------------------------------------------------------
# Mesh and layout
# ----------------------------------------------------------------------------------------------------------------

def make_mesh(data: int = 1, expert: int = 1, model: int = 1, *, axis_names=DEFAULT_AXIS_NAMES,
              axis_types: str = "explicit", devices=None) -> jax.sharding.Mesh:
    """A (data, expert, model) mesh via `jax.make_mesh`; axis_types 'explicit' (default) or 'auto'."""
    kinds = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
    if axis_types not in kinds:
        raise ValueError(f"axis_types={axis_types!r} is unknown: accepted values are {sorted(kinds)}")
    return jax.make_mesh((data, expert, model), tuple(axis_names), axis_types=(kinds[axis_types],) * 3,
                         devices=devices)


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """Mesh axes of one MoE layer and their sizes (validated by `resolve_layout`)."""

    data_axes: tuple[str, ...]
    expert_axis: str | None
    model_axis: str | None
    num_data_shards: int
    num_expert_shards: int
    num_model_shards: int

    @property
    def data_axis_name(self):
        """The data axes as a collective axis_name (None when there are none)."""
        return self.data_axes if self.data_axes else None

    def token_spec(self) -> P:
        return P(self.data_axes or None, None)

    def param_specs(self, expert_params: dict) -> dict:
        """PartitionSpecs for {'router', 'experts'} (E on the expert axis, F on the model axis)."""
        specs = {}
        for name in expert_params:
            if name == "w_down":
                specs[name] = P(self.expert_axis, self.model_axis, None)
            else:  # w_up, w_gate [E, D, F]
                specs[name] = P(self.expert_axis, None, self.model_axis)
        return {"router": P(), "experts": specs}


def _axis_sizes(mesh) -> dict:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def resolve_layout(config, mesh, num_tokens: int | None = None, *,
                   data_axes=("data", "expert"), expert_axis="expert", model_axis="model") -> ParallelLayout:
    """Check that the layer can be laid out on `mesh`; raises ValueError naming what is wrong."""
    if isinstance(data_axes, str):
        data_axes = (data_axes,)
    data_axes = tuple(data_axes or ())
    sizes = _axis_sizes(mesh)
    for role, names in (("data_axes", data_axes), ("expert_axis", (expert_axis,) if expert_axis else ()),
                        ("model_axis", (model_axis,) if model_axis else ())):
        for name in names:
            if name not in sizes:
                raise ValueError(f"{role}: axis {name!r} is not in the mesh; the mesh axes are "
                                 f"{tuple(mesh.axis_names)} (pass None to disable an axis)")
    if len(set(data_axes)) != len(data_axes):
        raise ValueError(f"data_axes={data_axes!r} names an axis twice")
    if expert_axis is not None and expert_axis not in data_axes:
        raise ValueError(f"expert_axis={expert_axis!r} must also be one of data_axes={data_axes!r}: tokens are "
                         "sharded over the expert axis (it acts as a data axis for tokens, as in GShard/MaxText)")
    if model_axis is not None and (model_axis in data_axes or model_axis == expert_axis):
        raise ValueError(f"model_axis={model_axis!r} must differ from expert_axis={expert_axis!r} and from "
                         f"data_axes={data_axes!r}")
    num_data = math.prod(sizes[a] for a in data_axes)
    num_expert = sizes[expert_axis] if expert_axis else 1
    num_model = sizes[model_axis] if model_axis else 1
    check_sizes(config, num_data=num_data, num_expert=num_expert, num_model=num_model, expert_axis=expert_axis,
                model_axis=model_axis)
    if num_tokens is not None and num_tokens % num_data:
        raise ValueError(f"the leading dimension of x ({num_tokens} tokens or sequences) is not divisible by the "
                         f"{num_data} data shards (data_axes={data_axes!r}, sizes {[sizes[a] for a in data_axes]})")
    return ParallelLayout(data_axes, expert_axis, model_axis, num_data, num_expert, num_model)


def check_sizes(config, *, num_data: int, num_expert: int, num_model: int, expert_axis="expert",
                model_axis="model") -> None:
    """The MoE config against the mesh sizes (one place: the layer at trace time and the FFN kind's config-time
    check both call it); raises ValueError naming the key."""
    if config.num_experts % num_expert:
        raise ValueError(f"moe.num_experts={config.num_experts} is not divisible by the expert axis {expert_axis!r} "
                         f"of size {num_expert}: choose num_experts a multiple of {num_expert} or a smaller expert axis")
    if config.d_hidden % num_model:
        raise ValueError(f"moe.d_hidden={config.d_hidden} is not divisible by the model axis {model_axis!r} of size "
                         f"{num_model}: tensor parallelism shards the expert hidden dimension F")
    groups = getattr(config, "load_balance_groups", 1)
    if num_data * num_model > 1 and groups not in (1, num_data):
        raise ValueError(f"moe.load_balance_groups={groups} is not supported on a mesh with {num_data} data shards: "
                         f"accepted values are 1 (global balance, GRIN) or {num_data} (one group per data shard)")


def param_shardings(params: dict, mesh, *, expert_axis: str | None = "expert",
                    model_axis: str | None = "model") -> dict:
    """NamedShardings for the MoE parameters (use with jax.device_put / as jit out_shardings)."""
    layout = ParallelLayout((), expert_axis, model_axis, 1, 1, 1)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), layout.param_specs(params["experts"]),
                        is_leaf=lambda s: isinstance(s, P))


def _platforms(mesh) -> set:
    devices = getattr(mesh, "devices", None)
    if devices is None:  # AbstractMesh
        return {jax.default_backend()}
    return {d.platform for d in devices.flat}


# ----------------------------------------------------------------------------------------------------------------
# Helpers inside shard_map
# ----------------------------------------------------------------------------------------------------------------

def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # older / newer JAX
    if vma is None:
        mat = getattr(aval, "manual_axis_type", None)  # jax 0.10
        vma = getattr(mat, "varying", frozenset())
    return frozenset(vma)


def _vary(x, axes):
    """pcast x to varying over `axes` where it is not already (pcast varying->varying raises)."""
    missing = tuple(a for a in axes if a is not None and a not in _varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x


def psum(x, axis):
    return x if not axis else lax.psum(x, axis)


def pmean(x, axis):
    return x if not axis else lax.pmean(x, axis)


def _combine(y_TKD, weights_TK):
    return jnp.einsum("tkd,tk->td", y_TKD, weights_TK.astype(y_TKD.dtype))


def _inverse_permutation(order_M):
    return jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0], dtype=order_M.dtype))


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """`lax.ragged_all_to_all`'s semantics from all_gather + scatter (any backend, differentiable).

    For tests and debugging on CPU: it gathers every shard's operand ([S, rows, ...] per device), so it costs
    S x the memory of the real collective. Assumes the slices of one operand do not overlap (true here).
    recv_sizes is implied by the senders' send_sizes and is not used.
    """
    del recv_sizes
    num_shards = lax.axis_size(axis_name)
    me = lax.axis_index(axis_name)
    num_slices = input_offsets.shape[0]
    per_device = num_slices // num_shards
    rows = operand.shape[0]
    ops_S = lax.all_gather(operand, axis_name, axis=0)                      # [S, rows, ...]
    gather = lambda a: lax.dynamic_slice_in_dim(lax.all_gather(a, axis_name, axis=0), me * per_device,
                                                per_device, axis=1)          # [S, per_device]: slices to me
    in_off, size, out_off = gather(input_offsets), gather(send_sizes), gather(output_offsets)
    row_R = jnp.arange(rows, dtype=in_off.dtype)
    inside = (row_R >= in_off[..., None]) & (row_R < (in_off + size)[..., None])    # [S, per_device, rows]
    dest = jnp.where(inside, out_off[..., None] + row_R - in_off[..., None], output.shape[0])
    dest_SR = jnp.min(dest, axis=1)                                         # rows sent to no slice: dropped
    flat = ops_S.reshape((num_shards * rows,) + operand.shape[1:])
    return output.at[dest_SR.reshape(-1)].set(flat, mode="drop")


# ----------------------------------------------------------------------------------------------------------------
# Strategies: (local expert params, x_LD, ids_LK, weights_LK) -> (partial y_LD over the model axis, metrics)
# ----------------------------------------------------------------------------------------------------------------

def _allgather_experts(expert_params, x_LD, ids_LK, weights_LK, *, layout, num_experts, activation, gmm):
    axis = layout.expert_axis if layout.num_expert_shards > 1 else None
    local_experts = num_experts // layout.num_expert_shards
    top_k = ids_LK.shape[1]
    if axis:
        x_GD = lax.all_gather(x_LD, axis, axis=0, tiled=True)           # G = S * L gathered tokens
        ids_GK = lax.all_gather(ids_LK, axis, axis=0, tiled=True)
        weights_GK = lax.all_gather(weights_LK, axis, axis=0, tiled=True)
        local_GK = ids_GK - lax.axis_index(axis) * local_experts
    else:
        x_GD, ids_GK, weights_GK, local_GK = x_LD, ids_LK, weights_LK, ids_LK
    mine_GK = (local_GK >= 0) & (local_GK < local_experts)
    key_M = jnp.where(mine_GK, local_GK, local_experts).reshape(-1)      # others' slots: key E_l, sorted last
    order_M = jnp.argsort(key_M, stable=True)
    group_sizes = jnp.bincount(key_M, length=local_experts + 1)[:local_experts].astype(jnp.int32)
    x_MD = jnp.take(x_GD, order_M // top_k, axis=0)
    y_MD = _experts.apply_experts_grouped(expert_params, x_MD, group_sizes, activation=activation, gmm=gmm)
    y_GKD = jnp.take(y_MD, _inverse_permutation(order_M), axis=0).reshape(ids_GK.shape + (-1,))
    y_GD = _combine(y_GKD, jnp.where(mine_GK, weights_GK, 0))
    if axis:
        y_GD = lax.psum_scatter(y_GD, axis, scatter_dimension=0, tiled=True)
    return y_GD, {"dropped_fraction": jnp.float32(0.0)}


def _alltoall_experts(expert_params, x_LD, ids_LK, weights_LK, *, layout, num_experts, activation,
                      capacity_factor):
    axis = layout.expert_axis if layout.num_expert_shards > 1 else None
    num_shards = layout.num_expert_shards
    local_experts = num_experts // num_shards
    num_tokens, top_k = ids_LK.shape
    d_model = x_LD.shape[-1]
    capacity = _dispatch.capacity_per_expert(num_tokens, top_k, num_experts, capacity_factor)
    # E = (destination shard, local expert); priority as dispatch's 'capacity' backend.
    send_ECD, row_M, kept_M = _dispatch.capacity_buffer(x_LD, ids_LK, num_experts, capacity)
    recv_ECD = lax.all_to_all(send_ECD, axis, 0, 0, tiled=True) if axis else send_ECD  # E = (source, local)
    x_eRD = (recv_ECD.reshape(num_shards, local_experts, capacity, d_model).transpose(1, 0, 2, 3)
             .reshape(local_experts, num_shards * capacity, d_model))
    y_eRD = _experts.apply_experts_batched(expert_params, x_eRD, activation=activation)
    y_ECD = (y_eRD.reshape(local_experts, num_shards, capacity, d_model).transpose(1, 0, 2, 3)
             .reshape(num_experts, capacity, d_model))
    back_ECD = lax.all_to_all(y_ECD, axis, 0, 0, tiled=True) if axis else y_ECD
    y_MD = jnp.take(back_ECD.reshape(num_experts * capacity, d_model), row_M, axis=0, mode="fill", fill_value=0)
    y_LKD = y_MD.reshape(top_k, num_tokens, d_model).transpose(1, 0, 2)
    dropped = psum(jnp.sum(~kept_M).astype(jnp.float32), layout.data_axis_name)
    total = layout.num_data_shards * num_tokens * top_k
    return _combine(y_LKD, weights_LK), {"dropped_fraction": dropped / total, "capacity": jnp.int32(capacity)}


def _ragged_experts(expert_params, x_LD, ids_LK, weights_LK, *, layout, num_experts, activation, gmm,
                    ragged_all_to_all):
    axis = layout.expert_axis if layout.num_expert_shards > 1 else None
    num_shards = layout.num_expert_shards
    local_experts = num_experts // num_shards
    num_tokens, top_k = ids_LK.shape
    d_model = x_LD.shape[-1]
    ids_M = ids_LK.reshape(-1)                                           # row m = t*K + k
    order_M = jnp.argsort(ids_M, stable=True)
    counts_E = jnp.bincount(ids_M, length=num_experts).astype(jnp.int32)
    x_send_MD = jnp.take(x_LD, order_M // top_k, axis=0)                # sorted by global expert
    if axis:
        me = lax.axis_index(axis)
        counts_SE = lax.all_gather(counts_E, axis, axis=0)               # [source shard, global expert]
        # Sender side: rows of expert e start at in_off[s, e] in source s's sorted buffer.
        in_off_SE = jnp.cumsum(counts_SE, axis=1) - counts_SE
        # Receiver side: buffer sorted by (local expert, source shard).
        total_E = jnp.sum(counts_SE, axis=0)
        total_Se = total_E.reshape(num_shards, local_experts)
        base_E = (jnp.cumsum(total_Se, axis=1) - total_Se).reshape(num_experts)
        out_off_SE = base_E[None, :] + jnp.cumsum(counts_SE, axis=0) - counts_SE
        mine = lambda a_SE: lax.dynamic_slice_in_dim(a_SE, me * local_experts, local_experts, axis=1).reshape(-1)
        capacity_rows = num_shards * num_tokens * top_k                  # worst case: everything comes here
        recv_buffer = _vary(jnp.zeros((capacity_rows, d_model), x_LD.dtype), _varying_axes(x_send_MD))
        # Forward: one slice per global expert e (destination e // E_l).
        x_RD = ragged_all_to_all(x_send_MD, recv_buffer, in_off_SE[me], counts_SE[me], out_off_SE[me],
                                 mine(counts_SE), axis_name=axis)
        group_sizes = lax.dynamic_slice_in_dim(total_E, me * local_experts, local_experts)
    else:
        x_RD, group_sizes = x_send_MD, counts_E
    y_RD = _experts.apply_experts_grouped(expert_params, x_RD, group_sizes, activation=activation, gmm=gmm)
    if axis:
        # Back: one slice per (source s, local expert) to shard s, into its original sorted position.
        back_buffer = _vary(jnp.zeros((num_tokens * top_k, d_model), y_RD.dtype), _varying_axes(y_RD))
        y_MD = ragged_all_to_all(y_RD, back_buffer, mine(out_off_SE), mine(counts_SE), mine(in_off_SE),
                                 counts_SE[me], axis_name=axis)
    else:
        y_MD = y_RD
    y_LKD = jnp.take(y_MD, _inverse_permutation(order_M), axis=0).reshape(num_tokens, top_k, d_model)
    return _combine(y_LKD, weights_LK), {"dropped_fraction": jnp.float32(0.0)}


# ----------------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------------

def strategy_options(strategy: str, mesh, *, ragged_all_to_all: Callable | None = None) -> dict:
    """The strategy's extra arguments, checked before anything is traced ('ragged_alltoall' needs a collective:
    lax.ragged_all_to_all, not implemented on XLA:CPU, or the emulation for tests)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"moe.parallel={strategy!r} is unknown: accepted values are {list(STRATEGIES)}")
    if strategy != "ragged_alltoall":
        return {}
    if ragged_all_to_all is None:
        if "cpu" in _platforms(mesh):
            raise NotImplementedError(
                "moe.parallel='ragged_alltoall' uses lax.ragged_all_to_all, which is not implemented on XLA:CPU. "
                "On CPU use 'allgather' (dropless) or 'alltoall' (capacity factor, drops), or pass "
                "ragged_all_to_all=emulated_ragged_all_to_all (tests/debugging: all_gather-based, S x memory)")
        ragged_all_to_all = lax.ragged_all_to_all
    return {"ragged_all_to_all": ragged_all_to_all}


def run_strategy(strategy: str, expert_params, x_LD, ids_LK, weights_LK, *, layout, num_experts, activation,
                 backend, capacity_factor, ragged_all_to_all=None):
    """(this shard's tokens and routing) -> (y_LD partial over the model axis, metrics), inside shard_map."""
    gmm_name = backend if backend in _gmm.GMM_BACKENDS else _gmm.default_backend()  # 'kernel' is not a gmm
    common = dict(layout=layout, num_experts=num_experts, activation=activation)
    if strategy == "allgather":
        return _allgather_experts(expert_params, x_LD, ids_LK, weights_LK, gmm=_gmm.GMM_BACKENDS[gmm_name], **common)
    if strategy == "alltoall":
        return _alltoall_experts(expert_params, x_LD, ids_LK, weights_LK, capacity_factor=capacity_factor, **common)
    return _ragged_experts(expert_params, x_LD, ids_LK, weights_LK, gmm=_gmm.GMM_BACKENDS[gmm_name],
                           ragged_all_to_all=ragged_all_to_all, **common)


def moe_layer_parallel(params: dict, x: jax.Array, *, config, mesh, strategy: str | None = None, training: bool,
                       rng=None, router_noise: dict | None = None, load_balance: str = "global",
                       capacity_factor: float | None = None, gmm_backend: str | None = None, **axes):
    """`layer.moe_layer` on `mesh` with the strategy knobs as arguments (a convenience for benchmarks and tests):
    strategy (default config.parallel), load_balance 'global' | 'local' (= load_balance_groups of one group per
    data shard), capacity_factor and gmm_backend (default config's). axes: data_axes, expert_axis, model_axis,
    ragged_all_to_all as moe_layer."""
    from grin_jax.moe import layer as _layer  # the layer imports this module

    if load_balance not in LOAD_BALANCE_MODES:
        raise ValueError(f"load_balance={load_balance!r} is unknown: accepted values are {list(LOAD_BALANCE_MODES)}")
    changes = {"parallel": strategy or config.parallel}
    if capacity_factor is not None:
        changes["capacity_factor"] = capacity_factor
    if gmm_backend is not None:
        changes["backend"] = gmm_backend
    if load_balance == "local":
        layout = resolve_layout(config, mesh, **{k: v for k, v in axes.items() if k != "ragged_all_to_all"})
        changes["load_balance_groups"] = layout.num_data_shards
    config = dataclasses.replace(config, **changes)
    return _layer.moe_layer(params, x, config=config, training=training, rng=rng, noise=router_noise, mesh=mesh,
                            **axes)


def reshard_explicit(args, specs, mesh):
    """Under Explicit mesh axes shard_map needs inputs already sharded as in_specs: jax.reshard them (no-op when
    they match). Under Auto axes, leave them: shard_map reshards under jit."""
    types = dict(zip(mesh.axis_names, mesh.axis_types))

    def used_axes(spec):
        out = set()
        for entry in spec:
            if entry is None:
                continue
            out.update(entry if isinstance(entry, tuple) else (entry,))
        return out

    def one(arg, spec):
        if arg is None or spec is None:
            return arg
        if all(types[a] == AxisType.Explicit for a in used_axes(spec)) and any(
                t == AxisType.Explicit for t in types.values()):
            target = NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec
            return jax.reshard(arg, target)
        return arg

    return jax.tree.map(one, args, specs, is_leaf=lambda s: s is None or isinstance(s, P))
