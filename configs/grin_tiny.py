"""grin_tiny: the default main job. A small GRIN MoE LM (SparseMixer-v2 top-2 of 8 SwiGLU experts, PhiMoE-style
LayerNorm + GQA + RoPE) trained on the embedded Python-stdlib corpus with the byte tokenizer, a few minutes on
2 CPU cores.

    python -m grin_jax.train --config=configs/grin_tiny.py --workdir=workdirs/grin_tiny
Variants: `configs/grin_tiny.py:smoke` (a few steps, for tests).
"""

import ml_collections

from grin_jax.data import default_data_config
from grin_jax.sharding import default_distributed_config, default_mesh_config
from grin_jax.train import default_train_config


def model_config(*, ffn: str = "moe", router: str = "sparsemixer_v2") -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.vocab_size = 259            # byte tokenizer: 256 bytes + PAD, BOS, EOS
    m.d_model = 128
    m.num_layers = 4
    m.num_heads = 4
    m.num_kv_heads = 2
    m.head_dim = 32
    m.max_seq_len = 256
    m.norm = "layernorm"
    m.norm_eps = 1e-5
    m.rope_theta = 10000.0
    m.sliding_window = ml_collections.FieldReference(None, field_type=int)
    m.attention_bias = True
    m.ffn = ffn
    m.moe_every = 1
    m.num_experts = 8
    m.top_k = 2
    m.d_expert = 256
    m.d_ff = ml_collections.FieldReference(None, field_type=int)  # None: top_k * d_expert (same active params)
    m.activation = "swiglu"
    m.router = router
    m.jitter_eps = 0.01           # GRIN's value; sweep 0.01-0.5 to give more tokens a router gradient
    m.renormalize = True
    m.input_jitter = 0.01
    m.moe_backend = "auto"        # the fastest dropless backend for the platform (kernel on CPU, ragged_dot on GPU/TPU)
    m.capacity_factor = 1.25
    m.load_balance_groups = 1      # 1: global balance over all data shards (GRIN); mesh.data x mesh.expert: local
    m.moe_parallel = "allgather"  # MoE strategy on a mesh of > 1 device: 'allgather' | 'alltoall' | 'ragged_alltoall'
    m.load_balance_coef = 0.01
    m.z_loss_coef = 0.001
    m.tie_embeddings = False
    m.lm_head_bias = True
    m.param_dtype = "float32"
    m.dtype = "float32"
    m.activation_dtype = "float32"
    m.init_std = 0.02
    return m


def get_config(arg=None, *, ffn: str = "moe", router: str = "sparsemixer_v2", name: str = "grin_tiny"):
    config = ml_collections.ConfigDict()
    config.name = name
    config.model = model_config(ffn=ffn, router=router)
    config.data = default_data_config()
    config.data.seq_len = 128
    config.train = default_train_config()
    config.train.steps = 400
    config.train.batch_size = 16
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 50
    config.train.log_every = 10
    config.train.eval_every = 200
    config.train.eval_batches = 16
    config.train.checkpoint_every = 200
    config.mesh = default_mesh_config()                # (data, expert, model); data=-1: all devices, data-parallel
    config.distributed = default_distributed_config()  # multi-process: jax.distributed (auto-detected on clusters)
    if arg == "smoke":
        config.model.num_layers = 2
        config.model.d_model = 64
        config.model.head_dim = 16
        config.model.d_expert = 64
        config.data.seq_len = 32
        config.train.steps = 6
        config.train.batch_size = 4
        config.train.warmup_steps = 2
        config.train.log_every = 1
        config.train.eval_every = 3
        config.train.eval_batches = 2
        config.train.checkpoint_every = 3
        config.train.progress = False
        config.mesh.data = 1  # one device (tests run with 8 fake CPU devices; the sharding tests set the mesh)
    elif arg not in (None, ""):
        raise ValueError(f"config variant {arg!r} is unknown: accepted variants are '' and 'smoke'")
    return config
