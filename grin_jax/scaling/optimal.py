"""Compute-optimal fine-grained MoE allocation (Krajewski et al. §5; docs/fine_grained.md#compute-optimal-allocation).

For a FLOP budget F, fixed expansion rate E (64 in the paper) and each granularity G in powers of two:
the model shape follows ``d_model = 64·n_blocks``, so N = d²(8E+4)·d/64 is a function of d_model alone and the
tokens follow from the budget, D = F / ((12·d²·c_f + d·E·G·c_r)·n_blocks). The law L(N(d), D(d, G), G) is then a
1-D function of d_model, minimised with Brent's bounded method (``scipy.optimize.minimize_scalar``, over
log d_model); the best G wins. d_model and n_blocks are continuous here, as in the paper.

With the rounded published coefficients this reproduces the paper's Table 2 (G exactly, D within ~2.2 %,
predicted loss within ~0.8 %); see tests/test_scaling.py.

Command::

    python -m grin_jax.scaling.optimal --flops 2.95e18 1.93e20 1.41e21 [--json] \
        [--coefficients coeffs.json] [--expansion 64] [--granularities 1 2 4 ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import warnings
from typing import Sequence

from scipy.optimize import minimize_scalar

from grin_jax.scaling import flops as fl
from grin_jax.scaling.law import PAPER_MOE_E64, Coefficients, from_json, loss

__all__ = [
    "DEFAULT_GRANULARITIES",
    "Allocation",
    "optimal_for_granularity",
    "scan_granularities",
    "compute_optimal",
    "format_table",
    "main",
]

DEFAULT_GRANULARITIES = tuple(2**i for i in range(0, 9))  # 1 .. 256
_LOG_D_BOUNDS = (math.log(1.0), math.log(1e8))


@dataclasses.dataclass(frozen=True)
class Allocation:
    """A compute-optimal (for its G) model: shape, tokens and predicted loss for a FLOP budget."""

    flops: float            # the budget (the allocation spends exactly this, by construction of D)
    granularity: int
    expansion_rate: float
    d_model: float
    n_blocks: float
    params: float           # total non-embedding N = d²(8E+4)·n_blocks (what the law takes)
    active_params: float    # 12·d²·n_blocks
    tokens: float           # D
    loss: float             # predicted by the law
    at_bound: bool = False  # the 1-D search ended at its d_model bound (result not an interior optimum)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_budget(budget) -> float:
    try:
        F = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"flops={budget!r}: expected a positive number") from None
    if not (math.isfinite(F) and F > 0):
        raise ValueError(f"flops={budget!r}: expected a positive finite number")
    return F


def _check_g(G) -> int:
    if isinstance(G, bool) or not float(G).is_integer() or G < 1:
        raise ValueError(f"granularities: {G!r} is not an integer >= 1")
    return int(G)


def optimal_for_granularity(
    budget: float,
    granularity: int,
    coeffs: Coefficients = PAPER_MOE_E64,
    *,
    expansion_rate: float = 64,
    aspect: float = 64.0,
    c_f: float = fl.C_F,
    c_r: float = fl.C_R,
) -> Allocation:
    """Best d_model (Brent, bounded, in log d_model) for one granularity under the FLOP budget."""
    F = _check_budget(budget)
    G = _check_g(granularity)
    if not (expansion_rate > 0 and math.isfinite(expansion_rate)):
        raise ValueError(f"expansion_rate={expansion_rate!r}: expected a positive number")
    if not (aspect > 0 and math.isfinite(aspect)):
        raise ValueError(f"aspect={aspect!r}: expected a positive number (d_model / n_blocks)")
    E = float(expansion_rate)

    def shape(log_d):
        d = math.exp(log_d)
        n = d / aspect
        N = d * d * (8.0 * E + 4.0) * n
        D = F / ((12.0 * d * d * c_f + d * E * G * c_r) * n)
        return d, n, N, D

    def objective(log_d):
        _, _, N, D = shape(log_d)
        return loss(N, D, G, coeffs)

    lo, hi = _LOG_D_BOUNDS
    res = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-9, "maxiter": 500})
    d, n, N, D = shape(float(res.x))
    at_bound = bool(min(res.x - lo, hi - res.x) < 1e-4)
    return Allocation(
        flops=F,
        granularity=G,
        expansion_rate=E,
        d_model=d,
        n_blocks=n,
        params=N,
        active_params=12.0 * d * d * n,
        tokens=D,
        loss=float(res.fun),
        at_bound=at_bound,
    )


def scan_granularities(
    budget: float,
    coeffs: Coefficients = PAPER_MOE_E64,
    *,
    granularities: Sequence[int] = DEFAULT_GRANULARITIES,
    **kw,
) -> list[Allocation]:
    """``optimal_for_granularity`` for every G (the per-G optima; the compute-optimal one is the min-loss entry)."""
    if len(granularities) == 0:
        raise ValueError("granularities: expected at least one granularity")
    return [optimal_for_granularity(budget, G, coeffs, **kw) for G in granularities]


def compute_optimal(
    budget: float,
    coeffs: Coefficients = PAPER_MOE_E64,
    *,
    granularities: Sequence[int] = DEFAULT_GRANULARITIES,
    **kw,
) -> Allocation:
    """The compute-optimal (G, d_model, n_blocks, N, D) for a FLOP budget under the law ``coeffs``.

    Keyword args: ``expansion_rate`` (64), ``aspect`` (d_model / n_blocks, 64), ``c_f`` (6), ``c_r`` (14).
    Warns if the winning granularity is the largest one tried or its search ended at a d_model bound.
    """
    return _best(scan_granularities(budget, coeffs, granularities=granularities, **kw))


def _best(scan: Sequence[Allocation]) -> Allocation:
    best = min(scan, key=lambda a: a.loss)
    budget = best.flops
    if best.at_bound:
        warnings.warn(f"compute_optimal(flops={budget:g}): d_model search hit its bound", RuntimeWarning)
    if len(scan) > 1 and best.granularity == max(a.granularity for a in scan):
        warnings.warn(
            f"compute_optimal(flops={budget:g}): the best granularity is the largest tried "
            f"(G={best.granularity}); widen `granularities`",
            RuntimeWarning,
        )
    return best


def _human(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            v = x / scale
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{x:.3g}"


def format_table(allocs: Sequence[Allocation]) -> str:
    """A table like the paper's Table 2: N (as E x active), active N, D, G, FLOPs, predicted loss, shape."""
    header = ("N (E x active)", "active N", "N total", "D", "G", "FLOPs", "loss", "d_model", "n_blocks")
    rows = []
    for a in allocs:
        E = a.expansion_rate
        e_str = f"{E:g}"
        rows.append(
            (
                f"{e_str} x {_human(a.active_params)}",
                _human(a.active_params),
                _human(a.params),
                _human(a.tokens),
                str(a.granularity),
                f"{a.flops:.3g}",
                f"{a.loss:.3f}",
                f"{a.d_model:.0f}",
                f"{a.n_blocks:.1f}",
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m grin_jax.scaling.optimal",
        description="Compute-optimal fine-grained MoE allocation (Krajewski et al. Table 2).",
    )
    p.add_argument("--flops", type=float, nargs="+", required=True, help="FLOP budget(s), e.g. 2.95e18 1.93e20")
    p.add_argument("--coefficients", default=None, help="coefficients JSON (fit output); default: paper E=64")
    p.add_argument("--expansion", type=float, default=64.0, help="expansion rate E (default 64)")
    p.add_argument("--aspect", type=float, default=64.0, help="d_model / n_blocks (default 64)")
    p.add_argument("--granularities", type=int, nargs="+", default=list(DEFAULT_GRANULARITIES))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> list[Allocation]:
    args = _parser().parse_args(argv)
    if not (math.isfinite(args.expansion) and args.expansion > 0):
        raise ValueError(f"--expansion={args.expansion!r}: expected a positive expansion rate E")
    if not (math.isfinite(args.aspect) and args.aspect > 0):
        raise ValueError(f"--aspect={args.aspect!r}: expected a positive d_model / n_blocks ratio")
    bad = [g for g in args.granularities if g < 1]
    if bad:
        raise ValueError(f"--granularities: {bad} are not integers >= 1")
    for F in args.flops:
        if not (math.isfinite(F) and F > 0):
            raise ValueError(f"--flops={F!r}: expected positive FLOP budgets")
    coeffs = from_json(args.coefficients) if args.coefficients else PAPER_MOE_E64
    allocs = []
    per_g = []
    for F in args.flops:
        scan = scan_granularities(
            F, coeffs, granularities=args.granularities, expansion_rate=args.expansion, aspect=args.aspect
        )
        allocs.append(_best(scan))
        per_g.append({str(a.granularity): a.loss for a in scan})
    if args.json:
        out = {
            "coefficients": coeffs.to_dict(),
            "allocations": [dict(a.to_dict(), loss_by_granularity=lg) for a, lg in zip(allocs, per_g)],
        }
        print(json.dumps(out, indent=2))
    else:
        print(f"coefficients: {coeffs.to_dict()}  (E = {args.expansion:g}, d_model = {args.aspect:g}·n_blocks)")
        print(format_table(allocs))
    return allocs


if __name__ == "__main__":  # pragma: no cover
    from grin_jax.cli import run_main
    sys.exit(run_main(main, sys.argv[1:]))  # a user error: one line (GRIN_JAX_DEBUG=1 for the traceback)
