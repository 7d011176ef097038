"""dense_tiny: grin_tiny's dense baseline: every layer a SwiGLU FFN of width top_k * d_expert (the MoE's active
parameters per token)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import grin_tiny  # noqa: E402


def get_config(arg=None):
    return grin_tiny.get_config(arg, ffn="dense", name="dense_tiny")
