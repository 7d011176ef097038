"""fine_grained_tiny: a small fine-grained MoE in the parametrisation of Krajewski et al. (docs/fine_grained.md), trained on
the embedded Python-stdlib corpus with the byte tokenizer (the base of the granularity sweep).

Expansion rate E = 8 (experts hold 8x the parameters of the dense FFN of width d_ff = 4 * d_model), granularity G:
E*G experts of width 4*d_model/G, expert-choice routing grouped by position (each token visits G experts on
average), plain 2-matrix GELU experts (active FFN params 8 d^2 per block, as the paper), full multi-head attention
without biases (4 d^2 per block), a LayerNorm on the MoE output. Non-embedding parameters without router and norms
are then exactly d^2 (8E + 4) per block, the N of the law.

    python -m grin_jax.train --config=configs/fine_grained_tiny.py --workdir=workdirs/fg_tiny \
        --config.model.moe.granularity=4
Variants: `:dense` (every FFN a dense GELU FFN of width 4 * d_model, the baseline), `:topk` (token-choice top-G
softmax routing instead of expert choice, capacity backend), `:smoke` (a few steps, for tests); combine with
'+', e.g. `:dense+smoke`.
"""

import ml_collections

from grin_jax.presets import experiment


def model_config() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.vocab_size = 259            # byte tokenizer: 256 bytes + PAD, BOS, EOS
    m.d_model = 64
    m.num_layers = 2
    m.num_heads = 4
    m.num_kv_heads = 4            # full multi-head attention: 4 d^2 attention params per block (paper)
    m.head_dim = ml_collections.FieldReference(None, field_type=int)   # d_model // num_heads
    m.max_seq_len = 256
    m.norm = "layernorm"
    m.attention_bias = False
    m.layout = "moe"
    # Fine-grained: num_experts = E*G, d_hidden = d_ff/G, top_k = G are derived (do not set them).
    m.moe = ml_collections.ConfigDict(dict(
        expansion_rate=8.0, granularity=1,
        d_ff=ml_collections.FieldReference(None, field_type=int),      # None: 4 * d_model
        activation="gelu",        # plain 2-matrix experts, as the paper
        router="expert_choice", router_options={"capacity_factor": 1.0},
        backend="capacity",       # used only by token-choice routers (the :topk variant) ...
        capacity_factor=1.0,      # ... with this capacity (expert choice's is in its router_options)
        output_norm=True,         # "crucial for G > 1"
        load_balance_coef=0.0,    # expert choice is balanced by construction
        z_loss_coef=0.0))
    m.dense = ml_collections.ConfigDict(dict(
        d_hidden=ml_collections.FieldReference(None, field_type=int),  # None: 4 * d_model (the baseline)
        activation="gelu"))
    m.tie_embeddings = False
    m.lm_head_bias = False
    m.param_dtype = "float32"
    m.dtype = "float32"
    m.activation_dtype = "float32"
    return m


def get_config(arg=None):
    variants = [v for v in (arg or "").split("+") if v]
    unknown = sorted(set(variants) - {"dense", "topk", "smoke"})
    if unknown:
        raise ValueError(f"config variant(s) {unknown} unknown: accepted variants are 'dense', 'topk', 'smoke' "
                         "(combine with '+')")
    config = experiment("fine_grained_tiny", model_config())
    config.data.seq_len = 64
    config.train.steps = 300
    config.train.batch_size = 32
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 30
    config.train.log_every = 10
    config.train.eval_every = 0
    config.train.eval_batches = 8
    config.train.checkpoint_every = 0
    config.train.keep_checkpoints = 1
    config.train.progress = False
    if "dense" in variants:
        config.name = "fine_grained_tiny_dense"
        config.model.layout = "dense"
    if "topk" in variants:
        config.name += "_topk"
        config.model.moe.router = "topk_softmax"
        config.model.moe.router_options = {"renormalize": False}
    if "smoke" in variants:
        config.data.seq_len = 16
        config.train.steps = 4
        config.train.batch_size = 8
        config.train.warmup_steps = 1
        config.train.log_every = 1
        config.train.eval_batches = 1
        config.mesh.data = 1  # one device (tests run with 8 fake CPU devices)
    return config
