"""Expert-choice routing grouped by position across sequences (Krajewski et al.; docs/fine_grained.md).

Axes: B batch, S sequence, T = B*S tokens, D model, E experts, C tokens each expert takes per group.

A group is the batch at one position s (the B tokens x[:, s]), so no token's routing depends on later positions
(causal). Per group: router probabilities softmax over experts [B, E]; each expert takes the C tokens with the
highest probability in its column, C = ceil(capacity_factor * B * top_k / E) (top_k = the mean number of experts per
token, G in the fine-grained parametrisation, so C = B / expansion_rate at capacity 1). A token's output is the sum
over the experts that took it of prob * Expert(x); a token no expert took gets 0 (metric 'dropped_fraction':
the fraction of tokens with no expert). Load is balanced by construction (every expert takes exactly C tokens).

The router is registered as 'expert_choice' (dispatch 'expert_choice'); `expert_choice_dispatch` is its dispatcher
(moe/layer.py). On a mesh the groups span the data shards (the batch is sharded): the layer gathers the batch, see
`moe/layer.py`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from grin_jax.moe import experts as _experts
from grin_jax.moe import routing as _routing


@dataclasses.dataclass(frozen=True)
class ExpertChoiceOptions:
    """capacity_factor: C = ceil(capacity_factor * B * top_k / E) tokens per expert and group (1.0: on average
    top_k experts per token)."""

    capacity_factor: float = 1.0

    def __post_init__(self):
        value = self.capacity_factor
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"router_options.capacity_factor={value!r} is invalid: accepted values are finite "
                             "numbers > 0")


def tokens_per_expert(batch: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C: how many tokens of a group (the batch at one position) each expert takes."""
    return max(1, min(batch, math.ceil(capacity_factor * batch * top_k / num_experts)))


def expert_choice_router(logits_SBE, *, options, top_k, training, noise=None) -> _routing.Routing:
    """logits [S, B, E] (grouped by position) -> Routing(expert_ids = token_SEC: the batch index each expert took,
    weights_SEC, probs [S*B, E], logits [S*B, E]). Deterministic."""
    del training, noise
    if logits_SBE.ndim != 3:
        raise ValueError(f"expert choice needs logits grouped as [seq, batch, experts], got shape {logits_SBE.shape}")
    seq, batch, num_experts = logits_SBE.shape
    capacity = tokens_per_expert(batch, num_experts, top_k, options.capacity_factor)
    probs_SBE = jax.nn.softmax(logits_SBE.astype(jnp.float32), axis=-1)
    weights_SEC, token_SEC = jax.lax.top_k(jnp.swapaxes(probs_SBE, 1, 2), capacity)  # per expert column
    taken_SB = jax.vmap(lambda t_EC: jnp.zeros((batch,), jnp.int32).at[t_EC.reshape(-1)].add(1))(token_SEC)
    metrics = {
        "router_grad_fraction": jnp.mean((taken_SB > 0).astype(jnp.float32)),
        "dropped_fraction": jnp.mean((taken_SB == 0).astype(jnp.float32)),
        "mean_experts_per_token": jnp.mean(taken_SB.astype(jnp.float32)),
    }
    return _routing.Routing(token_SEC.astype(jnp.int32), weights_SEC, probs_SBE.reshape(seq * batch, num_experts),
                            logits_SBE.reshape(seq * batch, num_experts), metrics)


def expert_choice_dispatch(expert_params: dict, x_SBD: jax.Array, routing: _routing.Routing, *,
                           activation: str) -> jax.Array:
    """y [S, B, D] = sum over the experts that took each token of weight * Expert(x) (batched matmul over the
    [E, S*C, D] buffer: every expert has exactly C rows per group, nothing to sort)."""
    token_SEC, weights_SEC = routing.expert_ids, routing.weights
    seq, batch, d_model = x_SBD.shape
    num_experts, capacity = token_SEC.shape[1], token_SEC.shape[2]
    x_SECD = jax.vmap(lambda x_BD, t_EC: x_BD[t_EC])(x_SBD, token_SEC)
    x_ESCD = jnp.moveaxis(x_SECD, 1, 0).reshape(num_experts, seq * capacity, d_model)
    y_ESCD = _experts.apply_experts_batched(expert_params, x_ESCD, activation=activation)
    y_SECD = jnp.moveaxis(y_ESCD.reshape(num_experts, seq, capacity, d_model), 0, 1)
    y_SECD = y_SECD * weights_SEC[..., None].astype(y_SECD.dtype)

    def combine(y_ECD, t_EC):
        return jnp.zeros((batch, d_model), y_ECD.dtype).at[t_EC.reshape(-1)].add(y_ECD.reshape(-1, d_model))

    return jax.vmap(combine)(y_SECD, token_SEC)


_routing.register_router("expert_choice", _routing.RouterSpec(ExpertChoiceOptions, expert_choice_router,
                                                              dispatch="expert_choice"))
