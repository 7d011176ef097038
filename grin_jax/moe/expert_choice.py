"""Expert-choice routing grouped by position across sequences (Krajewski et al., REFERENCE §2).

Axes: B batch, S sequence, D model, E experts, C tokens each expert takes per group.

A group is the batch at one position s (the B tokens x[:, s]), so no token's routing depends on later positions
(causal). Per group: router probabilities softmax over experts [B, E]; each expert takes the C tokens with the
highest probability in its column, C = ceil(capacity_factor * B * top_k / E) (top_k = the mean number of experts per
token, G in the fine-grained parametrisation, so C = B / expansion_rate at capacity 1). A token's output is the sum
over the experts that took it of prob * Expert(x); a token no expert took gets 0 (metric 'dropped_fraction':
the fraction of tokens with no expert). Load is balanced by construction (every expert takes exactly C tokens).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from grin_jax.moe import experts as _experts


def tokens_per_expert(batch: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C: how many tokens of a group (the batch at one position) each expert takes."""
    return max(1, min(batch, math.ceil(capacity_factor * batch * top_k / num_experts)))


def expert_choice_ffn(expert_params: dict, router_DE: jax.Array, x_BSD: jax.Array, *, top_k: int,
                      capacity_factor: float = 1.0, activation: str = "swiglu", router_dtype=jnp.float32):
    """Expert-choice MoE FFN over x_BSD -> (y_BSD, aux)."""
    num_experts, d_model, _ = _experts.check_expert_params(expert_params, activation)
    if x_BSD.ndim != 3 or x_BSD.shape[-1] != d_model:
        raise ValueError(f"expert choice needs x as [batch, seq, d_model={d_model}], got shape {x_BSD.shape}")
    batch, seq, _ = x_BSD.shape
    capacity = tokens_per_expert(batch, num_experts, top_k, capacity_factor)
    x_SBD = jnp.swapaxes(x_BSD, 0, 1)
    logits_SBE = x_SBD.astype(router_dtype) @ router_DE.astype(router_dtype)
    probs_SBE = jax.nn.softmax(logits_SBE.astype(jnp.float32), axis=-1)
    weights_SEC, token_SEC = jax.lax.top_k(jnp.swapaxes(probs_SBE, 1, 2), capacity)  # per expert column
    x_SECD = jax.vmap(lambda x_BD, t_EC: x_BD[t_EC])(x_SBD, token_SEC)
    x_ESCD = jnp.moveaxis(x_SECD, 1, 0).reshape(num_experts, seq * capacity, d_model)
    y_ESCD = _experts.apply_experts_batched(expert_params, x_ESCD, activation=activation)
    y_SECD = jnp.moveaxis(y_ESCD.reshape(num_experts, seq, capacity, d_model), 0, 1)
    y_SECD = y_SECD * weights_SEC[..., None].astype(y_SECD.dtype)

    def combine(y_ECD, t_EC):
        return jnp.zeros((batch, d_model), y_ECD.dtype).at[t_EC.reshape(-1)].add(y_ECD.reshape(-1, d_model))

    y_SBD = jax.vmap(combine)(y_SECD, token_SEC)
    taken_SB = jax.vmap(lambda t_EC: jnp.zeros((batch,), jnp.int32).at[t_EC.reshape(-1)].add(1))(token_SEC)
    entropy = -jnp.mean(jnp.sum(probs_SBE * jnp.log(jnp.clip(probs_SBE, 1e-30, 1.0)), axis=-1))
    metrics = {
        "expert_load": jnp.full((num_experts,), 1.0 / num_experts, jnp.float32),
        "max_load": jnp.float32(1.0),
        "router_entropy": entropy,
        "router_grad_fraction": jnp.mean((taken_SB > 0).astype(jnp.float32)),
        "dropped_fraction": jnp.mean((taken_SB == 0).astype(jnp.float32)),
        "mean_experts_per_token": jnp.mean(taken_SB.astype(jnp.float32)),
    }
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits_SBE.astype(jnp.float32), axis=-1)))
    aux = {"load_balance_loss": jnp.float32(0.0), "z_loss": z_loss, "metrics": metrics}
    return jnp.swapaxes(y_SBD, 0, 1), aux
