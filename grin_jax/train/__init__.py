"""Training: optimizer, jitted train/eval steps, Orbax checkpoints, metric writers, plots, the loop."""

from grin_jax.train.config import default_train_config, validate_train_config
from grin_jax.train.trainer import Experiment, NonFiniteLossError, resolve, train

__all__ = ["default_train_config", "validate_train_config", "Experiment", "NonFiniteLossError", "resolve", "train"]
