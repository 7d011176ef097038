"""Grouped-query self-attention with rotary position embeddings, an optional sliding window and a KV cache.

Axes: B batch, S query positions, L key positions, D model, H query heads, G KV heads, R = H / G query heads per
KV head, K head dim.

Conventions matched to Hugging Face transformers (PhiMoE / Mixtral / Llama):
  - RoPE on the full head dim with the `rotate_half` convention (the two halves of the head dim are the
    real / imaginary parts): inv_freq_i = theta^(-2i/K), cos/sin of cat(freqs, freqs).
  - Query head h uses KV head h // R (`repeat_kv`).
  - Scores (q . k) * K^-0.5; softmax in float32.
  - Sliding window W (transformers 5.x `sliding_window_overlay`): query at position p sees keys at positions
    p - W < j <= p, i.e. W keys including itself.

Packed rows (several documents in one row): pass `segment_ids_BS` (one id per token, equal within a document) and
per-document `positions_BS` (restarting at 0 in each document). A query then sees only keys of its own segment.
Causality and the sliding window are computed from the token's INDEX in the row (or its KV-cache slot), never
from `positions_BS`, which only feed RoPE: with per-document positions a later document's tokens have smaller
positions than an earlier one's, but its index still orders it. Within one segment indices and positions differ
by a constant, so RoPE (relative) and the mask see each document exactly as if it were alone. Give padding a
segment id no real token has (the data pipeline uses 0 for padding, 1, 2, ... for documents): padding then
attends only to padding. Without segment ids and with the default positions (arange, or cache_index + arange)
the mask and the outputs are bit-identical to a mask built from positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grin_jax.nn.layers import Dense


ROPE_TABLE_MAX_ENTRIES = 1 << 20  # the largest RoPE table kept as a constant: positions x head_dim / 2 (4 MiB each)


def _rope_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """[..., head_dim / 2] float32: position x inverse frequency."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    return positions.astype(jnp.float32)[..., None] * inv_freq


@functools.lru_cache(maxsize=32)
def _rope_table(max_positions: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_positions, head_dim / 2] of _rope_angles, computed now (also inside a trace) by JAX's own cos
    and sin, once per process and shape."""
    with jax.ensure_compile_time_eval():
        angles_Pk = _rope_angles(jnp.arange(max_positions), head_dim, theta)
        return np.asarray(jnp.cos(angles_Pk)), np.asarray(jnp.sin(angles_Pk))


def rope_cos_sin(positions_BS: jax.Array, head_dim: int, theta: float, max_positions: int | None = None):
    """cos, sin: [B, S, K] (float32) for integer positions.

    With `max_positions` (the model's max_seq_len) and a table of at most ROPE_TABLE_MAX_ENTRIES entries, cos and
    sin are computed once, when the function is traced, for the positions 0 .. max_positions - 1 (the same float32
    arithmetic), and looked up: XLA:CPU otherwise evaluates them (scalar libm calls) inside every fusion that
    reads them, again per head, layer and pass (6 % of the tiny configs' train step). A position outside the
    table gives NaN, not a wrong angle."""
    if max_positions is not None and max_positions * (head_dim // 2) <= ROPE_TABLE_MAX_ENTRIES:
        cos_Pk, sin_Pk = _rope_table(max_positions, head_dim, float(theta))
        cos_BSk = jnp.take(cos_Pk, positions_BS, axis=0, mode="fill", fill_value=jnp.nan)
        sin_BSk = jnp.take(sin_Pk, positions_BS, axis=0, mode="fill", fill_value=jnp.nan)
    else:
        angles_BSk = _rope_angles(positions_BS, head_dim, theta)
        cos_BSk, sin_BSk = jnp.cos(angles_BSk), jnp.sin(angles_BSk)
    return jnp.concatenate([cos_BSk, cos_BSk], axis=-1), jnp.concatenate([sin_BSk, sin_BSk], axis=-1)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x_BSHK: jax.Array, cos_BSK: jax.Array, sin_BSK: jax.Array) -> jax.Array:
    x32 = x_BSHK.astype(jnp.float32)
    y = x32 * cos_BSK[:, :, None, :] + rotate_half(x32) * sin_BSK[:, :, None, :]
    return y.astype(x_BSHK.dtype)


def attention_mask(q_idx_BS: jax.Array, k_idx_BL: jax.Array, sliding_window: int | None,
                   q_segment_ids_BS: jax.Array | None = None, k_segment_ids_BL: jax.Array | None = None
                   ) -> jax.Array:
    """[B, S, L] bool: causal on the token indices (key index j <= query index i), within the sliding window when
    one is set (i - W < j <= i), and, with segment ids, only keys of the query's own segment.

    The indices are the tokens' places in the row / KV cache (not per-document positions, see the module
    docstring); both segment ids or neither must be given."""
    q = q_idx_BS[:, :, None]
    k = k_idx_BL[:, None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    if (q_segment_ids_BS is None) != (k_segment_ids_BL is None):
        raise ValueError("attention_mask: give both q_segment_ids_BS and k_segment_ids_BL, or neither")
    if q_segment_ids_BS is not None:
        allowed = allowed & (q_segment_ids_BS[:, :, None] == k_segment_ids_BL[:, None, :])
    return allowed


ATTENTION_BACKENDS = ("auto", "xla", "kernel")


def dot_product_attention(q_BSHK, k_BLGK, v_BLGK, mask_BSL, *, dtype=jnp.float32, backend: str = "auto"):
    """Grouped-query attention; scores and softmax in float32. Returns [B, S, H, K] in `dtype`.

    The matmuls run in a KV-head-major layout, queries [B, G, R*S, K] against keys [B, G, L, K]: XLA:CPU runs
    their forward and backward ~1.4x faster than the same einsums on [B, S, G, R, K] (one transpose of q, k, v
    and of the output instead).
    backend: 'xla' (the scores [B, G, R*S, L] as an array) | 'kernel' (the fused CPU kernel, kernel_attention: the
    scores of 64 query rows at a time in cache, masked key ranges skipped; CPU, float32, one device) | 'auto' (the
    kernel where it applies, attention_kernel_unavailable; $GRIN_JAX_KERNEL=0 turns it off)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"dot_product_attention: backend={backend!r}; accepted are {list(ATTENTION_BACKENDS)}")
    batch, seq, num_heads, head_dim = q_BSHK.shape
    num_kv, keys = k_BLGK.shape[2], k_BLGK.shape[1]
    per_kv = num_heads // num_kv
    q_BGMK = (q_BSHK.astype(dtype).reshape(batch, seq, num_kv, per_kv, head_dim)
              .transpose(0, 2, 3, 1, 4).reshape(batch, num_kv, per_kv * seq, head_dim))
    k_BGLK = k_BLGK.astype(dtype).transpose(0, 2, 1, 3)
    v_BGLK = v_BLGK.astype(dtype).transpose(0, 2, 1, 3)
    if backend != "xla":
        reason = attention_kernel_unavailable(dtype)
        if backend == "kernel" and reason is not None:
            raise ValueError(f"dot_product_attention: backend='kernel' cannot run here: {reason}")
        if reason is None:
            backend = "kernel"
    if backend == "kernel":
        out_BGMK = kernel_attention(q_BGMK, k_BGLK, v_BGLK, mask_BSL, head_dim ** -0.5)
    else:
        scores = (jnp.einsum("bgmk,bglk->bgml", q_BGMK, k_BGLK, preferred_element_type=jnp.float32)
                  * (head_dim ** -0.5))
        scores = scores.reshape(batch, num_kv, per_kv, seq, keys)
        scores = jnp.where(mask_BSL[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(batch, num_kv, per_kv * seq, keys)
        out_BGMK = jnp.einsum("bgml,bglk->bgmk", probs, v_BGLK)
    return (out_BGMK.astype(dtype).reshape(batch, num_kv, per_kv, seq, head_dim).transpose(0, 3, 1, 2, 4)
            .reshape(batch, seq, num_heads, head_dim))


def attention_kernel_unavailable(dtype) -> str | None:
    """None when backend='auto' runs the attention on the CPU kernel, else the reason it does not
    (cpu_kernel.auto_unavailable: the platform, the compute dtype, a mesh of more than one device, the kernel not
    building here)."""
    from grin_jax.moe import cpu_kernel
    return cpu_kernel.auto_unavailable(dtype)


def _attention_fwd_call(q_BGMK, k_BGLK, v_BGLK, mask_BSL, scale):
    from grin_jax.moe import cpu_kernel
    B, G, M, _ = q_BGMK.shape
    out = (jax.ShapeDtypeStruct(q_BGMK.shape, jnp.float32), jax.ShapeDtypeStruct((B, G, M), jnp.float32))
    return jax.ffi.ffi_call(cpu_kernel.ATTENTION_FWD_TARGET, out, vmap_method="sequential")(
        q_BGMK, k_BGLK, v_BGLK, mask_BSL, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel_attention(q_BGMK, k_BGLK, v_BGLK, mask_BSL, scale):
    return _attention_fwd_call(q_BGMK, k_BGLK, v_BGLK, mask_BSL, scale)[0]


def _kernel_attention_fwd(q_BGMK, k_BGLK, v_BGLK, mask_BSL, scale):
    out, lse = _attention_fwd_call(q_BGMK, k_BGLK, v_BGLK, mask_BSL, scale)
    return out, (q_BGMK, k_BGLK, v_BGLK, mask_BSL, out, lse)


def _kernel_attention_bwd(scale, res, dout_BGMK):
    from grin_jax.moe import cpu_kernel
    q, k, v, mask, out, lse = res
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(cpu_kernel.ATTENTION_BWD_TARGET, shapes, vmap_method="sequential")(
        q, k, v, mask, out, lse, dout_BGMK.astype(jnp.float32), scale=np.float32(scale))
    return dq, dk, dv, None


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def kernel_attention(q_BGMK, k_BGLK, v_BGLK, mask_BSL, scale: float):
    """softmax(scale q k^T, masked) v [B, G, M, K] float32 by the fused CPU kernel (moe/csrc/expert_mlp.cc
    AttentionFwd / AttentionBwd, a custom VJP) for queries [B, G, M = R*S, K] (row r*S + s: query head r of the KV
    head's group at position s), keys and values [B, G, L, K] and mask [B, S, L] (true: may attend). Per block of 64
    query rows the scores exist only in cache, over the key range that holds the block's allowed keys (causal and
    sliding-window masks skip the rest); the backward recomputes them from the saved log-sum-exp [B, G, M]. A row with
    no allowed key averages all L values, as the XLA path's softmax over equal finfo.min scores does."""
    from grin_jax.moe import cpu_kernel
    cpu_kernel.load()
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    return _kernel_attention(f32(q_BGMK), f32(k_BGLK), f32(v_BGLK), mask_BSL.astype(bool), float(scale))


def init_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> dict:
    """One layer's cache: {'k', 'v'}: [B, max_len, G, K] zeros. Slot j holds the key/value of position j."""
    shape = (batch, max_len, num_kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class Attention(nnx.Module):
    """Self-attention. Parameters (logical names):
      q: kernel [D, H, K] ('embed', 'heads', 'kv'),  bias [H, K]
      k, v: kernel [D, G, K] ('embed', 'kv_heads', 'kv'),  bias [G, K]
      o: kernel [H, K, D] ('heads', 'kv', 'embed'),  bias [D]
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 rope_theta: float = 10000.0, sliding_window: int | None = None, use_bias: bool = False,
                 max_positions: int | None = None, param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
        common = dict(use_bias=use_bias, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.q = Dense((d_model,), (num_heads, head_dim), names=("embed", "heads", "kv"), **common)
        self.k = Dense((d_model,), (num_kv_heads, head_dim), names=("embed", "kv_heads", "kv"), **common)
        self.v = Dense((d_model,), (num_kv_heads, head_dim), names=("embed", "kv_heads", "kv"), **common)
        self.o = Dense((num_heads, head_dim), (d_model,), names=("heads", "kv", "embed"), **common)
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.max_positions = max_positions  # RoPE positions 0 .. max_positions - 1 from a table (rope_cos_sin)
        self.sliding_window = sliding_window
        self.dtype = dtype

    def __call__(self, x_BSD: jax.Array, positions_BS: jax.Array, *, segment_ids_BS: jax.Array | None = None,
                 cache: dict | None = None, cache_index: jax.Array | None = None):
        """Returns (y [B, S, D], new cache or None).

        positions_BS: RoPE positions (per document in packed rows). segment_ids_BS: [B, S] int, a query attends
        only to keys with its segment id (packed rows; None = one segment). The causal / sliding-window mask uses
        the token index in the row, 0 .. S - 1 (module docstring).

        With a cache ([B, L, G, K], slot j = token index j) this call's keys/values are written at slots
        cache_index .. cache_index + S - 1 (the queries' indices; positions_BS normally those same numbers) and the
        queries attend to the whole cache under the mask. Segment ids are not supported with a cache.
        """
        if segment_ids_BS is not None and cache is not None:
            raise ValueError("Attention: segment_ids_BS is not supported with a KV cache (one sequence per row)")
        q_BSHK = self.q(x_BSD)
        k_BSGK = self.k(x_BSD)
        v_BSGK = self.v(x_BSD)
        cos, sin = rope_cos_sin(positions_BS, self.head_dim, self.rope_theta, self.max_positions)
        q_BSHK = apply_rope(q_BSHK, cos, sin)
        k_BSGK = apply_rope(k_BSGK, cos, sin)
        new_cache = None
        if cache is not None:
            if cache_index is None:
                raise ValueError("Attention: a cache needs cache_index")
            start = (0, cache_index, 0, 0)
            k_BLGK = jax.lax.dynamic_update_slice(cache["k"], k_BSGK.astype(cache["k"].dtype), start)
            v_BLGK = jax.lax.dynamic_update_slice(cache["v"], v_BSGK.astype(cache["v"].dtype), start)
            new_cache = {"k": k_BLGK, "v": v_BLGK}
            k_idx_BL = jnp.broadcast_to(jnp.arange(k_BLGK.shape[1], dtype=jnp.int32),
                                        (x_BSD.shape[0], k_BLGK.shape[1]))
            q_idx_BS = jnp.broadcast_to(cache_index + jnp.arange(x_BSD.shape[1], dtype=jnp.int32), x_BSD.shape[:2])
        else:
            k_BLGK, v_BLGK = k_BSGK, v_BSGK
            k_idx_BL = jnp.broadcast_to(jnp.arange(x_BSD.shape[1], dtype=jnp.int32), x_BSD.shape[:2])
            q_idx_BS = k_idx_BL
        mask_BSL = attention_mask(q_idx_BS, k_idx_BL, self.sliding_window, segment_ids_BS, segment_ids_BS)
        out_BSHK = dot_product_attention(q_BSHK, k_BLGK, v_BLGK, mask_BSL, dtype=self.dtype)
        return self.o(out_BSHK), new_cache
