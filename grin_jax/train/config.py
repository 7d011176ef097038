"""The `train` section of an experiment config: defaults and validation (errors name the key).

Sequence length lives in `data.seq_len`; the aux-loss coefficients in `model.load_balance_coef` /
`model.z_loss_coef` (the model returns the weighted total as aux['aux_loss']).

Evaluation: every `eval_every` steps the trainer scores the first `eval_batches` global batches of the validation
split (cheap, for the curve); at the end of the run it scores the first `final_eval_batches` (default 0: the whole
split), with the standard error of the loss over documents (grin_jax.data.DocumentLosses). That final evaluation is
summary.json's validation_loss, validation_loss_stderr and validation_documents."""

from __future__ import annotations

import ml_collections


def default_train_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 1000                 # optimizer steps
    c.batch_size = 16              # sequences per step (global, over all processes)
    c.grad_accum_steps = 1         # micro-batches per step: batch_size / grad_accum_steps sequences per forward
    c.learning_rate = 3e-3
    c.warmup_steps = 50
    c.final_lr_fraction = 0.1      # cosine decays to this fraction of the peak
    c.weight_decay = 0.1
    c.b1 = 0.9
    c.b2 = 0.95
    c.clip_norm = 1.0
    c.log_every = 10
    c.eval_every = 200             # 0: only at the end
    c.eval_batches = 8             # validation batches per periodic evaluation (0: the whole validation split)
    c.final_eval_batches = 0       # validation batches of the end-of-run evaluation (0: the whole split, default)
    c.checkpoint_every = 200       # 0: only at the end
    c.keep_checkpoints = 2
    c.async_checkpoint = True
    c.progress = True              # progress bar on stderr
    c.compilation_cache_dir = ""   # JAX's persistent compilation cache: '' = $JAX_COMPILATION_CACHE_DIR or
                                   # ~/.cache/grin_jax/jax_cache; 'none' = off. Restarts and sweeps skip recompiling.
    return c


_POSITIVE_INTS = ("steps", "batch_size", "keep_checkpoints", "log_every")
_NON_NEGATIVE_INTS = ("warmup_steps", "eval_every", "eval_batches", "final_eval_batches", "checkpoint_every",
                      "seed")
_NON_NEGATIVE_FLOATS = ("weight_decay", "clip_norm")


def grad_accum_steps(c) -> int:
    """train.grad_accum_steps (configs written before it existed: the default)."""
    return c.get("grad_accum_steps", default_train_config().grad_accum_steps)


def validate_train_config(c) -> None:
    """Raise ValueError naming `train.<key>`, its value and what is accepted."""
    for key in _POSITIVE_INTS:
        value = c[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"train.{key}={value!r} is invalid: accepted values are integers >= 1")
    for key in _NON_NEGATIVE_INTS:
        value = c[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"train.{key}={value!r} is invalid: accepted values are integers >= 0")
    for key in _NON_NEGATIVE_FLOATS:
        if not c[key] >= 0:
            raise ValueError(f"train.{key}={c[key]!r} is invalid: accepted values are >= 0")
    if not c.learning_rate > 0:
        raise ValueError(f"train.learning_rate={c.learning_rate!r} is invalid: accepted values are > 0")
    for key in ("b1", "b2"):
        if not 0 <= c[key] < 1:
            raise ValueError(f"train.{key}={c[key]!r} is invalid: accepted values are in [0, 1)")
    if not 0 <= c.final_lr_fraction <= 1:
        raise ValueError(f"train.final_lr_fraction={c.final_lr_fraction!r} is invalid: accepted values are in [0, 1]")
    accum = grad_accum_steps(c)
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
        raise ValueError(f"train.grad_accum_steps={accum!r} is invalid: accepted values are integers >= 1")
    if c.batch_size % accum:  # the data shards: sharding.validate
        raise ValueError(f"train.batch_size={c.batch_size} is not divisible by train.grad_accum_steps={accum}: "
                         f"accepted values are multiples of {accum}")
    if c.warmup_steps > c.steps:
        raise ValueError(f"train.warmup_steps={c.warmup_steps} is invalid: accepted values are <= "
                         f"train.steps={c.steps}")
