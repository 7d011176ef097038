"""Mixtral 8x7B (mistralai/Mixtral-8x7B-v0.1) in grin_jax: 46.703B parameters, 12.880B active per token.

vocab 32000, d_model 4096, 32 layers, 32 query / 8 KV heads (head dim 128), every layer MoE with 8 SwiGLU
experts of width 14336, top-2 softmax router renormalised over the two picks, RMSNorm (eps 1e-5), RoPE theta
1e6, no sliding window, context 32768, no biases, untied LM head.

    python -m grin_jax.params --config=configs/mixtral_8x7b.py

Variants: dense (same active parameters, d_ff = 2 x 14336), bf16, sparsemixer (GRIN's router instead).
"""

import ml_collections
from ml_collections import config_dict

from grin_jax.sharding import default_distributed_config, default_mesh_config


def get_config(arg=None):
    variants = set(filter(None, (arg or "").split(",")))
    unknown = variants - {"dense", "bf16", "sparsemixer"}
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}: accepted values are dense, bf16, sparsemixer")
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=config_dict.placeholder(int),  # None: 128
        max_seq_len=32768,
        norm="rmsnorm",
        norm_eps=1e-5,
        rope_theta=1e6,
        sliding_window=config_dict.placeholder(int),  # None: full causal attention
        attention_bias=False,
        layout="moe",
        moe=ml_collections.ConfigDict(dict(
            num_experts=8,
            top_k=2,
            d_hidden=14336,
            activation="swiglu",
            router="topk_softmax",
            router_options={"renormalize": True},
            input_jitter=0.0,  # transformers' MixtralConfig.router_jitter_noise
            backend="auto",
            capacity_factor=1.25,
            load_balance_groups=1,
            load_balance_coef=0.02,  # router_aux_loss_coef of the released config
            z_loss_coef=0.0,
        )),
        dense=ml_collections.ConfigDict(dict(d_hidden=2 * 14336, activation="swiglu")),  # the :dense baseline
        tie_embeddings=False,
        lm_head_bias=False,
        param_dtype="float32",
        dtype="float32",
        activation_dtype="float32",
        init_std=0.02,
    ))
    if "dense" in variants:
        config.model.layout = "dense"
    if "bf16" in variants:
        config.model.param_dtype = config.model.dtype = config.model.activation_dtype = "bfloat16"
    if "sparsemixer" in variants:
        config.model.moe.router = "sparsemixer_v2"
        config.model.moe.router_options = {"jitter_eps": 0.01}
    # e.g. --config.mesh.expert=8 (8 experts) or --config.mesh.model=8 (32 heads, 8 KV heads, width 14336).
    config.mesh = default_mesh_config()
    config.distributed = default_distributed_config()
    return config
