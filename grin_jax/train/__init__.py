"""Training: optimizer (optim), jitted train/eval steps (step), Orbax checkpoints (checkpoint), metric writers
(metrics), plots (plots), the loop (trainer; it re-exports the step module's names)."""

from grin_jax.train.config import default_train_config, validate_train_config
from grin_jax.train.trainer import Experiment, NonFiniteLossError, resolve, train

__all__ = ["default_train_config", "validate_train_config", "Experiment", "NonFiniteLossError", "resolve", "train"]
