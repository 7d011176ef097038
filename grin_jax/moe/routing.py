"""Routers: router logits -> a `Routing` pytree. One function per router, one name in `ROUTERS`.

Axes: T tokens, E experts, K slots per token.

Every router has the signature
    router(logits_TE, *, top_k, training, rng, **options) -> Routing
so a new router (DS-MoE's dense router, an expert-choice router) is one function plus one registry entry.
The router matmul itself (x @ w_router) stays outside: routers only see logits.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from grin_jax.moe import sparsemixer as _sparsemixer


class Routing(NamedTuple):
    """What a router decided for T tokens.

    expert_ids: [T, K] int32, the experts each token-slot is sent to.
    weights:    [T, K], the combine weights (gradient flows to the router through these).
    probs:      [T, E], softmax of the logits over all experts (float32; used by the load-balance loss).
    logits:     [T, E], the raw router logits (z-loss).
    metrics:    dict of scalars/arrays for logging (e.g. 'router_grad_fraction').
    """

    expert_ids: jax.Array
    weights: jax.Array
    probs: jax.Array
    logits: jax.Array
    metrics: dict


def _check_top_k(top_k: int, num_experts: int) -> None:
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} is invalid: accepted values are integers 1..num_experts={num_experts}")


def sparsemixer_v2_router(
    logits_TE, *, top_k, training, rng=None, jitter_eps: float = 0.01, gumbel_KTE=None, uniform_KT=None
) -> Routing:
    """GRIN's SparseMixer-v2 (see sparsemixer.py). Metric 'router_grad_fraction': the fraction of tokens
    whose router receives a task-loss gradient (some slot has >= 2 candidates with nonzero probability;
    training only)."""
    if jitter_eps < 0:
        raise ValueError(f"jitter_eps={jitter_eps!r} is invalid: accepted values are >= 0")
    ids_TK, weights_TK, candidates_KT = _sparsemixer.sparsemixer_v2(
        logits_TE, top_k=top_k, jitter_eps=jitter_eps, training=training, rng=rng,
        gumbel_KTE=gumbel_KTE, uniform_KT=uniform_KT,
    )
    has_grad_T = jnp.any(candidates_KT >= 2, axis=0)
    metrics = {
        "router_grad_fraction": jnp.mean(has_grad_T.astype(jnp.float32)) if training else jnp.float32(0.0),
        "mean_candidates": jnp.mean(candidates_KT.astype(jnp.float32)),
    }
    probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    return Routing(ids_TK, weights_TK, probs_TE, logits_TE, metrics)


def topk_softmax_router(logits_TE, *, top_k, training, rng=None, renormalize: bool = True) -> Routing:
    """GShard / Mixtral baseline: softmax over all experts, keep the top k, renormalise (optional).
    k = 1 without renormalisation is Switch. Ordinary autodiff; deterministic (training ignored)."""
    del training, rng
    probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    top_probs_TK, ids_TK = jax.lax.top_k(probs_TE, top_k)
    if renormalize and top_k == 1:
        # p / p == 1 exactly; autodiff of the quotient would send rounding noise (~1e-7) to the router.
        top_probs_TK = jnp.ones_like(top_probs_TK)
    elif renormalize:
        top_probs_TK = top_probs_TK / jnp.sum(top_probs_TK, axis=-1, keepdims=True)
    weights_TK = top_probs_TK.astype(logits_TE.dtype)
    # Every token's router gets gradient, except top-1 renormalised (its weight is identically 1).
    metrics = {"router_grad_fraction": jnp.float32(0.0 if (renormalize and top_k == 1) else 1.0)}
    return Routing(ids_TK.astype(jnp.int32), weights_TK, probs_TE, logits_TE, metrics)


ROUTERS: dict[str, Callable[..., Routing]] = {
    "sparsemixer_v2": sparsemixer_v2_router,
    "topk_softmax": topk_softmax_router,
}


def route(name: str, logits_TE: jax.Array, *, top_k: int, training: bool, rng=None, **options: Any) -> Routing:
    """Route with the router registered as `name` (see ROUTERS)."""
    if name not in ROUTERS:
        raise ValueError(f"router={name!r} is unknown: accepted values are {sorted(ROUTERS)}")
    if logits_TE.ndim != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {logits_TE.shape}")
    _check_top_k(top_k, logits_TE.shape[-1])
    return ROUTERS[name](logits_TE, top_k=top_k, training=training, rng=rng, **options)

