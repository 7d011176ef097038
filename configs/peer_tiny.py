"""peer_tiny: grin_tiny with its middle layers' FFN a PEER layer (He, "Mixture of A Million Experts",
arXiv 2407.04153; docs/peer.md): layout 'moe,peer,peer,moe', N = 128^2 single-neuron experts, 8 heads x top-16,
softmax scores, sub-keys and expert pool shared by the heads, query BatchNorm (the paper's choices; its running
statistics are in the train state as state['model_state']). Every other field is in grin_jax/presets.py (`tiny`).

    python -m grin_jax.train --config=configs/peer_tiny.py --workdir=workdirs/peer_tiny
Variants: `configs/peer_tiny.py:smoke` (a few steps, for tests: 2 layers 'moe,peer', N = 32^2). Without BatchNorm:
`--config.model.peer.query_norm=none`.
"""

import ml_collections

from grin_jax.presets import tiny


def get_config(arg=None):
    config = tiny(arg, name="peer_tiny")
    smoke = arg == "smoke"
    config.model.layout = "moe,peer" if smoke else "moe,peer,peer,moe"
    config.model.peer = ml_collections.ConfigDict(dict(
        num_experts=(32 if smoke else 128) ** 2,
        heads=8,
        top_k=16,
        d_key=config.model.d_model,     # the full query dimension of a head (sub-keys of d_model / 2)
        score_activation="softmax",
        expert_activation="gelu",
        expert_type="singleton",        # e_i(x) = gelu(u_i . x) v_i ('value': a product-key memory, e_i(x) = v_i)
        shared_keys=True,
        shared_experts=True,
        query_norm="batchnorm",         # the paper's query BatchNorm ('none': peer-pytorch's default)
        bn_momentum=0.99,               # running = 0.99 * running + 0.01 * batch statistics
        bn_epsilon=1e-5,
        chunk_tokens=1024,              # gathered rows per table <= 1024 * 8 * 16 * d_model floats
        table_update="dense",           # 'sparse': lazy AdamW on the retrieved rows only (worth it for N >> T*H*K)
    ))
    return config
