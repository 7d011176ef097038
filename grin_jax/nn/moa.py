"""Mixture of attention heads (MoA), DS-MoE's attention layer: dense training, sparse inference (Pan et al.,
arXiv 2404.05567; docs/ds_moe.md#mixture-of-attention-heads).

Axes: B batch, S query positions, L key positions, T = B*S tokens, D model, E attention experts, G KV heads,
R = He / G query heads per KV head inside an expert, He = num_heads / E query heads per expert, K head dim,
J = inference_top_k slots per token.

Each attention expert e owns He query heads and an output projection; the key / value heads (and so the KV cache)
are the model's G shared GQA heads. Query head h of expert e uses KV head h // R.

    router:    S = softmax(x W_router) in float32                                               [T, E]
    expert e:  a_e(x) = O_e . attention(Q_e x, K, V)   (+ the expert's output bias b_e)
    training (and inference='dense'):  y = sum_e S_e a_e(x), every expert on every token, full gradient. Computed
        as one attention with all E * He query heads whose head outputs are scaled by S_e before one output
        projection contracting (E, He, K): the cost of the dense attention with num_heads heads.
    sparse inference (training=False, inference 'top_k' | 'threshold'): the J experts of ds_moe.sparse_selection
        (weights S_e, not renormalised; 'threshold' zeroes those with E * S_e <= inference_threshold). Only the
        selected experts' query heads are computed: the token-slots are sorted by expert and the query and output
        projections are grouped matmuls (moe.gmm: 'tiled' on CPU, ragged_dot elsewhere); attention runs with
        J * He query heads per token. K, V (and the cache) are computed for every token as in the dense layer.
    aux loss:  'mutual_information' (moe.losses.mutual_information_loss over S), weighted by mi_coef.

Parameters (checkpoint names under layers.<i>.attn):
    router [D, E] ('embed', None); q.kernel [D, E, He, K] ('embed', 'heads', None, 'kv'), q.bias [E, He, K];
    k, v as nn.attention.Attention ([D, G, K]); o_kernel [E, He, K, D] ('heads', None, 'kv', 'embed'),
    o_bias [E, D] (with attention_bias). The expert axis is the one sharded over the model mesh axis.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from grin_jax import sections as _sections
from grin_jax.moe import dispatch as _dispatch
from grin_jax.moe import gmm as _gmm
from grin_jax.moe import losses as _losses
from grin_jax.nn.attention import apply_rope, attention_mask, dot_product_attention, rope_cos_sin
from grin_jax.nn.layers import Dense, normal_init, param

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoAConfig:
    """The `model.moa` section (None / absent: dense attention in every layer).

    num_experts: E attention experts; the model's num_heads query heads are split evenly among them (He =
      num_heads / E, which the model's num_kv_heads G must divide: each expert groups its heads over the G shared
      KV heads). Parameters: the dense attention's plus the router (D * E) and the per-expert output biases.
    mi_coef, inference, inference_top_k, inference_threshold: as the ds_moe FFN kind's (ffn/ds_moe.py), for the
      attention experts: chosen at apply time on the same checkpoint.
    """

    num_heads: int
    num_kv_heads: int
    num_experts: int = 4
    mi_coef: float = 5e-4
    inference: str = "dense"
    inference_top_k: int = 2
    inference_threshold: float = 1.0

    def __post_init__(self):
        from grin_jax.ffn.ds_moe import INFERENCE_MODES  # the ds_moe kind's modes (lazy: ffn imports nn)

        def fail(name, accepted):
            raise ValueError(f"moa.{name}={getattr(self, name)!r} is invalid: accepted values are {accepted}")

        E = self.num_experts
        divisors = [d for d in range(1, self.num_heads + 1)
                    if self.num_heads % d == 0 and (self.num_heads // d) % self.num_kv_heads == 0]
        if not _is_int(E) or E not in divisors:
            fail("num_experts", f"{divisors} (E must divide model.num_heads={self.num_heads} into experts of "
                                f"a multiple of model.num_kv_heads={self.num_kv_heads} heads)")
        if not _is_number(self.mi_coef) or self.mi_coef < 0:
            fail("mi_coef", "finite numbers >= 0")
        if self.inference not in INFERENCE_MODES:
            fail("inference", list(INFERENCE_MODES))
        if not _is_int(self.inference_top_k) or not 1 <= self.inference_top_k <= E:
            fail("inference_top_k", f"integers 1..num_experts={E}")
        if not _is_number(self.inference_threshold) or self.inference_threshold < 0:
            fail("inference_threshold", "finite numbers >= 0")

    @property
    def heads_per_expert(self) -> int:
        return self.num_heads // self.num_experts

    @classmethod
    def from_section(cls, values, *, num_heads: int, num_kv_heads: int) -> "MoAConfig":
        return _sections.from_section(cls, values, num_heads=num_heads, num_kv_heads=num_kv_heads, section="moa")

    def to_section(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("num_heads", "num_kv_heads")}

    @property
    def loss_weights(self) -> dict:
        return {"mutual_information": self.mi_coef}


def _to_heads_first(q_BSEGRK: jax.Array) -> jax.Array:
    """[B, S, E, G, R, K] -> [B, S, G * E * R, K]: KV-head-major, so dot_product_attention's grouping (query head
    i uses KV head i // (E * R)) sends head (e, g, r) to KV head g."""
    B, S, E, G, R, K = q_BSEGRK.shape
    return q_BSEGRK.transpose(0, 1, 3, 2, 4, 5).reshape(B, S, G * E * R, K)


def _from_heads_first(out_BSHK: jax.Array, E: int, G: int) -> jax.Array:
    """Inverse of _to_heads_first: [B, S, G * E * R, K] -> [B, S, E, G, R, K]."""
    B, S, H, K = out_BSHK.shape
    return out_BSHK.reshape(B, S, G, E, H // (G * E), K).transpose(0, 1, 3, 2, 4, 5)


def _grouped(lhs_MI: jax.Array, rhs_EIO: jax.Array, ids_M: jax.Array) -> jax.Array:
    """out[m] = lhs[m] . rhs[ids[m]] [M, O], each row through its expert's matrix only (sorted by expert, a dropless
    grouped matmul, unsorted)."""
    order_M, group_sizes_E = _dispatch.sort_by_expert(ids_M[:, None], rhs_EIO.shape[0])
    gmm = _gmm.GMM_BACKENDS[_gmm.default_backend()]
    out_MO = gmm(jnp.take(lhs_MI, order_M, axis=0), rhs_EIO, group_sizes_E)
    inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0], dtype=order_M.dtype),
                                                          unique_indices=True)
    return jnp.take(out_MO, inverse_M, axis=0)


class MixtureOfAttention(nnx.Module):
    """MoA self-attention: the interface of nn.attention.Attention (same call, same KV cache) plus the router's
    aux. Parameters: module docstring."""

    def __init__(self, d_model: int, config: MoAConfig, head_dim: int, *, rope_theta: float = 10000.0,
                 sliding_window: int | None = None, use_bias: bool = False, max_positions: int | None = None,
                 param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        E, He, G = c.num_experts, c.heads_per_expert, c.num_kv_heads
        common = dict(use_bias=use_bias, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.config = c
        self.router = param(normal_init(rngs.params(), (d_model, E), param_dtype, d_model ** -0.5), ("embed", None))
        self.q = Dense((d_model,), (E, He, head_dim), names=("embed", "heads", None, "kv"), **common)
        self.k = Dense((d_model,), (G, head_dim), names=("embed", "kv_heads", "kv"), **common)
        self.v = Dense((d_model,), (G, head_dim), names=("embed", "kv_heads", "kv"), **common)
        self.o_kernel = param(normal_init(rngs.params(), (E, He, head_dim, d_model), param_dtype,
                                          (He * head_dim) ** -0.5), ("heads", None, "kv", "embed"))
        self.o_bias = param(jnp.zeros((E, d_model), param_dtype), ("heads", "embed")) if use_bias else None
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.max_positions = max_positions  # as nn.attention.Attention's
        self.sliding_window = sliding_window
        self.dtype = dtype

    def scores(self, x_TD: jax.Array) -> jax.Array:
        """S = softmax(x W_router) [T, E], float32."""
        logits = jnp.dot(x_TD.astype(jnp.float32), self.router[...].astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
        return jax.nn.softmax(logits, axis=-1)

    def _keys_values(self, x_BSD, cos, sin, cache, cache_index):
        k_BSGK = apply_rope(self.k(x_BSD), cos, sin)
        v_BSGK = self.v(x_BSD)
        if cache is None:
            return k_BSGK, v_BSGK, None
        if cache_index is None:
            raise ValueError("MixtureOfAttention: a cache needs cache_index")
        start = (0, cache_index, 0, 0)
        k_BLGK = jax.lax.dynamic_update_slice(cache["k"], k_BSGK.astype(cache["k"].dtype), start)
        v_BLGK = jax.lax.dynamic_update_slice(cache["v"], v_BSGK.astype(cache["v"].dtype), start)
        return k_BLGK, v_BLGK, {"k": k_BLGK, "v": v_BLGK}

    def __call__(self, x_BSD: jax.Array, positions_BS: jax.Array, *, segment_ids_BS: jax.Array | None = None,
                 cache: dict | None = None, cache_index: jax.Array | None = None, training: bool = False,
                 token_mask_BS: jax.Array | None = None, batch_stats: dict | None = None):
        """Returns (y [B, S, D], new cache or None, aux {'losses': {'mutual_information'}, 'batch_stats' (this
        batch's MI statistics; batch_stats given: the whole accumulated step's, as the ds_moe kind), 'metrics':
        {'active_fraction', 'router_entropy', 'expert_load' [E], 'threshold_active', 'threshold_overflow'},
        'sums': ds_moe.routing_sums, for evaluation}).
        Masks, positions and the cache as nn.attention.Attention; token_mask_BS (non-zero = real token) restricts
        the router statistics to the real tokens."""
        from grin_jax.ffn import ds_moe as _ds_moe  # the selection and the metrics are the ds_moe kind's

        if segment_ids_BS is not None and cache is not None:
            raise ValueError("MixtureOfAttention: segment_ids_BS is not supported with a KV cache")
        c = self.config
        B, S, D = x_BSD.shape
        E, He, G, Kd = c.num_experts, c.heads_per_expert, c.num_kv_heads, self.head_dim
        R = He // G
        cos, sin = rope_cos_sin(positions_BS, Kd, self.rope_theta, self.max_positions)
        k_BLGK, v_BLGK, new_cache = self._keys_values(x_BSD, cos, sin, cache, cache_index)
        if cache is not None:
            k_idx_BL = jnp.broadcast_to(jnp.arange(k_BLGK.shape[1], dtype=jnp.int32), (B, k_BLGK.shape[1]))
            q_idx_BS = jnp.broadcast_to(cache_index + jnp.arange(S, dtype=jnp.int32), (B, S))
        else:
            k_idx_BL = q_idx_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        mask_BSL = attention_mask(q_idx_BS, k_idx_BL, self.sliding_window, segment_ids_BS, segment_ids_BS)
        x_TD = x_BSD.reshape(B * S, D)
        s_TE = self.scores(x_TD)
        o_kernel = self.o_kernel[...].astype(self.dtype)
        if training or c.inference == "dense":
            q_BSEGRK = apply_rope(self.q(x_BSD).reshape(B, S, E * He, Kd), cos, sin).reshape(B, S, E, G, R, Kd)
            out = dot_product_attention(_to_heads_first(q_BSEGRK), k_BLGK, v_BLGK, mask_BSL, dtype=self.dtype)
            out_BSEGRK = _from_heads_first(out, E, G) * s_TE.reshape(B, S, E, 1, 1, 1).astype(self.dtype)
            y_BSD = jnp.einsum("bsegrk,egrkd->bsd", out_BSEGRK, o_kernel.reshape(E, G, R, Kd, D))
            if self.o_bias is not None:
                y_BSD = y_BSD + jnp.dot(s_TE.astype(self.dtype), self.o_bias[...].astype(self.dtype)).reshape(B, S, D)
            weights_TJ = None
        else:
            J = c.inference_top_k
            ids_TJ, weights_TJ = _ds_moe.sparse_selection(s_TE, mode=c.inference, top_k=J,
                                                          threshold=c.inference_threshold)
            ids_M = ids_TJ.reshape(-1)
            x_MD = jnp.repeat(x_TD.astype(self.dtype), J, axis=0)                  # row m = token m // J, slot m % J
            q_kernel = self.q.kernel[...].astype(self.dtype).transpose(1, 0, 2, 3).reshape(E, D, He * Kd)
            q_MH = _grouped(x_MD, q_kernel, ids_M)
            if self.q.bias is not None:
                q_MH = q_MH + jnp.take(self.q.bias[...].astype(self.dtype).reshape(E, He * Kd), ids_M, axis=0)
            q_BSJGRK = apply_rope(q_MH.reshape(B, S, J * He, Kd), cos, sin).reshape(B, S, J, G, R, Kd)
            out = dot_product_attention(_to_heads_first(q_BSJGRK), k_BLGK, v_BLGK, mask_BSL, dtype=self.dtype)
            out_MH = _from_heads_first(out, J, G).reshape(B * S * J, He * Kd)
            y_MD = _grouped(out_MH, o_kernel.reshape(E, He * Kd, D), ids_M)
            if self.o_bias is not None:
                y_MD = y_MD + jnp.take(self.o_bias[...].astype(self.dtype), ids_M, axis=0)
            y_BSD = jnp.einsum("tjd,tj->td", y_MD.reshape(B * S, J, D),
                               weights_TJ.astype(self.dtype)).reshape(B, S, D)
        mask_T = None if token_mask_BS is None else token_mask_BS.reshape(B * S)
        aux = {"losses": {"mutual_information": _losses.mutual_information_loss(s_TE, mask_T, batch_stats)},
               "batch_stats": _losses.mutual_information_statistics(s_TE, mask_T),
               "metrics": _ds_moe.routing_metrics(s_TE, weights_TJ, threshold=c.inference_threshold,
                                                  slots=c.inference_top_k, mask_T=mask_T),
               "sums": _ds_moe.routing_sums(s_TE, weights_TJ, threshold=c.inference_threshold, mask_T=mask_T)}
        return y_BSD, new_cache, aux
