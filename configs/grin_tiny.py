"""grin_tiny: the default main job. A small GRIN MoE LM (SparseMixer-v2 top-2 of 8 SwiGLU experts, PhiMoE-style
LayerNorm + GQA + RoPE) trained on the embedded Python-stdlib corpus with the byte tokenizer, a few minutes on
2 CPU cores. Every field is in grin_jax/presets.py (`tiny`).

    python -m grin_jax.train --config=configs/grin_tiny.py --workdir=workdirs/grin_tiny
Variants: `configs/grin_tiny.py:smoke` (a few steps, for tests).
"""

from grin_jax.presets import tiny


def get_config(arg=None):
    return tiny(arg, name="grin_tiny")
