"""Language models built from grin_jax.nn (GRIN-MoE / PhiMoE, Mixtral-style, dense baselines)."""

from grin_jax.models.config import ModelConfig, model_config_from
from grin_jax.models.generate import generate, sample_logits
from grin_jax.models.lm import (DecoderLM, abstract_init, apply, apply_jit, apply_train, apply_with_cache,
                                cross_entropy, flatten_params, init, init_cache, combine_aux, join_variables,
                                row_sink_shapes, split_variables, unflatten_params)

__all__ = [
    "ModelConfig", "model_config_from", "DecoderLM", "abstract_init", "apply", "apply_jit", "apply_with_cache",
    "cross_entropy", "flatten_params", "init", "init_cache", "combine_aux", "unflatten_params", "generate",
    "apply_train", "join_variables", "split_variables", "row_sink_shapes",
    "sample_logits",
]
