"""Routers: router logits -> a `Routing` pytree. One registry entry per router; nothing outside a router's own
entry knows its name, its options or its noise.

Axes: T tokens, E experts, K slots per token, B batch, S sequence, C tokens an expert takes per group.

A router is a `RouterSpec` registered under a name (`register_router`):
  options   a frozen dataclass of the router's own settings, validated in its __post_init__ (config:
            `model.moe.router_options`; unknown keys are rejected naming the router's accepted keys).
  draw      (rng, options, *, num_tokens, num_experts, top_k, dtype) -> {name: array with the TOKEN AXIS FIRST}
            the router's random draws for T tokens, or None for a deterministic router. Drawn on the global token
            axis by the layer, so a sharded layer splits every array along axis 0 and any mesh gives one device's
            numbers.
  route     (logits, *, options, top_k, training, noise) -> Routing, where noise is what `draw` returned (or the
            caller's explicit arrays; None in eval).
  dispatch  which dispatcher consumes the Routing (moe/layer.py `DISPATCHERS`): 'token_choice' (each token picks
            K experts: expert_ids / weights [T, K], dropless or capacity backends) or 'expert_choice' (each expert
            picks C tokens of every group; logits arrive grouped as [S, B, E], see expert_choice.py).

The router matmul itself (x @ w_router) stays outside: routers only see logits. A new router is one module that
defines its options, route (and draw) and calls `register_router`; see tests/test_seam.py for one written inside a
test file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from grin_jax.moe import sparsemixer as _sparsemixer


class Routing(NamedTuple):
    """What a router decided.

    token_choice:   expert_ids [T, K] int32 (the expert of each token-slot), weights [T, K] (combine weights; the
                    router's gradient flows through them).
    expert_choice:  expert_ids [S, E, C] int32 (the batch index each expert took in group s), weights [S, E, C].
    probs:   [T, E] float32 softmax of the logits over all experts (load-balance loss, entropy).
    logits:  [T, E] raw router logits (z-loss).
    metrics: router-specific scalars for logging (e.g. 'router_grad_fraction').
    """

    expert_ids: jax.Array
    weights: jax.Array
    probs: jax.Array
    logits: jax.Array
    metrics: dict


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A router without options."""


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    options: type
    route: Callable[..., Routing]
    draw: Callable[..., dict] | None = None
    dispatch: str = "token_choice"


ROUTERS: dict[str, RouterSpec] = {}
DISPATCH_KINDS = ("token_choice", "expert_choice")


def register_router(name: str, spec: RouterSpec) -> RouterSpec:
    """Register `spec` under `name` (replacing an earlier entry of that name)."""
    if spec.dispatch not in DISPATCH_KINDS:
        raise ValueError(f"router {name!r}: dispatch={spec.dispatch!r} is unknown: accepted values are "
                         f"{list(DISPATCH_KINDS)}")
    ROUTERS[name] = spec
    return spec


def get_router(name: str) -> RouterSpec:
    if name not in ROUTERS:
        raise ValueError(f"router={name!r} is unknown: accepted values are {sorted(ROUTERS)}")
    return ROUTERS[name]


def make_options(name: str, values: Any = None):
    """The router's options dataclass from a mapping (None = defaults) or an instance; unknown keys raise naming
    the router and its accepted keys; the dataclass validates its own values."""
    spec = get_router(name)
    if isinstance(values, spec.options):
        return values
    values = dict(values or {})
    known = [f.name for f in dataclasses.fields(spec.options)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"router_options {unknown} are unknown for router={name!r}: accepted keys are {known}")
    return spec.options(**values)


def _check_top_k(top_k: int, num_experts: int) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} is invalid: accepted values are integers 1..num_experts={num_experts}")


def _non_negative(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{owner}.{name}={value!r} is invalid: accepted values are finite numbers >= 0")


# ----------------------------------------------------------------------------------------- SparseMixer-v2
@dataclasses.dataclass(frozen=True)
class SparseMixerOptions:
    """jitter_eps: the mask's eps (GRIN: 0.01); expert i is a candidate when (z* - z_i) / max(|z_i|, z*) <= 2 eps
    (docs/sparsemixer.md)."""

    jitter_eps: float = 0.01

    def __post_init__(self):
        _non_negative("router_options", "jitter_eps", self.jitter_eps)


def sparsemixer_v2_draw(rng, options, *, num_tokens, num_experts, top_k, dtype):
    """{'gumbel_TKE': [T, K, E] Gumbel(0, 1), 'uniform_TK': [T, K] U(0, 1)} (drawn as [K, T, ...] and
    transposed, so the values equal sparsemixer_v2's own draws from the same key)."""
    del options
    key_g, key_u = jax.random.split(rng)
    gumbel_KTE = jax.random.gumbel(key_g, (top_k, num_tokens, num_experts), dtype)
    uniform_KT = jax.random.uniform(key_u, (top_k, num_tokens), dtype)
    return {"gumbel_TKE": jnp.swapaxes(gumbel_KTE, 0, 1), "uniform_TK": uniform_KT.T}


def sparsemixer_v2_router(logits_TE, *, options, top_k, training, noise=None) -> Routing:
    """GRIN's SparseMixer-v2 (sparsemixer.py). Metric 'router_grad_fraction': the fraction of tokens whose router
    receives a task-loss gradient (some slot has >= 2 candidates with nonzero probability; training only)."""
    noise = noise or {}
    gumbel = noise.get("gumbel_TKE")
    uniform = noise.get("uniform_TK")
    if training and (gumbel is None or uniform is None):
        raise ValueError("sparsemixer_v2: training needs its noise {'gumbel_TKE', 'uniform_TK'} (layer rng)")
    ids_TK, weights_TK, candidates_KT = _sparsemixer.sparsemixer_v2(
        logits_TE, top_k=top_k, jitter_eps=options.jitter_eps, training=training,
        gumbel_KTE=None if gumbel is None else jnp.swapaxes(gumbel, 0, 1),
        uniform_KT=None if uniform is None else uniform.T)
    has_grad_T = jnp.any(candidates_KT >= 2, axis=0)
    metrics = {
        "router_grad_fraction": jnp.mean(has_grad_T.astype(jnp.float32)) if training else jnp.float32(0.0),
        "mean_candidates": jnp.mean(candidates_KT.astype(jnp.float32)),
    }
    probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    return Routing(ids_TK, weights_TK, probs_TE, logits_TE, metrics)


# ------------------------------------------------------------------------------------------ top-k softmax
@dataclasses.dataclass(frozen=True)
class TopKSoftmaxOptions:
    """renormalize: divide the kept top-k probabilities by their sum (Mixtral / GShard); k = 1 without it is
    Switch."""

    renormalize: bool = True

    def __post_init__(self):
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"router_options.renormalize={self.renormalize!r} is invalid: accepted values are "
                             "True or False")


def topk_softmax_router(logits_TE, *, options, top_k, training, noise=None) -> Routing:
    """GShard / Mixtral baseline: softmax over all experts, keep the top k, renormalise (optional).
    Ordinary autodiff; deterministic (training and noise ignored)."""
    del training, noise
    probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    top_probs_TK, ids_TK = jax.lax.top_k(probs_TE, top_k)
    if options.renormalize and top_k == 1:
        # p / p == 1 exactly; autodiff of the quotient would send rounding noise (~1e-7) to the router.
        top_probs_TK = jnp.ones_like(top_probs_TK)
    elif options.renormalize:
        top_probs_TK = top_probs_TK / jnp.sum(top_probs_TK, axis=-1, keepdims=True)
    weights_TK = top_probs_TK.astype(logits_TE.dtype)
    # Every token's router gets gradient, except top-1 renormalised (its weight is identically 1).
    metrics = {"router_grad_fraction": jnp.float32(0.0 if (options.renormalize and top_k == 1) else 1.0)}
    return Routing(ids_TK.astype(jnp.int32), weights_TK, probs_TE, logits_TE, metrics)


register_router("sparsemixer_v2", RouterSpec(SparseMixerOptions, sparsemixer_v2_router, sparsemixer_v2_draw))
register_router("topk_softmax", RouterSpec(TopKSoftmaxOptions, topk_softmax_router))


def draw(name: str, rng, options, *, num_tokens: int, num_experts: int, top_k: int, dtype=jnp.float32) -> dict:
    """The router's training noise for `num_tokens` tokens ({} for a deterministic router)."""
    spec = get_router(name)
    if spec.draw is None:
        return {}
    return spec.draw(rng, options, num_tokens=num_tokens, num_experts=num_experts, top_k=top_k, dtype=dtype)


def route(name: str, logits: jax.Array, *, top_k: int, training: bool, options=None, noise: dict | None = None,
          rng=None) -> Routing:
    """Route with the router registered as `name`. Token-choice routers take logits [T, E]. In training, a noisy
    router needs `noise` (from `draw`) or `rng` (then drawn here)."""
    spec = get_router(name)
    options = make_options(name, options)
    _check_top_k(top_k, logits.shape[-1])
    if spec.dispatch == "token_choice" and logits.ndim != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {logits.shape}")
    if training and noise is None and rng is not None and spec.draw is not None:
        noise = spec.draw(rng, options, num_tokens=logits.shape[0], num_experts=logits.shape[-1], top_k=top_k,
                          dtype=logits.dtype)
    return spec.route(logits, options=options, top_k=top_k, training=training, noise=noise)
