"""Optimizer: AdamW with linear warm-up + cosine decay, global-norm gradient clipping."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(*, learning_rate: float, warmup_steps: int, total_steps: int,
                           final_lr_fraction: float = 0.1):
    """Linear warm-up from 0 to `learning_rate`, then cosine decay to final_lr_fraction * learning_rate."""
    warmup = max(warmup_steps, 1)  # optax needs >= 1 warm-up step and >= 1 decay step (a 1-step run included)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=learning_rate * final_lr_fraction)


def decay_mask(params):
    """Weight decay on matrices only (ndim >= 2): not on norms, biases or scalars."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


ADAM_EPS = 1e-8


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int, weight_decay: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, eps: float = ADAM_EPS, clip_norm: float = 1.0,
                   final_lr_fraction: float = 0.1):
    """AdamW + warm-up/cosine + clipping. Returns (optax transformation, schedule)."""
    schedule = learning_rate_schedule(learning_rate=learning_rate, warmup_steps=warmup_steps,
                                      total_steps=total_steps, final_lr_fraction=final_lr_fraction)
    chain = []
    if clip_norm and clip_norm > 0:
        chain.append(optax.clip_by_global_norm(clip_norm))
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*chain), schedule
