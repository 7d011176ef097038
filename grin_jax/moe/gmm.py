"""Grouped matmul: rows sorted by group, each group multiplied by its own weight matrix.

Axes: M rows (token-slots sorted by expert), K contraction, N output, E groups (experts).

Every backend has the contract of `jax.lax.ragged_dot`:
    gmm(lhs_MK, rhs_EKN, group_sizes_E) -> out_MN,  out[rows of group e] = lhs[rows of group e] @ rhs[e]
with sum(group_sizes_E) <= M (rows past the sum give zeros), differentiable in lhs and rhs.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

DEFAULT_TILE_ROWS = 128


def ragged_dot_gmm(lhs_MK, rhs_EKN, group_sizes_E):
    """`jax.lax.ragged_dot`: the accelerator path (XLA:CPU lowers it to an E x dense masked matmul)."""
    return jax.lax.ragged_dot(lhs_MK, rhs_EKN, group_sizes_E.astype(jnp.int32))


def tile_layout(group_sizes_E: jax.Array, num_rows: int, tile_rows: int):
    """Where each sorted row goes when every group is padded to a multiple of `tile_rows`.

    Returns (padded_row_M int32: row index in the padded buffer, tile_group_J int32: group of each tile,
    num_tiles J: static = ceil(M / tile_rows) + E, enough for any group sizes).
    """
    num_groups = group_sizes_E.shape[0]
    num_tiles = -(-num_rows // tile_rows) + num_groups
    sizes_E = group_sizes_E.astype(jnp.int32)
    padded_sizes_E = -(-sizes_E // tile_rows) * tile_rows
    starts_E = jnp.cumsum(sizes_E) - sizes_E
    padded_starts_E = jnp.cumsum(padded_sizes_E) - padded_sizes_E
    row_M = jnp.arange(num_rows, dtype=jnp.int32)
    group_M = jnp.clip(jnp.searchsorted(jnp.cumsum(sizes_E), row_M, side="right"), 0, num_groups - 1)
    padded_row_M = padded_starts_E[group_M] + (row_M - starts_E[group_M])
    padded_row_M = jnp.where(row_M < jnp.sum(sizes_E), padded_row_M, num_tiles * tile_rows)  # past the end: dropped
    tile_start_J = jnp.arange(num_tiles, dtype=jnp.int32) * tile_rows
    tile_group_J = jnp.clip(jnp.searchsorted(jnp.cumsum(padded_sizes_E), tile_start_J, side="right"), 0, num_groups - 1)
    return padded_row_M, tile_group_J.astype(jnp.int32), num_tiles


def tiled_gmm(lhs_MK, rhs_EKN, group_sizes_E, *, tile_rows: int = DEFAULT_TILE_ROWS):
    """Dropless grouped matmul for CPU: groups padded to row tiles, one expert weight per tile, batched matmul."""
    num_rows, k = lhs_MK.shape
    padded_row_M, tile_group_J, num_tiles = tile_layout(group_sizes_E, num_rows, tile_rows)
    lhs_padded = jnp.zeros((num_tiles * tile_rows, k), lhs_MK.dtype).at[padded_row_M].set(lhs_MK, mode="drop")
    lhs_JtK = lhs_padded.reshape(num_tiles, tile_rows, k)
    out_JtN = jnp.einsum("jtk,jkn->jtn", lhs_JtK, rhs_EKN[tile_group_J])
    out_padded = out_JtN.reshape(num_tiles * tile_rows, -1)
    return jnp.take(out_padded, padded_row_M, axis=0, mode="fill", fill_value=0)


def reference_gmm(lhs_MK, rhs_EKN, group_sizes_E):
    """Naive reference: each row multiplied by its group's matrix via a per-row weight gather (tests only)."""
    num_rows = lhs_MK.shape[0]
    ends_E = jnp.cumsum(group_sizes_E)
    row_M = jnp.arange(num_rows)
    group_M = jnp.clip(jnp.searchsorted(ends_E, row_M, side="right"), 0, rhs_EKN.shape[0] - 1)
    out = jnp.einsum("mk,mkn->mn", lhs_MK, rhs_EKN[group_M])
    return jnp.where((row_M < ends_E[-1])[:, None], out, 0)


GMM_BACKENDS: dict[str, Callable] = {
    "ragged_dot": ragged_dot_gmm,
    "tiled": tiled_gmm,
}
