"""PEER at toy scale (experiments/peer/README.md): the middle block's FFN of a 3-block tiny LM (configs/peer_tiny.py:
d_model 128, the other blocks' FFN a SwiGLU of width 512) is a PEER layer, a dense SwiGLU of width 512, no FFN at
all, or a product-key memory (PKM: the same retrieval, values instead of singleton MLPs, expert_type='value').
PEER at N in {32^2, 64^2, 128^2} with the query BatchNorm on and off, PKM at the same N with it on; 8 heads x
top-16 (the paper's h and k); 2 seeds.

    python -m grin_jax.sweep --config=configs/sweeps/peer.py --sweep_dir=experiments/peer/runs
    python experiments/peer/analyze.py > experiments/peer/tables.md

Every run: 400 steps of 16 x 128 byte tokens (0.82M tokens), validation on the whole split at the end (usage and
unevenness of the PEER / PKM layer over it: the paper's Table 2 metrics). The seed sets the initialisation and the
data order; every row sees the same batches for one seed. Variant `:quick` (1 seed, 3 rows, 30 steps) checks the
pipeline.
"""

import ml_collections

SIZES = (32 ** 2, 64 ** 2, 128 ** 2)


def rows(sizes=SIZES):
    """(layout, peer.num_experts, peer.query_norm, peer.expert_type) per row; None = the base config's value."""
    return ([("dense,dense,dense", None, None, None), ("dense,none,dense", None, None, None)]
            + [("dense,peer,dense", n, norm, "singleton") for norm in ("batchnorm", "none") for n in sizes]
            + [("dense,peer,dense", n, "batchnorm", "value") for n in sizes])


def get_config(arg=None):
    sweep = ml_collections.ConfigDict()
    sweep.base_config = "configs/peer_tiny.py"
    sweep.executor = "local"
    sweep.parallel = 2
    steps, seeds, table = 400, [0, 1], rows()
    if arg == "quick":
        steps, seeds = 30, [0]
        table = [table[0], table[1], table[2]]
    elif arg not in (None, ""):
        raise ValueError(f"sweep variant {arg!r} is unknown: accepted variants are '' and 'quick'")
    sweep.overrides = {"model": {"num_layers": 3},
                       "train": {"steps": steps, "warmup_steps": min(50, steps // 4), "eval_every": 100,
                                 "checkpoint_every": 200}}
    sweep.product = {"train": {"seed": seeds}}
    sweep.zip = {"model": {"layout": [r[0] for r in table],
                           "peer": {"num_experts": [r[1] for r in table], "query_norm": [r[2] for r in table],
                                    "expert_type": [r[3] for r in table]}}}
    return sweep
