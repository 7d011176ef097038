"""GRIN vs GShard at toy scale (experiments/grin_vs_gshard/README.md): the main job's model (configs/grin_tiny.py: 4
blocks, d_model 128, top-2 of 8 SwiGLU experts, global load-balance loss) with SparseMixer-v2 at jitter
eps in {0.01, 0.05, 0.2, 0.5} against GShard / Mixtral top-2 softmax (configs/gshard_tiny.py), 3 seeds.

    python -m grin_jax.sweep --config=configs/sweeps/grin_vs_gshard.py --sweep_dir=experiments/grin_vs_gshard/runs
    python experiments/grin_vs_gshard/analyze.py > experiments/grin_vs_gshard/tables.md

Every run: 600 steps of 16 x 128 byte tokens (1.23M tokens, 12 % of the training split, no document seen twice),
validation on 16 batches every 100 steps and on the whole split at the end. The seed sets the initialisation and
the data order; every router sees the same batches for one seed. Variant `:quick` (1 seed, 2 rows, 40 steps)
checks the pipeline.
"""

import ml_collections

EPSILONS = (0.01, 0.05, 0.2, 0.5)


def get_config(arg=None):
    sweep = ml_collections.ConfigDict()
    sweep.base_config = "configs/grin_tiny.py"
    sweep.executor = "local"
    sweep.parallel = 2
    steps, seeds, epsilons = 600, [0, 1, 2], list(EPSILONS)
    if arg == "quick":
        steps, seeds, epsilons = 40, [0], [0.05]
    elif arg not in (None, ""):
        raise ValueError(f"sweep variant {arg!r} is unknown: accepted variants are '' and 'quick'")
    sweep.overrides = {"train": {"steps": steps, "warmup_steps": min(50, steps // 4), "eval_every": 100,
                                 "checkpoint_every": 200}}
    sweep.product = {"train": {"seed": seeds}}
    # One row per router: SparseMixer-v2 at each eps (the base config), then top-2 softmax (its own base config,
    # whose router has no eps: None = not set).
    sweep.zip = {"base_config": ["configs/grin_tiny.py"] * len(epsilons) + ["configs/gshard_tiny.py"],
                 "model": {"moe": {"router_options": {"jitter_eps": epsilons + [None]}}}}
    return sweep
