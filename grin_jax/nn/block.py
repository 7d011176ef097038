"""Pre-LN decoder block: x + Attn(Norm(x)), then h + FFN(Norm(h)) with a dense FFN or an MoE block.

Axes: B batch, S sequence, D model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from grin_jax.moe.layer import MoEConfig
from grin_jax.nn.attention import Attention
from grin_jax.nn.layers import make_norm
from grin_jax.nn.mlp import DenseFFN, MoEBlock


class DecoderBlock(nnx.Module):
    """One transformer layer. `moe` set: the FFN is an MoEBlock; otherwise a DenseFFN of width d_ff.
    moe_output_norm: the MoE block normalises its output (a `norm` of the block's kind) before the residual add.

    Sub-modules: input_norm, attn, post_attn_norm, mlp (names used in checkpoints)."""

    def __init__(self, *, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, norm: str,
                 norm_eps: float, rope_theta: float, sliding_window: int | None, attention_bias: bool,
                 moe: MoEConfig | None, d_ff: int, activation: str, param_dtype=jnp.float32,
                 dtype=jnp.float32, activation_dtype=jnp.float32, rngs: nnx.Rngs, moe_output_norm: bool = False):
        norm_kw = dict(eps=norm_eps, param_dtype=param_dtype, dtype=dtype)
        self.input_norm = make_norm(norm, d_model, **norm_kw)
        self.attn = Attention(d_model, num_heads, num_kv_heads, head_dim, rope_theta=rope_theta,
                              sliding_window=sliding_window, use_bias=attention_bias, param_dtype=param_dtype,
                              dtype=dtype, rngs=rngs)
        self.post_attn_norm = make_norm(norm, d_model, **norm_kw)
        self.is_moe = moe is not None
        if self.is_moe:
            self.mlp = MoEBlock(moe, param_dtype=param_dtype, dtype=dtype, rngs=rngs,
                                output_norm=norm if moe_output_norm else None, norm_eps=norm_eps)
        else:
            self.mlp = DenseFFN(d_model, d_ff, activation=activation, param_dtype=param_dtype, dtype=dtype,
                                rngs=rngs)
        self.activation_dtype = activation_dtype

    def __call__(self, x_BSD: jax.Array, positions_BS: jax.Array, *, training: bool = False, rng=None,
                 cache: dict | None = None, cache_index=None):
        """Returns (x [B, S, D] in activation dtype, MoE aux dict or None, new cache or None)."""
        act = self.activation_dtype
        attn_out, new_cache = self.attn(self.input_norm(x_BSD), positions_BS, cache=cache, cache_index=cache_index)
        h_BSD = x_BSD.astype(act) + attn_out.astype(act)
        aux = None
        if self.is_moe:
            ffn_out, aux = self.mlp(self.post_attn_norm(h_BSD), training=training, rng=rng)
        else:
            ffn_out = self.mlp(self.post_attn_norm(h_BSD))
        return h_BSD + ffn_out.astype(act), aux, new_cache
