"""dense_tiny: grin_tiny's dense baseline: every layer a SwiGLU FFN of width top_k * d_hidden (the MoE's active
parameters per token)."""

from grin_jax.presets import tiny


def get_config(arg=None):
    return tiny(arg, name="dense_tiny", layout="dense")
