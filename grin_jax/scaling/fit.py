"""Fitting the fine-grained MoE scaling law the way Krajewski et al. do (docs/fine_grained.md#fitting-the-law).

Parameters are optimised in "raw" log space,
    θ = (log a, α, log b, β, log g, γ [, log c])          (MoE law; the dense law drops log g, γ)
and the prediction is made in log space with logsumexp, so every term stays positive:
    log L̂ = logsumexp( log c,  s − α·log N,  log b − β·log D ),   s = logsumexp(log g − γ·log G, log a)
          = log( c + (g/G^γ + a)/N^α + b/D^β ).
Objective: Σ_i Huber_δ(log L_i − log L̂_i) + λ·‖θ‖²  with δ = 0.1 and a small L2 weight decay λ on the raw
parameters (log c is not decayed when c is fixed, since it is not a parameter then). Minimised with BFGS
(scipy.optimize.minimize, analytic gradient). Restarts: the objective is evaluated on a grid of initial
points (``init_grid``), BFGS is run from the ``n_starts`` best grid points, and the best optimum is kept.
c is fixed (default 0.47, as in the paper) or free (``c=None``).

Bootstrap: rows are resampled with replacement, the law is refitted (warm-started from the point estimate and
the best grid inits), and percentile intervals are reported.

Command::

    python -m grin_jax.scaling.fit --table results.csv --out coeffs.json [--plots DIR]
    python -m grin_jax.scaling.fit --sweep DIR --where model.layout=moe --out coeffs.json   # DIR/results.csv

The CSV needs columns N, D, G, loss (N = total non-embedding params, D = training tokens, G = granularity);
``--law dense`` fits ``c + a/N^α + b/D^β`` and ignores G.

Row selection is explicit: ``--where COLUMN=VALUE`` (or ``COLUMN!=VALUE``; repeatable, all must hold) keeps the rows
whose COLUMN (any column of the table, e.g. the sweep's ``model.layout``, ``model.moe.granularity``,
``train.seed``) equals VALUE (as text, or as numbers: 4 matches 4.0). Rows of a ``status`` column other than
``done`` (the sweep runner's failed / pending trials) are always dropped. A table whose rows mix FFN kinds
(``model.layout``, or ``model.ffn`` in older sweeps) is refused unless a --where names that column: a dense row
would otherwise be read as G = 1. What was dropped, and why, is printed (stderr) and recorded under
``selection`` in the output JSON. An optional ``flops`` column is used for the
loss-vs-FLOPs plot; without it FLOPs are estimated from the paper parametrisation (E = ``--expansion``,
d_model = 64·n_blocks).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import sys
from numbers import Integral, Real
from typing import Sequence

import numpy as np
from scipy.optimize import minimize

from grin_jax.scaling.law import Coefficients, to_json

__all__ = [
    "DEFAULT_C",
    "DEFAULT_DELTA",
    "DEFAULT_WEIGHT_DECAY",
    "FitResult",
    "Bootstrap",
    "default_init_grid",
    "fit_law",
    "fit_dense",
    "bootstrap",
    "read_table",
    "read_selected",
    "parse_where",
    "main",
]

DEFAULT_C = 0.47
DEFAULT_DELTA = 0.1
DEFAULT_WEIGHT_DECAY = 1e-6


# ----------------------------------------------------------------------------------------------------------
# parametrisation


def _names(dense: bool, free_c: bool) -> list[str]:
    names = ["log_a", "alpha", "log_b", "beta"] + ([] if dense else ["log_g", "gamma"])
    return names + (["log_c"] if free_c else [])


def _theta_to_coeffs(theta: np.ndarray, dense: bool, c_fixed: float | None) -> Coefficients:
    th = dict(zip(_names(dense, c_fixed is None), map(float, theta)))
    return Coefficients(
        a=math.exp(th["log_a"]),
        alpha=th["alpha"],
        b=math.exp(th["log_b"]),
        beta=th["beta"],
        g=0.0 if dense else math.exp(th["log_g"]),
        gamma=0.0 if dense else th["gamma"],
        c=math.exp(th["log_c"]) if c_fixed is None else c_fixed,
    )


def _coeffs_to_theta(k: Coefficients, dense: bool, free_c: bool) -> np.ndarray:
    tiny = 1e-300
    vals = {
        "log_a": math.log(max(k.a, tiny)),
        "alpha": k.alpha,
        "log_b": math.log(max(k.b, tiny)),
        "beta": k.beta,
        "log_g": math.log(max(k.g, tiny)),
        "gamma": k.gamma,
        "log_c": math.log(max(k.c, tiny)),
    }
    return np.array([vals[n] for n in _names(dense, free_c)])


def default_init_grid(dense: bool = False, free_c: bool = False) -> np.ndarray:
    """The grid of initial points [K, P] (in raw parameter space) the restarts are chosen from."""
    axes = {
        "log_a": [0.0, 2.0, 4.0, 6.0],
        "alpha": [0.05, 0.15, 0.3, 0.5],
        "log_b": [0.0, 2.0, 4.0, 6.0],
        "beta": [0.05, 0.15, 0.3, 0.5],
        "log_g": [-1.0, 1.0, 3.0],
        "gamma": [0.25, 0.6, 1.0],
        "log_c": [math.log(0.2), math.log(0.5), math.log(1.0), math.log(2.0)],
    }
    names = _names(dense, free_c)
    return np.array(list(itertools.product(*(axes[n] for n in names))), dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# objective


def _predict_log(theta: np.ndarray, logN, logD, logG, dense: bool, log_c_fixed: float | None):
    """log L̂ for parameters theta [..., P] (broadcast against the data [M]); also returns the pieces for grads."""
    th = np.moveaxis(np.asarray(theta), -1, 0)[..., None]  # [P, ..., 1]
    log_a, alpha, log_b, beta = th[0], th[1], th[2], th[3]
    i = 4
    if dense:
        s = log_a
        u = None
    else:
        log_g, gamma = th[4], th[5]
        i = 6
        tg = log_g - gamma * logG
        s = np.logaddexp(tg, log_a)
        u = np.exp(tg - s)  # d s / d log_g
    log_c = th[i] if log_c_fixed is None else log_c_fixed
    t1 = s - alpha * logN
    t2 = log_b - beta * logD
    m = np.maximum(np.maximum(log_c, t1), t2)  # logsumexp of the three terms, written out (hot loop)
    e0, e1, e2 = np.exp(log_c - m), np.exp(t1 - m), np.exp(t2 - m)
    tot = e0 + e1 + e2
    pred = m + np.log(tot)
    w = (e0 / tot, e1 / tot, e2 / tot)  # softmax weights = d pred / d term
    return pred, w, u


def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _make_objective(logN, logD, logG, logL, dense, log_c_fixed, delta, weight_decay, weights=None):
    if weights is None:
        weights = np.ones_like(logL)

    def fun(theta):
        pred, w, u = _predict_log(theta, logN, logD, logG, dense, log_c_fixed)
        r = logL - pred
        val = float(np.sum(weights * _huber(r, delta)) + weight_decay * np.dot(theta, theta))
        dh = -weights * np.clip(r, -delta, delta)  # d huber / d pred
        w0, w1, w2 = w
        grads = [
            np.sum(dh * w1 * (1.0 if u is None else (1.0 - u))),  # log_a
            np.sum(dh * w1 * -logN),  # alpha
            np.sum(dh * w2),  # log_b
            np.sum(dh * w2 * -logD),  # beta
        ]
        if not dense:
            grads += [np.sum(dh * w1 * u), np.sum(dh * w1 * u * -logG)]  # log_g, gamma
        if log_c_fixed is None:
            grads.append(np.sum(dh * w0))
        grad = np.array(grads) + 2.0 * weight_decay * theta
        return val, grad

    def batch(thetas):  # [K, P] -> [K], for ranking the init grid
        pred, _, _ = _predict_log(thetas, logN, logD, logG, dense, log_c_fixed)
        r = logL - pred
        return np.sum(weights * _huber(r, delta), axis=-1) + weight_decay * np.sum(thetas * thetas, axis=-1)

    return fun, batch


# ----------------------------------------------------------------------------------------------------------
# fitting


@dataclasses.dataclass(frozen=True)
class FitResult:
    coeffs: Coefficients
    objective: float
    rmse_log: float  # root-mean-square residual of log L
    n_points: int
    law: str  # "moe" or "dense"
    c_fixed: bool
    n_starts: int
    theta: tuple  # the raw parameters (names in `param_names`)
    param_names: tuple

    def to_dict(self) -> dict:
        return {
            "law": self.law,
            "c_fixed": self.c_fixed,
            "objective": self.objective,
            "rmse_log": self.rmse_log,
            "n_points": self.n_points,
            "n_starts": self.n_starts,
        }


def _validate(N, D, G, L, dense):
    arrays = {}
    for name, x in (("N", N), ("D", D), ("G", G), ("loss", L)):
        if dense and name == "G":
            continue
        arr = np.asarray(x, dtype=np.float64).reshape(-1)
        if arr.size == 0:
            raise ValueError(f"{name}: no data points")
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError(f"{name}: expected finite values > 0")
        arrays[name] = arr
    if dense:
        arrays["G"] = np.ones_like(arrays["N"])
    sizes = {k: v.size for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"N, D, G, loss: expected equal lengths, got {sizes}")
    n_params = 4 + (0 if dense else 2)
    if arrays["N"].size < n_params:
        raise ValueError(f"loss: need at least {n_params} data points to fit, got {arrays['N'].size}")
    return arrays["N"], arrays["D"], arrays["G"], arrays["loss"]


def _check_options(c, delta, weight_decay, n_starts):
    if c is not None and not (isinstance(c, Real) and math.isfinite(c) and c > 0):
        raise ValueError(f"c={c!r}: expected a positive number (or None to fit c)")
    if not (delta > 0):
        raise ValueError(f"delta={delta!r}: expected > 0")
    if not (weight_decay >= 0):
        raise ValueError(f"weight_decay={weight_decay!r}: expected >= 0")
    if isinstance(n_starts, bool) or not (isinstance(n_starts, Integral) and n_starts >= 1):
        raise ValueError(f"n_starts={n_starts!r}: expected an integer >= 1")


def _fit_core(logs, dense, c, delta, weight_decay, inits, weights=None):
    logN, logD, logG, logL = logs
    log_c_fixed = None if c is None else math.log(c)
    fun, _ = _make_objective(logN, logD, logG, logL, dense, log_c_fixed, delta, weight_decay, weights)
    best = None
    for th0 in inits:
        with np.errstate(over="ignore", invalid="ignore"):
            res = minimize(fun, th0, jac=True, method="BFGS", options={"gtol": 1e-10, "maxiter": 2000})
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise RuntimeError("fit: every restart diverged")
    return best


def _top_inits(logs, dense, c, delta, weight_decay, grid, n_starts):
    logN, logD, logG, logL = logs
    log_c_fixed = None if c is None else math.log(c)
    _, batch = _make_objective(logN, logD, logG, logL, dense, log_c_fixed, delta, weight_decay)
    with np.errstate(over="ignore", invalid="ignore"):
        vals = batch(grid)
    vals = np.where(np.isfinite(vals), vals, np.inf)
    order = np.argsort(vals, kind="stable")[:n_starts]
    return grid[order]


def fit_law(
    N,
    D,
    G,
    loss,
    *,
    c: float | None = DEFAULT_C,
    dense: bool = False,
    delta: float = DEFAULT_DELTA,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    n_starts: int = 16,
    init_grid: np.ndarray | None = None,
) -> FitResult:
    """Fit ``L = c + (g/G^γ + a)/N^α + b/D^β`` (or the dense law) to data; c fixed unless ``c=None``.

    N, D, G, loss: 1-D arrays (G ignored when ``dense``). ``n_starts`` BFGS restarts from the best points of
    ``init_grid`` (default ``default_init_grid``); the lowest objective wins.
    """
    _check_options(c, delta, weight_decay, n_starts)
    N, D, G, L = _validate(N, D, G, loss, dense)
    logs = (np.log(N), np.log(D), np.log(G), np.log(L))
    free_c = c is None
    grid = default_init_grid(dense, free_c) if init_grid is None else np.asarray(init_grid, dtype=np.float64)
    P = len(_names(dense, free_c))
    if grid.ndim != 2 or grid.shape[1] != P:
        raise ValueError(f"init_grid: expected shape [K, {P}] for parameters {_names(dense, free_c)}, got {grid.shape}")
    inits = _top_inits(logs, dense, c, delta, weight_decay, grid, n_starts)
    res = _fit_core(logs, dense, c, delta, weight_decay, inits)
    coeffs = _theta_to_coeffs(res.x, dense, c)
    pred, _, _ = _predict_log(res.x, logs[0], logs[1], logs[2], dense, None if c is None else math.log(c))
    return FitResult(
        coeffs=coeffs,
        objective=float(res.fun),
        rmse_log=float(np.sqrt(np.mean((logs[3] - pred) ** 2))),
        n_points=int(N.size),
        law="dense" if dense else "moe",
        c_fixed=c is not None,
        n_starts=len(inits),
        theta=tuple(map(float, res.x)),
        param_names=tuple(_names(dense, free_c)),
    )


def fit_dense(N, D, loss, **kw) -> FitResult:
    """Fit the dense law ``c + a/N^α + b/D^β`` (same procedure as ``fit_law``)."""
    return fit_law(N, D, None, loss, dense=True, **kw)


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    n: int
    confidence: float
    intervals: dict  # name -> (lo, hi), for the Coefficients fields that were fitted
    std: dict  # name -> bootstrap standard deviation
    samples: np.ndarray  # [n, 7] coefficient samples in Coefficients field order

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "confidence": self.confidence,
            "intervals": {k: list(v) for k, v in self.intervals.items()},
            "std": dict(self.std),
        }


def bootstrap(
    N,
    D,
    G,
    loss,
    *,
    n_boot: int = 100,
    confidence: float = 0.95,
    seed: int = 0,
    point: FitResult | None = None,
    c: float | None = DEFAULT_C,
    dense: bool = False,
    delta: float = DEFAULT_DELTA,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    n_starts: int = 1,
) -> Bootstrap:
    """Percentile bootstrap intervals: resample rows with replacement ``n_boot`` times and refit.

    Each refit starts from the point estimate (``point``, fitted here if not given) and the ``n_starts`` best
    grid points for that resample.
    """
    if isinstance(n_boot, bool) or not (isinstance(n_boot, Integral) and n_boot >= 2):
        raise ValueError(f"n_boot={n_boot!r}: expected an integer >= 2")
    if not (0 < confidence < 1):
        raise ValueError(f"confidence={confidence!r}: expected a value in (0, 1)")
    if isinstance(n_starts, bool) or not (isinstance(n_starts, Integral) and n_starts >= 0):
        raise ValueError(f"n_starts={n_starts!r}: expected an integer >= 0")
    _check_options(c, delta, weight_decay, 1)
    N, D, G, L = _validate(N, D, G, loss, dense)
    if point is None:
        point = fit_law(N, D, G, L, c=c, dense=dense, delta=delta, weight_decay=weight_decay)
    free_c = c is None
    grid = default_init_grid(dense, free_c)
    logs_all = (np.log(N), np.log(D), np.log(G), np.log(L))
    rng = np.random.default_rng(seed)
    fields = ("a", "alpha", "b", "beta", "g", "gamma", "c")
    samples = np.empty((n_boot, len(fields)))
    theta0 = np.asarray(point.theta)
    for i in range(n_boot):
        idx = rng.integers(0, N.size, size=N.size)
        logs = tuple(x[idx] for x in logs_all)
        inits = [theta0] + list(_top_inits(logs, dense, c, delta, weight_decay, grid, n_starts)) if n_starts else [theta0]
        res = _fit_core(logs, dense, c, delta, weight_decay, inits)
        k = _theta_to_coeffs(res.x, dense, c)
        samples[i] = [getattr(k, f) for f in fields]
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    fitted = [f for f in fields if not (dense and f in ("g", "gamma")) and not (f == "c" and c is not None)]
    intervals, std = {}, {}
    for j, f in enumerate(fields):
        if f in fitted:
            intervals[f] = (float(np.quantile(samples[:, j], lo_q)), float(np.quantile(samples[:, j], hi_q)))
            std[f] = float(np.std(samples[:, j], ddof=1))
    return Bootstrap(n=n_boot, confidence=confidence, intervals=intervals, std=std, samples=samples)


# ----------------------------------------------------------------------------------------------------------
# I/O and command


_REQUIRED = ("N", "D", "G", "loss")
KIND_COLUMNS = ("model.layout", "model.ffn")  # FFN kind per run: mixing kinds needs an explicit --where


def parse_where(items) -> list[tuple[str, str, bool]]:
    """['model.layout=moe', 'train.seed!=3'] -> [(column, value, negated)]."""
    out = []
    for item in items or ():
        negated = "!=" in item
        column, sep, value = item.partition("!=" if negated else "=")
        if not sep or not column.strip():
            raise ValueError(f"--where {item!r}: expected COLUMN=VALUE or COLUMN!=VALUE, e.g. model.layout=moe")
        out.append((column.strip(), value.strip(), negated))
    return out


def _equal(cell, value: str) -> bool:
    cell = (cell or "").strip()
    if cell == value:
        return True
    try:
        return float(cell) == float(value)
    except ValueError:
        return False


def _select(path, reader, cols, where):
    """(kept rows [(lineno, row)], dropped {reason: count}) of a results table, by status and the --where terms."""
    for column, _, _ in where:
        if column not in cols:
            raise ValueError(f"--where: table {str(path)!r} has no column {column!r}; found {list(cols)}")
    kept, dropped = [], {}
    for lineno, row in enumerate(reader, start=2):
        reason = None
        if "status" in cols and (row[cols["status"]] or "").strip() != "done":
            reason = f"status={(row[cols['status']] or '').strip() or '(empty)'} (not done)"
        for column, value, negated in where:
            if reason is None and _equal(row[cols[column]], value) == negated:
                cell = (row[cols[column]] or "").strip() or "(empty)"
                reason = f"{column}={cell} (--where {column}{'!=' if negated else '='}{value})"
        if reason is None:
            kept.append((lineno, row))
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    named = {column for column, _, _ in where}
    for column in KIND_COLUMNS:
        kinds = sorted({(row[cols[column]] or "").strip() for _, row in kept}) if column in cols else []
        if len(kinds) > 1 and column not in named:
            raise ValueError(f"table: {str(path)!r} mixes {column} values {kinds}: select the rows to fit with "
                             f"--where {column}=VALUE (e.g. --where {column}=moe); a dense row would be read as G = 1")
    return kept, dropped


def read_selected(path: str | os.PathLike, *, dense: bool = False, where=()) -> tuple[dict[str, np.ndarray], dict]:
    """(table, selection) of a results CSV: the columns N, D, G, loss (optional flops) of the selected rows (see
    the module docstring; `where`: 'COLUMN=VALUE' strings or parse_where's tuples), and
    {'rows_read', 'rows_kept', 'where', 'dropped': {reason: count}}."""
    where = [w if isinstance(w, tuple) else parse_where([w])[0] for w in where]
    if not os.path.isfile(path):
        raise ValueError(f"table: no such file {str(path)!r}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ValueError(f"table: {str(path)!r} is empty")
        cols = {name.strip(): name for name in reader.fieldnames}
        required = [c for c in _REQUIRED if not (dense and c == "G")]
        missing = [c for c in required if c not in cols]
        if missing:
            raise ValueError(f"table: {str(path)!r} lacks column(s) {missing}; found {list(cols)}")
        kept, dropped = _select(path, reader, cols, where)
    want = required + (["flops"] if "flops" in cols else []) + (["G"] if dense and "G" in cols else [])
    data = {c: [] for c in want}
    for lineno, row in kept:
        for c in want:
            try:
                data[c].append(float(row[cols[c]]))
            except (TypeError, ValueError):
                raise ValueError(f"table: {str(path)!r} line {lineno}: column {c}={row[cols[c]]!r} is not a "
                                 "number") from None
    out = {c: np.asarray(v, dtype=np.float64) for c, v in data.items()}
    if out["N"].size == 0:
        raise ValueError(f"table: {str(path)!r} has no (finished, selected) data rows; dropped: {dropped}")
    selection = {"rows_read": len(kept) + sum(dropped.values()), "rows_kept": len(kept),
                 "where": [f"{c}{'!=' if n else '='}{v}" for c, v, n in where], "dropped": dropped}
    return out, selection


def read_table(path: str | os.PathLike, *, dense: bool = False, where=()) -> dict[str, np.ndarray]:
    """The table of read_selected (columns N, D, G, loss, optional flops; other columns ignored): rows whose
    ``status`` (the sweep runner's column) is ``done`` and that satisfy every `where` term."""
    return read_selected(path, dense=dense, where=where)[0]


def _print_selection(path: str, selection: dict) -> None:
    print(f"fit: {path}: {selection['rows_kept']} of {selection['rows_read']} rows selected"
          + (f" (--where {' '.join(selection['where'])})" if selection["where"] else ""), file=sys.stderr)
    for reason, count in sorted(selection["dropped"].items()):
        print(f"fit: dropped {count} row{'s' if count != 1 else ''}: {reason}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m grin_jax.scaling.fit",
        description="Fit the fine-grained MoE scaling law (Krajewski et al.) to a results table.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--table", help="CSV with columns N, D, G, loss")
    src.add_argument("--sweep", help="sweep directory; reads <sweep>/results.csv")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                   help="keep only rows whose COLUMN equals VALUE (COLUMN!=VALUE: differs); repeatable, all must "
                        "hold; e.g. --where model.layout=moe. Required when rows mix FFN kinds (model.layout)")
    p.add_argument("--out", required=True, help="coefficients JSON to write")
    p.add_argument("--plots", default=None, help="directory for PNG plots")
    p.add_argument("--law", choices=("moe", "dense"), default="moe")
    p.add_argument("--c", type=float, default=DEFAULT_C, help=f"fixed irreducible loss (default {DEFAULT_C})")
    p.add_argument("--free-c", action="store_true", help="fit c as well")
    p.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="Huber delta on log L (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY)
    p.add_argument("--starts", type=int, default=16, help="BFGS restarts (best grid points)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples (0: none)")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expansion", type=float, default=64.0, help="expansion rate E for FLOPs / optimum plots")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.bootstrap and args.bootstrap < 2:
        raise ValueError(f"--bootstrap={args.bootstrap!r}: expected 0 (none) or >= 2 resamples")
    if not 0 < args.confidence < 1:
        raise ValueError(f"--confidence={args.confidence!r}: expected a value in (0, 1)")
    if not (math.isfinite(args.expansion) and args.expansion > 0):
        raise ValueError(f"--expansion={args.expansion!r}: expected a positive expansion rate E")
    path = args.table if args.table else os.path.join(args.sweep, "results.csv")
    if args.sweep and not os.path.isdir(args.sweep):
        raise ValueError(f"sweep: no such directory {args.sweep!r}")
    dense = args.law == "dense"
    table, selection = read_selected(path, dense=dense, where=parse_where(args.where))
    _print_selection(path, selection)
    c = None if args.free_c else args.c
    G = None if dense else table["G"]
    kw = dict(c=c, dense=dense, delta=args.delta, weight_decay=args.weight_decay)
    result = fit_law(table["N"], table["D"], G, table["loss"], n_starts=args.starts, **kw)
    extra = {"fit": result.to_dict(), "table": os.path.abspath(path), "selection": selection}
    if args.bootstrap:
        boot = bootstrap(
            table["N"], table["D"], G, table["loss"], n_boot=args.bootstrap, confidence=args.confidence,
            seed=args.seed, point=result, **kw,
        )
        extra["bootstrap"] = boot.to_dict()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    text = to_json(result.coeffs, args.out, **extra)
    if args.plots:
        from grin_jax.scaling.fit_plots import make_plots
        extra["plots"] = make_plots(table, result, args.plots, expansion=args.expansion)
        text = to_json(result.coeffs, args.out, **extra)
    print(text, end="")
    return json.loads(text)


if __name__ == "__main__":  # pragma: no cover
    from grin_jax.cli import run_main
    sys.exit(run_main(main, sys.argv[1:]))  # a user error: one line (GRIN_JAX_DEBUG=1 for the traceback)
