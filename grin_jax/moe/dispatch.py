"""Dispatch token-slots to experts and combine their outputs. Axes: T tokens, D model, E experts,
K slots per token, M = T*K token-slot rows, C capacity per expert.

All backends share one contract:
    moe_ffn(expert_params, x_TD, expert_ids_TK, weights_TK, *, activation, backend, ...) -> (y_TD, metrics)
    y[t] = sum_k weights[t, k] * Expert_{expert_ids[t, k]}(x[t])
Backends (`BACKENDS`):
  dense       every expert on every token, then a weighted sum (the reference; E x FLOPs, [E, T, D] memory).
  ragged_dot  dropless: sort rows by expert, `jax.lax.ragged_dot`, unsort (the accelerator path).
  kernel      dropless, the fastest on CPU: `cpu_kernel.kernel_expert_mlp`, the whole expert MLP as a C++ XLA FFI
              custom call (per-expert chunks of rows, one OpenBLAS sgemm per matmul and chunk, OpenMP threads,
              custom VJP); built with the system g++ on first use. fwd+bwd on 2 CPU cores: ~1.05-1.1x a dense
              FFN with the same active FLOPs at E=8 top-2, ~1.1-1.2x at E=64 top-16 (python -m grin_jax.bench).
              Only the activations swiglu / geglu / gelu / relu and the compute dtype float32
              (`cpu_kernel.supports`); asking for it with anything else raises ValueError.
  tiled       dropless, pure XLA: `gmm.tiled_expert_mlp`, the whole expert MLP as loops over row tiles of one
              expert each (gather the tile's tokens, matmuls, weighted scatter-add); no sort, no [M, D] copies;
              custom VJP. ~1.25-1.35x at E=8 top-2, ~1.7x at E=64 top-16 (the CPU fallback of 'auto').
  capacity    GShard-style: each expert has C = ceil(capacity_factor * M / E) rows; slot 1 of every token
              has priority over slot 2; token-slots past capacity are dropped (metric 'dropped_fraction').
  auto        `default_backend()`, resolved when traced: 'ragged_dot' on GPU / TPU; on CPU 'kernel' when it supports
              the layer's activation and compute dtype (result type of x and the expert weights) and could be
              built here, else 'tiled'.

How 'auto' says why it did not pick 'kernel' on CPU (`select_backend` returns the reason; `resolve_backend` and
`default_backend` announce it once per process and per distinct reason, never on every trace):
  - the kernel cannot be built or loaded here (no compiler, a compiler error, the build timed out): a
    RuntimeWarning, since the machine runs a slower backend than it could and the user can fix that;
  - the kernel is disabled ($GRIN_JAX_KERNEL=0), or does not support the activation / dtype: an INFO record on the
    `grin_jax.moe.dispatch` logger, since 'tiled' is then the intended, correct choice and nothing is to be fixed.
The first resolution of 'auto' on CPU (or the first trace of backend='kernel') builds the kernel
(`cpu_kernel.ensure_built`: synchronous, the compiler under a timeout, the outcome cached for the process; see
cpu_kernel's docstring for why not in the background). $GRIN_JAX_KERNEL=0 switches the kernel off.
"""

from __future__ import annotations

import logging
import math
import warnings

import jax
import jax.numpy as jnp

from grin_jax.moe import cpu_kernel as _cpu_kernel
from grin_jax.moe import experts as _experts
from grin_jax.moe import gmm as _gmm

SORTED_BACKENDS = tuple(_gmm.GMM_BACKENDS)
BACKENDS = ("dense",) + SORTED_BACKENDS + ("kernel", "capacity", "auto")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown: accepted values are {list(BACKENDS)}")


def _select(backend, platform, activation, dtype) -> tuple[str, str | None, bool]:
    """(backend, reason 'auto' did not take 'kernel' on CPU or None, whether that reason deserves a warning)."""
    check_backend(backend)
    if backend == "kernel":
        _cpu_kernel.check_supported(activation, dtype)
        return backend, None, False
    if backend != "auto":
        return backend, None, False
    if _gmm.default_backend(platform) != "tiled":
        return _gmm.default_backend(platform), None, False
    unsupported = _cpu_kernel.supports(activation, dtype)
    if unsupported is not None:
        what = ", ".join(f"{k}={v}" for k, v in (("activation", activation),
                                                 ("dtype", None if dtype is None else jnp.dtype(dtype).name))
                         if v is not None)
        return "tiled", f"backend 'auto' uses 'tiled' on CPU for {what}: {unsupported}", False
    unavailable = _cpu_kernel.ensure_built()
    if unavailable is not None:
        warn = _cpu_kernel.disabled_reason() is None  # not when the user switched it off on purpose
        return "tiled", (f"backend 'auto' uses 'tiled' on CPU: the C++ kernel is unavailable "
                         f"({unavailable.splitlines()[0]})"), warn
    return "kernel", None, False


def select_backend(backend: str, platform: str | None = None, *, activation: str | None = None,
                   dtype=None) -> tuple[str, str | None]:
    """The concrete backend for `backend` and, when 'auto' took 'tiled' on CPU instead of 'kernel', the reason
    (else None). Announces nothing (`resolve_backend` does).

    activation, dtype: of the MoE layer (dtype = the compute dtype, jnp.result_type(x, expert weights)); None = not
    known, assumed supported (the behaviour of the one- and two-argument calls). backend='kernel' with an activation
    or dtype the kernel does not support: ValueError. Resolving 'auto' on CPU builds the kernel once
    (cpu_kernel.ensure_built); an explicit 'kernel' that cannot be built fails when run (KernelUnavailable)."""
    name, reason, _ = _select(backend, platform, activation, dtype)
    return name, reason


_log = logging.getLogger(__name__)
_ANNOUNCED: set[str] = set()  # reasons already warned about / logged in this process


def resolve_backend(backend: str, platform: str | None = None, *, activation: str | None = None,
                    dtype=None) -> str:
    """The concrete backend: 'auto' -> default_backend(platform, activation=, dtype=); other names are checked
    (and 'kernel' against the activation / dtype when given: ValueError) and returned. When 'auto' takes 'tiled'
    on CPU, says why once per process and reason (module docstring)."""
    name, reason, warn = _select(backend, platform, activation, dtype)
    if reason is not None and reason not in _ANNOUNCED:
        _ANNOUNCED.add(reason)
        if warn:
            warnings.warn(reason, RuntimeWarning, stacklevel=2)
        else:
            _log.info(reason)
    return name


def default_backend(platform: str | None = None, *, activation: str | None = None, dtype=None) -> str:
    """The fastest exact (dropless) backend for `platform` ('cpu', 'gpu', 'tpu', ...; default: JAX's default
    backend) and, when known, the layer's activation and compute dtype: 'ragged_dot' on accelerators; on CPU
    'kernel', or 'tiled' when the kernel does not support them or cannot be built here (saying why once, see the
    module docstring)."""
    return resolve_backend("auto", platform, activation=activation, dtype=dtype)


def sort_by_expert(expert_ids_TK: jax.Array, num_experts: int):
    """Stable sort of the M = T*K token-slots by expert.

    Returns (order_M: slot index (t*K + k) of each sorted row, group_sizes_E int32)."""
    ids_M = expert_ids_TK.reshape(-1)
    order_M = jnp.argsort(ids_M, stable=True)
    group_sizes_E = jnp.bincount(ids_M, length=num_experts).astype(jnp.int32)
    return order_M, group_sizes_E


def _combine(y_slots_TKD, weights_TK):
    return jnp.einsum("tkd,tk->td", y_slots_TKD, weights_TK.astype(y_slots_TKD.dtype))


def _dense(expert_params, x_TD, expert_ids_TK, weights_TK, *, activation):
    num_experts = expert_params["w_up"].shape[0]
    y_ETD = _experts.apply_experts_all(expert_params, x_TD, activation=activation)
    combine_TE = jnp.einsum("tke,tk->te", jax.nn.one_hot(expert_ids_TK, num_experts, dtype=x_TD.dtype),
                            weights_TK.astype(x_TD.dtype))
    return jnp.einsum("etd,te->td", y_ETD, combine_TE), {}


def _sorted(expert_params, x_TD, expert_ids_TK, weights_TK, *, activation, gmm):
    num_tokens, top_k = expert_ids_TK.shape
    num_experts = expert_params["w_up"].shape[0]
    order_M, group_sizes_E = sort_by_expert(expert_ids_TK, num_experts)
    x_MD = jnp.take(x_TD, order_M // top_k, axis=0)
    y_MD = _experts.apply_experts_grouped(expert_params, x_MD, group_sizes_E, activation=activation, gmm=gmm)
    inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0], dtype=order_M.dtype),
                                                          unique_indices=True)  # a scatter, not a second sort
    y_TKD = jnp.take(y_MD, inverse_M, axis=0).reshape(num_tokens, top_k, -1)
    return _combine(y_TKD, weights_TK), {}


def capacity_per_expert(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_buffer(x_TD, expert_ids_TK, num_experts: int, capacity: int):
    """Bucket token-slots into per-expert buffers of `capacity` rows (GShard priority: slot-major, i.e. every
    token's first choice before any second choice, then token order; the rest are dropped).

    Returns (buffer_ECD [E, C, D], buffer_row_M: row of slot m = k*T + t in the flattened buffer, E*C when dropped,
    kept_M bool)."""
    num_tokens, top_k = expert_ids_TK.shape
    d_model = x_TD.shape[-1]
    ids_M = expert_ids_TK.T.reshape(-1)  # row m = k*T + t
    order_M = jnp.argsort(ids_M, stable=True)
    sizes_E = jnp.bincount(ids_M, length=num_experts)
    starts_E = jnp.cumsum(sizes_E) - sizes_E
    rank_sorted_M = jnp.arange(ids_M.shape[0]) - starts_E[ids_M[order_M]]
    position_M = jnp.zeros_like(ids_M).at[order_M].set(rank_sorted_M)
    kept_M = position_M < capacity
    buffer_row_M = jnp.where(kept_M, ids_M * capacity + position_M, num_experts * capacity)  # overflow: dropped
    token_M = jnp.tile(jnp.arange(num_tokens), top_k)
    buffer_ECD = (jnp.zeros((num_experts * capacity, d_model), x_TD.dtype)
                  .at[buffer_row_M].set(jnp.take(x_TD, token_M, axis=0), mode="drop")
                  .reshape(num_experts, capacity, d_model))
    return buffer_ECD, buffer_row_M, kept_M


def _capacity(expert_params, x_TD, expert_ids_TK, weights_TK, *, activation, capacity_factor):
    num_tokens, top_k = expert_ids_TK.shape
    num_experts = expert_params["w_up"].shape[0]
    d_model = x_TD.shape[-1]
    capacity = capacity_per_expert(num_tokens, top_k, num_experts, capacity_factor)
    buffer_ECD, buffer_row_M, kept_M = capacity_buffer(x_TD, expert_ids_TK, num_experts, capacity)
    out_ECD = _experts.apply_experts_batched(expert_params, buffer_ECD, activation=activation)
    y_MD = jnp.take(out_ECD.reshape(num_experts * capacity, d_model), buffer_row_M, axis=0, mode="fill", fill_value=0)
    y_TKD = y_MD.reshape(top_k, num_tokens, d_model).transpose(1, 0, 2)
    dropped = 1.0 - jnp.mean(kept_M.astype(jnp.float32))
    return _combine(y_TKD, weights_TK), {"dropped_fraction": dropped, "capacity": jnp.int32(capacity)}


def moe_ffn(expert_params: dict, x_TD: jax.Array, expert_ids_TK: jax.Array, weights_TK: jax.Array, *,
            activation: str = "swiglu", backend: str = "tiled", capacity_factor: float = 1.25):
    """Run each token through its K experts and combine with the routing weights.

    Args:
      expert_params: stacked expert weights (experts.py).
      x_TD: [T, D] token activations.
      expert_ids_TK: [T, K] int expert of each token-slot.
      weights_TK: [T, K] combine weights.
      backend: one of BACKENDS ('auto' = default_backend() for the platform, the activation and the compute dtype
        jnp.result_type(x, expert weights)).
      capacity_factor: only for backend='capacity'.
    Returns:
      (y_TD [T, D], metrics dict; always has 'dropped_fraction').
    """
    check_backend(backend)
    num_experts, d_model, _ = _experts.check_expert_params(expert_params, activation)
    backend = resolve_backend(backend, activation=activation, dtype=jnp.result_type(x_TD, *expert_params.values()))
    if x_TD.ndim != 2 or x_TD.shape[-1] != d_model:
        raise ValueError(f"x must be [tokens, d_model={d_model}], got shape {x_TD.shape}")
    if expert_ids_TK.shape != weights_TK.shape or expert_ids_TK.ndim != 2 or expert_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"expert_ids {expert_ids_TK.shape} and weights {weights_TK.shape} must both be "
                         f"[tokens={x_TD.shape[0]}, top_k]")
    if backend == "dense":
        y_TD, metrics = _dense(expert_params, x_TD, expert_ids_TK, weights_TK, activation=activation)
    elif backend == "capacity":
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor={capacity_factor!r} is invalid: accepted values are > 0")
        y_TD, metrics = _capacity(expert_params, x_TD, expert_ids_TK, weights_TK, activation=activation,
                                  capacity_factor=capacity_factor)
    elif backend == "kernel":
        y_TD, metrics = _cpu_kernel.kernel_expert_mlp(expert_params, x_TD, expert_ids_TK, weights_TK,
                                                      activation=activation), {}
    elif backend == "tiled":
        y_TD, metrics = _gmm.tiled_expert_mlp(expert_params, x_TD, expert_ids_TK, weights_TK,
                                              activation=activation), {}
    else:
        y_TD, metrics = _sorted(expert_params, x_TD, expert_ids_TK, weights_TK, activation=activation,
                                gmm=_gmm.GMM_BACKENDS[backend])
    metrics.setdefault("dropped_fraction", jnp.float32(0.0))
    return y_TD, metrics
