"""The row-sparse update of large tables (PEER's expert tables with peer.table_update='sparse'; docs/peer.md).

A PEER layer retrieves M = T * H * K rows of each [R, D] table per step (R = the table's rows: N, or H * N with a pool
per head). Differentiating the table itself gives a dense [R, D] gradient (R * D zeros plus a scatter) and AdamW then
reads and writes every row: O(R * D) per step however few rows were used. Here instead:

  1. the tables enter the forward under stop_gradient and a zero "sink" [T, H, K, D] is added to each table's
     gathered rows (grin_jax/ffn/peer.py, models.row_sink_shapes): the sinks' gradients are the gathered rows'
     gradients, and the layer reports the rows' ids (aux['row_ids']);
  2. `row_gradient` sums the gradients of equal ids: (unique ids [M], padded with R; summed rows [M, D]); the
     table's dense gradient would be exactly these rows scattered into zeros;
  3. global-norm clipping over the other parameters' gradients and these rows (the dense gradient's norm: equal);
  4. `lazy_adamw_rows`: AdamW on the retrieved rows only (their mu, nu and values gathered, updated, scattered back).
     A row not retrieved in a step keeps its value, mu and nu (lazy Adam, as TensorFlow's LazyAdam): unlike dense
     AdamW, its momentum does not move it and weight decay does not shrink it that step. With every row retrieved in
     every step the two are the same update (tests/test_sparse_rows.py).

Cost per step O(M * D + M log M) (the ids' sort), independent of R; memory: the sinks' gradients, M * D per table
(a table's rows are gathered in chunks in the forward, but their gradients are kept whole for the update).

RowSparseAdamW replaces the optax transformation of train/optim.py for a model with such tables: `init(params)` as
optax (the other parameters' AdamW state from the optax chain without clipping, the tables' mu and nu as copies of
the tables), and `apply(params, grads, row_grads, opt_state, step)` in the train step (train/step.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def _name(path) -> str:
    return ".".join(str(p) for p in path)


def split_tables(params, names) -> tuple[Any, Any]:
    """(the other parameters, the tables named `names`) of an nnx.State ('layers.1.mlp.w_in', ...)."""
    names = set(names)
    tables, rest = nnx.split_state(params, lambda path, _: _name(path) in names, ...)
    return rest, tables


def _flat(state) -> dict:
    return {_name(path): leaf for path, leaf in nnx.to_flat_state(state)}


def _value(leaf):
    return leaf.get_value() if hasattr(leaf, "get_value") else leaf


def row_gradient(ids: jax.Array, rows: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """(unique ids [M] ascending, padded with num_rows; the summed gradients of each id's rows [M, D], 0 on the
    padding) from the ids [...] (M of them, repeats allowed) and their rows' gradients [..., D]."""
    D = rows.shape[-1]
    flat_ids = ids.reshape(-1)
    M = flat_ids.shape[0]
    unique, inverse = jnp.unique(flat_ids, size=M, fill_value=num_rows, return_inverse=True)
    summed = jax.ops.segment_sum(rows.reshape(M, D).astype(jnp.float32), inverse.reshape(-1), num_segments=M)
    return unique, summed


def lazy_adamw_rows(table, mu, nu, unique, grad_rows, *, learning_rate, b1, b2, eps, weight_decay, count):
    """AdamW (optax.adamw's update: bias-corrected moments, eps outside the square root, decoupled weight decay) on
    the rows `unique` [M] of table, mu, nu [R, D] (padding ids >= R are dropped) with their gradients [M, D];
    count: the number of updates before this one (bias correction with count + 1). Returns (table, mu, nu)."""
    t = (count + 1).astype(jnp.float32)
    p = table.at[unique].get(mode="fill", fill_value=0).astype(jnp.float32)
    m = b1 * mu.at[unique].get(mode="fill", fill_value=0) + (1 - b1) * grad_rows
    v = b2 * nu.at[unique].get(mode="fill", fill_value=0) + (1 - b2) * jnp.square(grad_rows)
    step = (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps) + weight_decay * p
    new_p = (p - learning_rate * step).astype(table.dtype)
    return (table.at[unique].set(new_p, mode="drop"), mu.at[unique].set(m.astype(mu.dtype), mode="drop"),
            nu.at[unique].set(v.astype(nu.dtype), mode="drop"))


@dataclasses.dataclass(frozen=True)
class RowSparseAdamW:
    """AdamW with warm-up / cosine schedule and global-norm clipping (train/optim.py's) where the tables `tables`
    (flat parameter names) are updated row-sparsely (module docstring). dense: the optax chain for the other
    parameters, without clipping (clipping is global, done here)."""

    tables: tuple
    dense: optax.GradientTransformation
    schedule: Callable
    b1: float
    b2: float
    eps: float
    weight_decay: float
    clip_norm: float

    def init(self, params) -> dict:
        rest, tables = split_tables(params, self.tables)
        def zeros():  # two distinct buffers (the train step donates its state)
            return jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), tables)

        return {"dense": self.dense.init(rest), "rows": {"mu": zeros(), "nu": zeros()}}

    def apply(self, params, grads, row_grads: dict, opt_state: dict, count):
        """One update. params: every parameter; grads: the other parameters' gradients (an nnx.State without the
        tables); row_grads {table name: (ids, rows' gradients)} (row_gradient's input); count: updates so far.
        Returns (params, opt_state, the global gradient norm before clipping)."""
        rest, tables = split_tables(params, self.tables)
        flat_tables = _flat(tables)
        summed = {}
        for name, (ids, rows) in row_grads.items():
            R = _value(flat_tables[name]).reshape(-1, rows.shape[-1]).shape[0]
            summed[name] = row_gradient(ids, rows, R)
        squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(grads)]
        squares += [jnp.sum(jnp.square(g)) for _, g in summed.values()]
        norm = jnp.sqrt(sum(squares))
        scale = (jnp.where(norm < self.clip_norm, 1.0, self.clip_norm / norm) if self.clip_norm > 0
                 else jnp.float32(1.0))
        grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
        updates, dense_state = self.dense.update(grads, opt_state["dense"], rest)
        rest = jax.tree.map(lambda p, u: p + u, rest, updates)
        lr = self.schedule(count)
        flat_mu, flat_nu = _flat(opt_state["rows"]["mu"]), _flat(opt_state["rows"]["nu"])
        new_tables, new_mu, new_nu = {}, {}, {}
        for name, leaf in flat_tables.items():
            table = _value(leaf)
            shape, D = table.shape, table.shape[-1]
            unique, rows = summed[name]
            t, m, v = lazy_adamw_rows(table.reshape(-1, D), _value(flat_mu[name]).reshape(-1, D),
                                      _value(flat_nu[name]).reshape(-1, D), unique, rows * scale,
                                      learning_rate=lr, b1=self.b1, b2=self.b2, eps=self.eps,
                                      weight_decay=self.weight_decay, count=count)
            new_tables[name], new_mu[name], new_nu[name] = t.reshape(shape), m.reshape(shape), v.reshape(shape)
        tables = _replace(tables, new_tables)
        rows_state = {"mu": _replace(opt_state["rows"]["mu"], new_mu), "nu": _replace(opt_state["rows"]["nu"], new_nu)}
        return nnx.merge_state(rest, tables), {"dense": dense_state, "rows": rows_state}, norm


def _replace(state, values: dict):
    """state with the leaves named in `values` given those values (their Variables' metadata kept)."""
    return nnx.from_flat_state([(path, leaf.replace(values[_name(path)]) if _name(path) in values else leaf)
                                for path, leaf in nnx.to_flat_state(state)])
