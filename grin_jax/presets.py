"""Shared parts of the experiment configs in configs/ (so config files do not repeat every field or import each
other): the tiny-LM family on the embedded corpus with the byte tokenizer.

    configs/grin_tiny.py    tiny(arg, name='grin_tiny')                                   the main job
    configs/gshard_tiny.py  tiny(arg, name='gshard_tiny', router='topk_softmax')
    configs/dense_tiny.py   tiny(arg, name='dense_tiny', layout='dense')
Variant 'smoke' (a few steps, for tests).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from grin_jax.data import default_data_config
from grin_jax.sharding import default_distributed_config, default_mesh_config
from grin_jax.train import default_train_config

ROUTER_OPTIONS = {"sparsemixer_v2": {"jitter_eps": 0.01},  # GRIN's value; sweep 0.01-0.5 for more router gradient
                  "topk_softmax": {"renormalize": True}}


def layer_loop_fields(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`model` with the layer-loop settings (model.scan_layers, remat, remat_names) at ModelConfig's defaults where
    it does not set them, so that --config.model.scan_layers=True etc. can override them (a locked config refuses
    keys it does not have)."""
    from grin_jax.models.config import LAYER_LOOP_FIELDS, ModelConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in LAYER_LOOP_FIELDS}
    for key, value in defaults.items():
        if key not in model:
            model[key] = value
    return model


def experiment(name: str, model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An experiment config: name, model (with `layer_loop_fields`), and the default data / train / mesh /
    distributed sections."""
    config = ml_collections.ConfigDict()
    config.name = name
    config.model = layer_loop_fields(model)
    config.data = default_data_config()
    config.train = default_train_config()
    config.mesh = default_mesh_config()                # (data, fsdp, expert, model); data=-1: all devices
    config.distributed = default_distributed_config()  # multi-process: jax.distributed (auto-detected on clusters)
    return config


def tiny_moe_section(router: str = "sparsemixer_v2") -> ml_collections.ConfigDict:
    """8 SwiGLU experts of width 256, top-2, GRIN's input jitter and aux-loss weights."""
    return ml_collections.ConfigDict(dict(
        num_experts=8, top_k=2, d_hidden=256, activation="swiglu", router=router,
        router_options=ROUTER_OPTIONS.get(router, {}),
        input_jitter=0.01,
        backend="auto",            # the fastest dropless backend for the platform (kernel on CPU, ragged_dot on GPU)
        capacity_factor=1.25,      # backend 'capacity' and moe.parallel 'alltoall' only
        parallel="allgather",      # on a mesh of > 1 device: 'allgather' | 'alltoall' | 'ragged_alltoall'
        load_balance_groups=1,     # 1: global balance over all data shards (GRIN); data shards: local
        load_balance_coef=0.01,
        z_loss_coef=0.001,
    ))


def tiny(arg=None, *, name: str, layout: str = "moe", router: str = "sparsemixer_v2") -> ml_collections.ConfigDict:
    """The tiny GRIN-style LM (PhiMoE-like: LayerNorm, GQA, RoPE, attention and LM-head biases), 400 steps of
    16 x 128 byte tokens. layout 'dense': every FFN a SwiGLU of width top_k * d_hidden (the MoE's active
    parameters per token)."""
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
    m.layout = layout
    m.moe = tiny_moe_section(router)
    m.dense = ml_collections.ConfigDict(dict(d_hidden=m.moe.top_k * m.moe.d_hidden, activation="swiglu"))
    m.tie_embeddings = False
    m.lm_head_bias = True
    m.param_dtype = "float32"
    m.dtype = "float32"
    m.activation_dtype = "float32"
    m.init_std = 0.02
    config = experiment(name, m)
    config.data.seq_len = 128
    t = config.train
    t.steps, t.batch_size, t.learning_rate, t.warmup_steps = 400, 16, 3e-3, 50
    t.log_every, t.eval_every, t.eval_batches, t.checkpoint_every = 10, 200, 16, 200
    if arg == "smoke":
        m.num_layers, m.d_model, m.head_dim = 2, 64, 16
        m.moe.d_hidden = 64
        m.dense.d_hidden = m.moe.top_k * m.moe.d_hidden
        config.data.seq_len = 32
        t.steps, t.batch_size, t.warmup_steps = 6, 4, 2
        t.log_every, t.eval_every, t.eval_batches, t.checkpoint_every = 1, 3, 2, 3
        t.final_eval_batches = 2  # the end-of-run eval of a smoke run: 2 batches, not the whole split
        t.progress = False
        config.mesh.data = 1  # one device (tests run with 8 fake CPU devices; the sharding tests set the mesh)
    elif arg not in (None, ""):
        raise ValueError(f"config variant {arg!r} is unknown: accepted variants are '' and 'smoke'")
    return config
