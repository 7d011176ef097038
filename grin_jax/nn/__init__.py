"""Thin Flax NNX modules that own parameters (with logical axis names) and call the pure core in moe/."""

from grin_jax.nn.attention import (Attention, apply_rope, attention_mask, dot_product_attention, init_kv_cache,
                                   rope_cos_sin)
from grin_jax.nn.block import DecoderBlock
from grin_jax.nn.layers import NORMS, Dense, Embed, LayerNorm, RMSNorm, make_norm, param

__all__ = [
    "Attention", "apply_rope", "attention_mask", "dot_product_attention", "init_kv_cache", "rope_cos_sin",
    "DecoderBlock", "NORMS", "Dense", "Embed", "LayerNorm", "RMSNorm", "make_norm", "param",
]
