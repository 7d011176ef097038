"""gshard_tiny: grin_tiny with the GShard / Mixtral top-2 softmax router (renormalised) instead of SparseMixer-v2."""

from grin_jax.presets import tiny


def get_config(arg=None):
    return tiny(arg, name="gshard_tiny", router="topk_softmax")
