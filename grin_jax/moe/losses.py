"""Auxiliary losses and routing statistics. Axes: T tokens, E experts, K slots per token.

Load balancing (Switch / GRIN §3.3):  E * sum_i f_i * P_i, with f_i the fraction of token-slots dispatched to
expert i (no gradient) and P_i the mean router probability of expert i.
  - global (GRIN): f and P over all tokens of the batch. Under `jax.jit` on sharded arrays this is the default
    (arrays are global). Inside `shard_map`, pass `axis_name` (a mesh axis name or a tuple of them) and the
    counts are all-reduced over those axes.
  - local: `num_groups = G` splits the T tokens into G contiguous groups (e.g. the data shards), computes the
    loss per group and averages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def expert_load(expert_ids_TK: jax.Array, num_experts: int, axis_name=None) -> jax.Array:
    """f: fraction of token-slots dispatched to each expert [E] (sums to 1; all-reduced over `axis_name`)."""
    counts_E = jnp.bincount(expert_ids_TK.reshape(-1), length=num_experts).astype(jnp.float32)
    counts_E = _psum(counts_E, axis_name)
    return counts_E / jnp.sum(counts_E)


def load_balance_loss(expert_ids_TK: jax.Array, probs_TE: jax.Array, *, num_groups: int = 1,
                      axis_name=None) -> jax.Array:
    """Switch load-balancing loss (multiply by the coefficient alpha yourself). 1.0 when perfectly balanced."""
    num_tokens, num_experts = probs_TE.shape
    if num_groups < 1 or num_tokens % num_groups:
        raise ValueError(f"num_groups={num_groups!r} is invalid: it must be >= 1 and divide the {num_tokens} tokens")
    ids_GTK = expert_ids_TK.reshape(num_groups, num_tokens // num_groups, -1)
    probs_GTE = probs_TE.astype(jnp.float32).reshape(num_groups, num_tokens // num_groups, num_experts)
    f_GE = jax.vmap(lambda ids: expert_load(ids, num_experts, axis_name))(ids_GTK)
    p_GE = jnp.mean(probs_GTE, axis=1)
    if axis_name is not None:
        p_GE = jax.lax.pmean(p_GE, axis_name)
    return num_experts * jnp.mean(jnp.sum(jax.lax.stop_gradient(f_GE) * p_GE, axis=-1))


def router_z_loss(logits_TE: jax.Array, axis_name=None) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of logsumexp(z)^2."""
    value = jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)))
    return value if axis_name is None else jax.lax.pmean(value, axis_name)


def mutual_information_loss(probs_TE: jax.Array, mask_T: jax.Array | None = None) -> jax.Array:
    """DS-MoE: L_MI = -H(e) + mean_x H(e|x), H(e) the entropy of the batch-mean router distribution p.

    probs_TE [T, E]: the router probabilities of the T tokens (rows sum to 1; cast to float32).
    mask_T [T] (optional): non-zero (> 0) for the tokens that count, 0 for padding; None = every token. With weights
      m_t = 1 where the mask is > 0, else 0:  p = sum_t m_t S_t / max(sum_t m_t, 1) and
      mean_x H(e|x) = sum_t m_t H(S_t) / max(sum_t m_t, 1), so padded tokens change neither the value nor the
      gradient (every token masked: 0). The means are over all T tokens given: under jax.jit on sharded arrays they
      are over the global batch.
    Returns a float32 scalar in [-log E, 0]. The log's argument is clipped at 1e-30: a probability of exactly 0
    (a dead expert, one-hot rows) gives a finite value and gradient.
    """
    probs_TE = probs_TE.astype(jnp.float32)

    def entropy(p):
        return -jnp.sum(p * jnp.log(jnp.clip(p, 1e-30, 1.0)), axis=-1)

    if mask_T is None:
        return -entropy(jnp.mean(probs_TE, axis=0)) + jnp.mean(entropy(probs_TE))
    num_tokens = probs_TE.shape[0]
    w_T = (mask_T.reshape(num_tokens) > 0).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w_T), 1.0)
    usage_E = jnp.sum(w_T[:, None] * probs_TE, axis=0) / count
    return -entropy(usage_E) + jnp.sum(w_T * entropy(probs_TE)) / count


def routing_metrics(expert_ids_TK: jax.Array, probs_TE: jax.Array, axis_name=None) -> dict:
    """Per-layer statistics for logging: expert load [E], max load (max_i f_i * E: 1 = balanced), router entropy."""
    num_experts = probs_TE.shape[-1]
    load_E = expert_load(expert_ids_TK, num_experts, axis_name)
    probs_TE = probs_TE.astype(jnp.float32)
    entropy = -jnp.mean(jnp.sum(probs_TE * jnp.log(jnp.clip(probs_TE, 1e-30, 1.0)), axis=-1))
    return {"expert_load": load_E, "max_load": jnp.max(load_E) * num_experts, "router_entropy": entropy}
