"""Parameter and FLOP accounting for fine-grained MoE (Krajewski et al.; docs/fine_grained.md#flop-accounting).

Model of one transformer block with model width d (``d_model``):
  attention                      4·d²          (Q, K, V, O projections)
  dense FFN (width 4d)           8·d²
  MoE with expansion rate E      8·E·d²        (E·G experts of width 4d/G, each 2·d·(4d/G) params)
  router                         d·E·G         (one logit per expert; not counted in N, as in the paper)

So (non-embedding, router excluded):
  N_total  = d²·(8E + 4)·n_blocks                                       ``param_count``
  N_active = d²·(8 + 4)·n_blocks = 12·d²·n_blocks  (G experts of width 4d/G are active, independent of G)

FLOPs (our reading of the paper's ``F = (12·d_model²·c_f + d_model·E·G·c_r)·D·n_blocks``): the bracket is the
cost of **one token through one block**: ``c_f = 6`` FLOPs (forward + backward) per active parameter per token
over the 12·d² active parameters, plus ``c_r = 14`` FLOPs per router parameter per token over the d·E·G router
parameters (6 for the router matmul forward + backward, 8 for routing tokens and gradients). Multiplying by D
training tokens and n_blocks gives the total training cost. This reading reproduces the paper's Table 2:
e.g. 12·d²·n_blocks = 100M, d = 64·n_blocks, E = 64, G = 8, D = 4.37B gives 2.94e18 (table: 2.95e18), and
the router term is needed (without it: 2.62e18).

Everything here accepts floats / numpy arrays (the compute-optimal search treats d_model and n_blocks as
continuous); ``fine_grained`` is the integer helper that turns (d_model, E, G) into a layer configuration.
"""
from __future__ import annotations

import dataclasses
from numbers import Integral, Real

import numpy as np

__all__ = [
    "C_F",
    "C_R",
    "param_count",
    "active_param_count",
    "router_param_count",
    "flops_per_token",
    "flops",
    "tokens_for_budget",
    "d_model_from_params",
    "FineGrained",
    "fine_grained",
]

C_F = 6.0   # FLOPs per active parameter per token, forward + backward
C_R = 14.0  # FLOPs per router parameter per token: 6 (router matmul) + 8 (routing tokens and gradients)


def _pos(name: str, x) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name}: expected finite values > 0, got {x!r}")
    return arr


def _ret(x):
    return float(x) if np.ndim(x) == 0 else x


def param_count(d_model, n_blocks, expansion_rate=64):
    """Total non-embedding parameters ``d_model²·(8E + 4)·n_blocks`` (the N of the scaling law)."""
    d = _pos("d_model", d_model)
    n = _pos("n_blocks", n_blocks)
    e = _pos("expansion_rate", expansion_rate)
    return _ret(d**2 * (8.0 * e + 4.0) * n)


def active_param_count(d_model, n_blocks):
    """Active non-embedding parameters per token ``12·d_model²·n_blocks`` (attention + G experts of width 4d/G)."""
    d = _pos("d_model", d_model)
    n = _pos("n_blocks", n_blocks)
    return _ret(12.0 * d**2 * n)


def router_param_count(d_model, n_blocks, expansion_rate, granularity):
    """Router parameters ``d_model·E·G·n_blocks`` (one logit per expert per block)."""
    d = _pos("d_model", d_model)
    n = _pos("n_blocks", n_blocks)
    e = _pos("expansion_rate", expansion_rate)
    g = _pos("granularity", granularity)
    return _ret(d * e * g * n)


def flops_per_token(d_model, n_blocks, expansion_rate, granularity, *, c_f=C_F, c_r=C_R):
    """Training FLOPs per token: ``(12·d²·c_f + d·E·G·c_r)·n_blocks``."""
    d = _pos("d_model", d_model)
    n = _pos("n_blocks", n_blocks)
    e = _pos("expansion_rate", expansion_rate)
    g = _pos("granularity", granularity)
    c_f = _pos("c_f", c_f)
    c_r = np.asarray(c_r, dtype=np.float64)
    if np.any(c_r < 0):
        raise ValueError(f"c_r: expected >= 0, got {c_r!r}")
    return _ret((12.0 * d**2 * c_f + d * e * g * c_r) * n)


def flops(d_model, n_blocks, expansion_rate, granularity, tokens, *, c_f=C_F, c_r=C_R):
    """Total training FLOPs ``F = (12·d²·c_f + d·E·G·c_r)·D·n_blocks`` for D = ``tokens``."""
    D = _pos("tokens", tokens)
    return _ret(flops_per_token(d_model, n_blocks, expansion_rate, granularity, c_f=c_f, c_r=c_r) * D)


def tokens_for_budget(budget, d_model, n_blocks, expansion_rate, granularity, *, c_f=C_F, c_r=C_R):
    """Training tokens D that spend ``budget`` FLOPs: ``F / ((12·d²·c_f + d·E·G·c_r)·n_blocks)``."""
    F = _pos("flops", budget)
    return _ret(F / flops_per_token(d_model, n_blocks, expansion_rate, granularity, c_f=c_f, c_r=c_r))


def d_model_from_params(N, expansion_rate=64, aspect=64.0):
    """Invert ``N = d²(8E+4)·n_blocks`` with ``d_model = aspect·n_blocks``: ``d = (aspect·N/(8E+4))^(1/3)``.

    Returns (d_model, n_blocks) as floats/arrays; used to estimate FLOPs for tables that only give N.
    """
    N = _pos("N", N)
    e = _pos("expansion_rate", expansion_rate)
    aspect = float(_pos("aspect", aspect))
    d = np.cbrt(aspect * N / (8.0 * e + 4.0))
    return _ret(d), _ret(d / aspect)


@dataclasses.dataclass(frozen=True)
class FineGrained:
    """A fine-grained MoE layer: ``num_experts = E·G`` experts of width ``4·d_model/G``, ``top_k = G``."""

    d_model: int
    expansion_rate: float
    granularity: int
    num_experts: int
    expert_width: int
    top_k: int

    @property
    def d_ff(self) -> int:
        """Width of the dense FFN the experts are cut from (4·d_model)."""
        return 4 * self.d_model

    def param_count(self, n_blocks: int) -> int:
        """Total non-embedding parameters of n_blocks such blocks (router excluded)."""
        return int(self.d_model**2 * (8 * self.expansion_rate + 4) * n_blocks)

    def active_param_count(self, n_blocks: int) -> int:
        return int(12 * self.d_model**2 * n_blocks)


def _as_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    if isinstance(value, Integral):
        iv = int(value)
    elif float(value).is_integer():
        iv = int(value)
    else:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    if iv < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    return iv


def fine_grained(d_model, expansion_rate, granularity) -> FineGrained:
    """(d_model, E, G) -> layer configuration: E·G experts of width 4·d_model/G, each token routed to G.

    Raises ValueError naming the argument when a value is not a positive integer or G does not divide 4·d_model.
    ``expansion_rate`` may be fractional (e.g. 0.5) as long as E·G is an integer number of experts.
    """
    from grin_jax.moe.layer import fine_grained_shape  # the one derivation, shared with MoEConfig

    d_model = _as_int("d_model", d_model)
    granularity = _as_int("granularity", granularity)
    shape = fine_grained_shape(4 * d_model, expansion_rate, granularity)
    return FineGrained(
        d_model=d_model,
        expansion_rate=expansion_rate,
        granularity=granularity,
        num_experts=shape["num_experts"],
        expert_width=shape["d_hidden"],
        top_k=shape["top_k"],
    )
