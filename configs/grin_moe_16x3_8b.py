"""GRIN-MoE (microsoft/GRIN-MoE, "16x3.8B"): the PhiMoE architecture, exactly (docs/architecture.md).

vocab 32064, d_model 4096, 32 layers, 32 query / 8 KV heads (head dim 128), every layer MoE with 16 SwiGLU
experts of width 6400, top-2 SparseMixer-v2 (jitter eps 0.01) with input jitter 0.01, pre-LN LayerNorm
(eps 1e-5), RoPE theta 1e4 on the full head dim, q/k/v/o bias, sliding window 2047, context 4096, untied LM
head with bias. 41.873B parameters, 6.641B active per token:

    python -m grin_jax.params --config=configs/grin_moe_16x3_8b.py

Variants (`--config=configs/grin_moe_16x3_8b.py:VARIANT`, comma-separated):
    dense  the dense baseline with the same active parameters (every FFN dense, width 2 x 6400)
    bf16   bfloat16 parameters, compute and activations (router / attention softmax stay float32)
    mixed  mixed precision: float32 master weights (and so float32 optimizer state), bfloat16 compute and
           activations; routers, softmaxes, norm statistics, aux losses and the cross-entropy stay float32
    topk   the GShard / Mixtral top-2 softmax router instead of SparseMixer-v2 (GRIN's ablation baseline)
"""

import ml_collections
from ml_collections import config_dict

from grin_jax.sharding import default_distributed_config, default_mesh_config


def get_config(arg=None):
    variants = set(filter(None, (arg or "").split(",")))
    unknown = variants - {"dense", "bf16", "mixed", "topk"}
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}: accepted values are dense, bf16, mixed, topk")
    if {"bf16", "mixed"} <= variants:
        raise ValueError("variants bf16 and mixed exclude each other: bf16 stores the parameters in bfloat16, "
                         "mixed in float32")
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=32064,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=config_dict.placeholder(int),  # None: d_model // num_heads = 128
        max_seq_len=4096,
        norm="layernorm",
        norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=2047,
        attention_bias=True,
        layout="moe",
        moe=ml_collections.ConfigDict(dict(
            num_experts=16,
            top_k=2,
            d_hidden=6400,
            activation="swiglu",
            router="sparsemixer_v2",
            router_options={"jitter_eps": 0.01},
            input_jitter=0.01,
            backend="auto",
            capacity_factor=1.25,
            load_balance_groups=1,
            load_balance_coef=0.001,  # transformers' PhimoeConfig default; not a number from the GRIN report
            z_loss_coef=0.0,
        )),
        dense=ml_collections.ConfigDict(dict(d_hidden=2 * 6400, activation="swiglu")),  # the :dense baseline
        tie_embeddings=False,
        lm_head_bias=True,
        param_dtype="float32",
        dtype="float32",
        activation_dtype="float32",
        init_std=0.02,
    ))
    if "dense" in variants:
        config.model.layout = "dense"
    if "bf16" in variants:
        config.model.param_dtype = config.model.dtype = config.model.activation_dtype = "bfloat16"
    if "mixed" in variants:
        config.model.param_dtype = "float32"
        config.model.dtype = config.model.activation_dtype = "bfloat16"
    if "topk" in variants:
        config.model.moe.router = "topk_softmax"
        config.model.moe.router_options = {"renormalize": True}
    # GRIN proposes tensor parallelism instead of expert parallelism: e.g. --config.mesh.model=8
    # (8 divides the 32 heads, 8 KV heads and the 6400 expert width) within a host, data parallelism across hosts.
    config.mesh = default_mesh_config()
    config.distributed = default_distributed_config()
    return config
