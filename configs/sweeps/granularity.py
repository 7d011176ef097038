"""The granularity sweep (Krajewski et al.; docs/fine_grained.md) at toy scale on the embedded corpus (byte tokens).

    python -m grin_jax.sweep --config=configs/sweeps/granularity.py --sweep_dir=experiments/granularity/runs \
        --parallel=2
    python -m grin_jax.scaling.fit --sweep=experiments/granularity/runs --where model.layout=moe --out experiments/granularity/coeffs.json \
        --plots experiments/granularity/

Base: configs/fine_grained_tiny.py (E = 8, expert choice, plain GELU experts, LayerNorm on the MoE output,
2 blocks, 300 steps x 32 x 64 tokens = 614k tokens). Axes: seed 0, 1, 2 (outermost, so a cut-short sweep still has one
complete seed) x zipped rows d_model in {64, 96, 128} x [G in {1, 2, 4, 8} fine-grained MoE, plus the dense baseline with the
same active parameters (layout='dense', width 4 d_model; its G column reads 1)] = 3 x 3 x 5 = 45 trials.
Every MoE trial of one size has the same active parameters and (up to the router, d*E*G*14 FLOPs per token and
block) the same training FLOPs, so comparing G at fixed size is comparing at (almost) equal compute.
Variant `:quick` (1 seed, 2 sizes, 60 steps) checks the pipeline in a few minutes.
"""

import ml_collections


VARIANTS = [("moe", 1), ("moe", 2), ("moe", 4), ("moe", 8), ("dense", 1)]  # (layout, granularity)


def _size_variants(d_models):
    rows = [(d, layout, g) for d in d_models for layout, g in VARIANTS]
    return {"d_model": [r[0] for r in rows], "layout": [r[1] for r in rows],
            "moe": {"granularity": [r[2] for r in rows]}}


def get_config(arg=None):
    sweep = ml_collections.ConfigDict()
    sweep.base_config = "configs/fine_grained_tiny.py"
    sweep.executor = "local"
    sweep.parallel = 2
    sweep.overrides = {"train": {"steps": 300, "warmup_steps": 30}}
    # Trials run in order: seed outermost (the product axis), then the zipped (size, variant) rows.
    sweep.product = {"train": {"seed": [0, 1, 2]}}
    sweep.zip = {"model": _size_variants([64, 96, 128])}
    if arg == "quick":
        sweep.overrides = {"train": {"steps": 60, "warmup_steps": 10}}
        sweep.product = {"train": {"seed": [0]}}
        sweep.zip = {"model": _size_variants([64, 96])}
    elif arg not in (None, ""):
        raise ValueError(f"sweep variant {arg!r} is unknown: accepted variants are '' and 'quick'")
    return sweep
