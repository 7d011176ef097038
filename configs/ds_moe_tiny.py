"""ds_moe_tiny: DS-MoE at toy scale (Pan et al., arXiv 2404.05567; docs/ds_moe.md), with its two baselines.

Every variant is grin_jax/presets.py's tiny LM (4 blocks, d_model 128, 400 steps of 16 x 128 byte tokens) with 8
query heads of dim 16 over 2 KV heads (the attention parameters of the tiny preset's 4 heads of dim 32):

    ''         DS-MoE: every FFN 16 SwiGLU experts of width 32 (together the dense baseline's width 512) and every
               attention 4 attention experts of 2 query heads (mixture of attention heads, shared KV heads), all
               trained densely with the mutual-information loss (mi_coef 0.01 on both; the paper's 2e-4 - 6.3e-4
               is for 1-6B models).
    'dense'    the dense baseline: SwiGLU FFN of width 512, grouped-query attention with the same 8 heads.
    'moe'      the sparse-trained MoE with equal total parameters: the same 16 experts of width 32, top-2 softmax
               router (renormalised; the load-balance loss of the tiny preset), dense attention.
    'smoke'    appended after a comma (e.g. 'moe,smoke', or 'smoke' alone for DS-MoE): the few-step test size.

    python -m grin_jax.train --config=configs/ds_moe_tiny.py --workdir=workdirs/ds_moe_tiny
    python -m grin_jax.ds_moe_eval --workdir=workdirs/ds_moe_tiny       # validation loss against active fraction
Sparse inference is chosen at evaluation time (`model.ds_moe.inference*`, `model.moa.inference*`).
"""

import ml_collections

from grin_jax.presets import tiny

VARIANTS = ("", "dense", "moe")
NUM_EXPERTS, EXPERT_WIDTH = 16, 32
ATTENTION_EXPERTS = 4
MI_COEF = 0.01


def get_config(arg=None):
    parts = [p.strip() for p in (arg or "").split(",")]
    smoke = "smoke" in parts
    rest = [p for p in parts if p not in ("smoke", "")]
    if len(rest) > 1 or (rest and rest[0] not in VARIANTS):
        raise ValueError(f"config variant {arg!r} is unknown: accepted variants are {list(VARIANTS)}, each "
                         "optionally with ',smoke' (or 'smoke' alone)")
    variant = rest[0] if rest else ""
    config = tiny("smoke" if smoke else None, name="ds_moe_tiny" + (f"_{variant}" if variant else ""),
                  router="topk_softmax")
    m = config.model
    m.num_heads, m.num_kv_heads, m.head_dim = 8, 2, m.d_model // 8
    num_experts, width = (8, 16) if smoke else (NUM_EXPERTS, EXPERT_WIDTH)
    m.dense.d_hidden = num_experts * width
    m.moe.num_experts, m.moe.d_hidden, m.moe.top_k = num_experts, width, 2
    m.ds_moe = ml_collections.ConfigDict(dict(
        num_experts=num_experts,
        d_hidden=width,
        activation="swiglu",
        mi_coef=MI_COEF,
        inference="dense",          # at evaluation: 'top_k' | 'threshold' (same checkpoint)
        inference_top_k=2,
        inference_threshold=1.0,    # keep expert i when N * S_i > 1 (above uniform)
        backend="auto",
    ))
    m.layout = {"": "ds_moe", "dense": "dense", "moe": "moe"}[variant]
    if variant == "":
        m.moa = ml_collections.ConfigDict(dict(
            num_experts=ATTENTION_EXPERTS,
            mi_coef=MI_COEF,
            inference="dense",
            inference_top_k=2,
            inference_threshold=1.0,
        ))
    return config
