"""Pre-LN decoder block: x + Attn(Norm(x)), then h + FFN(Norm(h)) with the FFN kind of the layer (grin_jax.ffn).
Attn is grouped-query attention (nn/attention.py), or with a `moa` config DS-MoE's mixture of attention heads
(nn/moa.py), whose router aux the block returns as the FFN aux's 'attention' entry.

Axes: B batch, S sequence, D model.

Rematerialisation (models/lm.py wraps each block in `jax.checkpoint` with `remat_policy(model.remat, ...)`): the
block tags its attention output and its FFN output with `checkpoint_name` (CHECKPOINT_NAMES), which
remat='save_names' can keep while recomputing the rest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from grin_jax import ffn as _ffn
from grin_jax.nn.attention import Attention
from grin_jax.nn.layers import make_norm
from grin_jax.nn.moa import MixtureOfAttention

CHECKPOINT_NAMES = ("attention_out", "ffn_out")
REMAT_POLICIES = ("none", "full", "save_matmuls", "save_names")


def remat_policy(remat: str, names: tuple = ()):
    """The `jax.checkpoint` policy of model.remat (None for 'full': save nothing but the inputs). 'save_matmuls'
    keeps the weight matmuls' outputs (dot_generals without batch dimensions: not the [S, S] attention scores)."""
    if remat == "full":
        return None
    if remat == "save_matmuls":
        return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    if remat == "save_names":
        return jax.checkpoint_policies.save_only_these_names(*names)
    raise ValueError(f"model.remat={remat!r} has no policy: accepted values are {list(REMAT_POLICIES[1:])}")


class DecoderBlock(nnx.Module):
    """One transformer layer. The FFN is `ffn.get_ffn(kind)(ffn_config)`.

    Sub-modules: input_norm, attn, post_attn_norm, mlp (names used in checkpoints)."""

    def __init__(self, *, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, norm: str,
                 norm_eps: float, rope_theta: float, sliding_window: int | None, attention_bias: bool,
                 ffn_kind: str, ffn_config, moa=None, max_positions: int | None = None, param_dtype=jnp.float32,
                 dtype=jnp.float32, activation_dtype=jnp.float32, rngs: nnx.Rngs):
        norm_kw = dict(eps=norm_eps, param_dtype=param_dtype, dtype=dtype)
        self.input_norm = make_norm(norm, d_model, **norm_kw)
        attn_kw = dict(rope_theta=rope_theta, sliding_window=sliding_window, use_bias=attention_bias,
                       max_positions=max_positions, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        if moa is None:
            self.attn = Attention(d_model, num_heads, num_kv_heads, head_dim, **attn_kw)
        else:
            self.attn = MixtureOfAttention(d_model, moa, head_dim, **attn_kw)
        self.post_attn_norm = make_norm(norm, d_model, **norm_kw)
        self.mlp = _ffn.get_ffn(ffn_kind)(ffn_config, norm=norm, norm_eps=norm_eps, param_dtype=param_dtype,
                                          dtype=dtype, rngs=rngs)
        self.activation_dtype = activation_dtype

    def __call__(self, x_BSD: jax.Array, positions_BS: jax.Array, *, training: bool = False, rng=None,
                 segment_ids_BS=None, cache: dict | None = None, cache_index=None, token_mask_BS=None,
                 row_sinks: dict | None = None, batch_stats: dict | None = None):
        """Returns (x [B, S, D] in activation dtype, the FFN's aux, new cache or None). token_mask_BS (non-zero =
        a real token, 0 = padding) reaches only the FFN kinds that declare `takes_token_mask` (grin_jax.ffn);
        row_sinks ({table name: zeros}, the row-sparse update's, grin_jax/train/sparse_rows.py) only the kinds
        with row-sparse tables, when given. batch_stats ({'mlp': ..., 'attention': ...}, gradient accumulation's
        whole-step statistics, train/step.py) reach the kinds that declare `takes_batch_stats` and the attention
        experts; the aux holds each one's own as aux['batch_stats'] (the attention experts' in aux['attention'])."""
        act = self.activation_dtype
        attn_kw = {} if segment_ids_BS is None else {"segment_ids_BS": segment_ids_BS}
        attn_aux = None
        if isinstance(self.attn, MixtureOfAttention):
            attn_out, new_cache, attn_aux = self.attn(
                self.input_norm(x_BSD), positions_BS, cache=cache, cache_index=cache_index, training=training,
                token_mask_BS=token_mask_BS, batch_stats=(batch_stats or {}).get("attention"), **attn_kw)
        else:
            attn_out, new_cache = self.attn(self.input_norm(x_BSD), positions_BS, cache=cache,
                                            cache_index=cache_index, **attn_kw)
        h_BSD = x_BSD.astype(act) + checkpoint_name(attn_out, "attention_out").astype(act)
        ffn_kw = ({"token_mask_BS": token_mask_BS}
                  if token_mask_BS is not None and getattr(self.mlp, "takes_token_mask", False) else {})
        if row_sinks:
            ffn_kw["row_sinks"] = row_sinks
        if (batch_stats or {}).get("mlp") is not None and getattr(self.mlp, "takes_batch_stats", False):
            ffn_kw["batch_stats"] = batch_stats["mlp"]
        ffn_out, aux = self.mlp(self.post_attn_norm(h_BSD), training=training, rng=rng, **ffn_kw)
        if attn_aux is not None:
            aux = {**aux, "attention": attn_aux}
        return h_BSD + checkpoint_name(ffn_out, "ffn_out").astype(act), aux, new_cache
