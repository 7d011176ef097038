"""gshard_tiny: grin_tiny with the GShard / Mixtral top-2 softmax router (renormalised) instead of SparseMixer-v2."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import grin_tiny  # noqa: E402


def get_config(arg=None):
    return grin_tiny.get_config(arg, router="topk_softmax", name="gshard_tiny")
