"""DS-MoE at toy scale (experiments/ds_moe/README.md): the DS-MoE model of configs/ds_moe_tiny.py (16 MLP experts
of width 32 and 4 attention experts in every block, trained densely) at mutual-information loss weights
alpha in {0, 0.01, 0.1} (the same alpha for the MLP and the attention experts), beside the dense baseline
(`:dense`) and the sparse-trained top-2 MoE with equal total parameters (`:moe`), 2 seeds.

    python -m grin_jax.sweep --config=configs/sweeps/ds_moe.py --sweep_dir=experiments/ds_moe/runs
    python experiments/ds_moe/evaluate.py experiments/ds_moe/runs --max_batches 16   # every checkpoint's sparsity grid
    python experiments/ds_moe/analyze.py > experiments/ds_moe/tables.md

Every run: 400 steps of 16 x 128 byte tokens (0.8M tokens), validation on the whole split at the end. The seed
sets the initialisation and the data order. Variant `:quick` (1 seed, alpha 0.1 and the MoE, 20 steps) checks the
pipeline.
"""

import ml_collections

ALPHAS = (0.0, 0.01, 0.1)
BASE = "configs/ds_moe_tiny.py"


def get_config(arg=None):
    sweep = ml_collections.ConfigDict()
    sweep.base_config = BASE
    sweep.executor = "local"
    sweep.parallel = 2
    steps, seeds, alphas = 400, [0, 1], list(ALPHAS)
    if arg == "quick":
        steps, seeds, alphas = 20, [0], [0.1]
    elif arg not in (None, ""):
        raise ValueError(f"sweep variant {arg!r} is unknown: accepted variants are '' and 'quick'")
    sweep.overrides = {"train": {"steps": steps, "warmup_steps": min(50, steps // 4), "eval_every": 100,
                                 "checkpoint_every": 200}}
    sweep.product = {"train": {"seed": seeds}}
    # One row per model: DS-MoE at each alpha (the base config), then the two baselines (their own variants, where
    # alpha means nothing: None = not set).
    unset = [None, None] if arg != "quick" else [None]
    baselines = [f"{BASE}:dense", f"{BASE}:moe"] if arg != "quick" else [f"{BASE}:moe"]
    sweep.zip = {"base_config": [BASE] * len(alphas) + baselines,
                 "model": {"ds_moe": {"mi_coef": alphas + unset}, "moa": {"mi_coef": alphas + unset}}}
    return sweep
