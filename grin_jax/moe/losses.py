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
                      axis_name=None, expert_load_E: jax.Array | None = None) -> jax.Array:
    """Switch load-balancing loss (multiply by the coefficient alpha yourself). 1.0 when perfectly balanced.

    expert_load_E (gradient accumulation, train/step.py): f of the whole step's batch (`expert_load` averaged over
    its equal-sized micro-batches) instead of this batch's. f carries no gradient and P is a mean over tokens, so
    the mean over the micro-batches of these losses is the whole batch's loss, value and gradient. num_groups 1."""
    num_tokens, num_experts = probs_TE.shape
    if num_groups < 1 or num_tokens % num_groups:
        raise ValueError(f"num_groups={num_groups!r} is invalid: it must be >= 1 and divide the {num_tokens} tokens")
    if expert_load_E is not None:
        if num_groups != 1:
            raise ValueError(f"num_groups={num_groups} with expert_load_E: the whole batch's load is one group's")
        p_E = jnp.mean(probs_TE.astype(jnp.float32), axis=0)
        if axis_name is not None:
            p_E = jax.lax.pmean(p_E, axis_name)
        return num_experts * jnp.sum(jax.lax.stop_gradient(expert_load_E.astype(jnp.float32)) * p_E)
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


def mutual_information_statistics(probs_TE: jax.Array, mask_T: jax.Array | None = None) -> dict:
    """What the MI loss needs of the whole batch: {'usage_sum': sum_t m_t S_t [E], 'tokens': sum_t m_t} (float32;
    m_t = 1 for counted tokens, mask_T > 0, else 0; None: every token). Sums over the T tokens given (under jit on
    sharded arrays: the global batch); averaged over the micro-batches of an accumulated step, they are the
    `batch_stats` of `mutual_information_loss`."""
    probs_TE = probs_TE.astype(jnp.float32)
    w_T = (jnp.ones(probs_TE.shape[:1], jnp.float32) if mask_T is None
           else (mask_T.reshape(probs_TE.shape[0]) > 0).astype(jnp.float32))
    return {"usage_sum": jnp.sum(w_T[:, None] * probs_TE, axis=0), "tokens": jnp.sum(w_T)}


def mutual_information_loss(probs_TE: jax.Array, mask_T: jax.Array | None = None,
                            batch_stats: dict | None = None) -> jax.Array:
    """DS-MoE: L_MI = -H(e) + mean_x H(e|x), H(e) the entropy of the batch-mean router distribution p.

    probs_TE [T, E]: the router probabilities of the T tokens (rows sum to 1; cast to float32).
    mask_T [T] (optional): non-zero (> 0) for the tokens that count, 0 for padding; None = every token. With weights
      m_t = 1 where the mask is > 0, else 0:  p = sum_t m_t S_t / max(sum_t m_t, 1) and
      mean_x H(e|x) = sum_t m_t H(S_t) / max(sum_t m_t, 1), so padded tokens change neither the value nor the
      gradient (every token masked: 0). The means are over all T tokens given: under jax.jit on sharded arrays they
      are over the global batch.
    batch_stats (gradient accumulation, train/step.py): `mutual_information_statistics` averaged over the M
      micro-batches of the step, {'usage_sum' U [E], 'tokens' n}. The loss then uses the whole batch's p = U / n,
      with this micro-batch's own sums live in it: p = (U + u - stop_gradient(u)) / n, and divides its entropy sum
      by n. The mean of these losses over the micro-batches equals the loss of the whole batch, value and gradient
      (tests/test_grad_accum.py); with one micro-batch (batch_stats = its own sums) it is the loss above.
    Returns a float32 scalar in [-log E, 0] (without batch_stats). The log's argument is clipped at 1e-30: a
    probability of exactly 0 (a dead expert, one-hot rows) gives a finite value and gradient.
    """
    probs_TE = probs_TE.astype(jnp.float32)

    def entropy(p):
        return -jnp.sum(p * jnp.log(jnp.clip(p, 1e-30, 1.0)), axis=-1)

    if mask_T is None and batch_stats is None:
        return -entropy(jnp.mean(probs_TE, axis=0)) + jnp.mean(entropy(probs_TE))
    own = mutual_information_statistics(probs_TE, mask_T)
    w_T = (jnp.ones(probs_TE.shape[:1], jnp.float32) if mask_T is None
           else (mask_T.reshape(probs_TE.shape[0]) > 0).astype(jnp.float32))
    if batch_stats is None:
        usage_sum_E, count = own["usage_sum"], jnp.maximum(own["tokens"], 1.0)
    else:
        usage_sum_E = (jax.lax.stop_gradient(batch_stats["usage_sum"]) + own["usage_sum"]
                       - jax.lax.stop_gradient(own["usage_sum"]))
        count = jnp.maximum(jax.lax.stop_gradient(batch_stats["tokens"]), 1.0)
    return -entropy(usage_sum_E / count) + jnp.sum(w_T * entropy(probs_TE)) / count


def routing_metrics(expert_ids_TK: jax.Array, probs_TE: jax.Array, axis_name=None) -> dict:
    """Per-layer statistics for logging: expert load [E], max load (max_i f_i * E: 1 = balanced), router entropy."""
    num_experts = probs_TE.shape[-1]
    load_E = expert_load(expert_ids_TK, num_experts, axis_name)
    probs_TE = probs_TE.astype(jnp.float32)
    entropy = -jnp.mean(jnp.sum(probs_TE * jnp.log(jnp.clip(probs_TE, 1e-30, 1.0)), axis=-1))
    return {"expert_load": load_E, "max_load": jnp.max(load_E) * num_experts, "router_entropy": entropy}
