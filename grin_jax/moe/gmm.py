"""Grouped matmul and the fused dropless expert MLP for CPU.

Axes: M rows (token-slots), K contraction, N output, E groups (experts), T tokens, D model, F expert hidden,
P padded rows, J tiles, L tile levels.

Grouped-matmul backends (`GMM_BACKENDS`) have the contract of `jax.lax.ragged_dot`:
    gmm(lhs_MK, rhs_EKN, group_sizes_E) -> out_MN,  out[rows of group e] = lhs[rows of group e] @ rhs[e]
with rows sorted by group, sum(group_sizes_E) <= M (rows past the sum give zeros), differentiable in lhs and rhs.

  ragged_dot  `jax.lax.ragged_dot`: the accelerator path. XLA:CPU lowers it to an E x dense masked matmul.
  tiled       `tiled_gmm`: a `jax.custom_vjp` whose forward and backward are `lax.fori_loop`s over row tiles
              (gather the tile's rows, one matmul with its expert's weight, scatter), never a per-tile weight
              gather; the weight gradient accumulates per expert in the loop carry.

The dispatch backend 'tiled' does not go through the gmm contract: `tiled_expert_mlp` runs the whole expert MLP
per tile (gather the tile's token rows, one matmul with [w_gate | w_up], activation, down matmul, weighted
scatter-add into the output), so no [M, D] sorted copy of the tokens, no [M, F] hidden and no [M, D] expert
output is ever materialised, and no sort is needed (slot positions come from counting). Its backward is a second
tile loop (a custom VJP) that saves only the pre-activations. Measured against a dense FFN with the same active
FLOPs (fwd+bwd, f32, 2 CPU cores, skewed loads; `python -m grin_jax.bench`): see the README's benchmark section.

Loop structure: an outer `fori_loop` over experts slices the expert's weights once (not once per tile) and
zero-initialises its weight-gradient accumulators; inner `fori_loop`s (one per tile level, data-dependent trip
counts) run that expert's tiles; the accumulators are written once per expert. Weight gradients (a contraction
over the tile rows) are computed as canonical matmuls on an explicitly transposed narrower operand (`_wgrad`):
XLA:CPU runs dots whose lhs contracts its first dimension ~40 % slower.

Tiling ("tile levels"). Rows of every group are laid out in a padded buffer of P = M + E * (t_min - 1) rows and
covered greedily by tiles of decreasing sizes `tile_sizes = (t_0, ..., t_{L-1})` (each divides the previous):
group e gets floor(n_e / t_0) tiles of t_0 rows, then floor(rest / t_1) of t_1, ..., and ceil(rest / t_{L-1})
tiles of the smallest size. Big tiles keep the per-tile costs (weight-gradient accumulation, gathers, loop
overhead) small; the smallest size bounds the padding to < t_{L-1} rows per expert (the only wasted FLOPs).
Static bound (array sizes) of the number of tiles per level:
  level 0:      floor(M / t_0)                  (the only level when L = 1: floor((M + E (t_0 - 1)) / t_0))
  middle level: min(floor(M / t_l), E (t_{l-1} / t_l - 1))
  last level:   min(floor((M + E (t_L-1 - 1)) / t_L-1), E t_{L-2} / t_L-1).
Memory (fused MLP, forward + backward): the saved pre-activations [P, 2F] (gated) or [P, F] (the dense FFN saves
the same per token); float32 accumulators for y / dx [T, D] and the weight gradients; per-tile temporaries.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from grin_jax.moe import experts as _experts

COUNTING_MAX_ELEMENTS = 1 << 24  # slot ranks by counting ([T, E] int32) up to this size, else by a sort


def check_tile_sizes(tile_sizes: Sequence[int]) -> tuple[int, ...]:
    """Validate tile sizes: positive ints, strictly decreasing, each dividing the previous one."""
    sizes = tuple(tile_sizes)
    ok = len(sizes) >= 1 and all(isinstance(t, int) and t >= 1 for t in sizes)
    ok = ok and all(a > b and a % b == 0 for a, b in zip(sizes, sizes[1:]))
    if not ok:
        raise ValueError(f"tile_sizes={tile_sizes!r} is invalid: accepted values are a non-empty sequence of "
                         "positive ints, strictly decreasing, each dividing the previous one, e.g. (512, 64)")
    return sizes


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def default_tile_sizes(num_rows: int, num_groups: int) -> tuple[int, ...]:
    """Tile levels for M rows over E groups: the big tile ~ the mean group size (<= 512), the smallest ~ 1/16 of
    it (8..128): few tiles for the bulk of every group, padding < 128 rows per expert. (512, 128) at the
    benchmark shapes (2048 rows per expert); measured within noise of (512, 64) and (1024, 256, 64) there."""
    mean = max(num_rows // max(num_groups, 1), 1)
    small = min(max(_pow2_floor(mean // 16), 8), 128)
    big = min(max(_pow2_floor(mean), small), 512)
    return (big, small) if big > small else (small,)


def default_backend(platform: str | None = None) -> str:
    """The fastest grouped matmul (a name in GMM_BACKENDS) for `platform` ('cpu', 'gpu', 'tpu', ...; default: JAX's
    default backend): 'tiled' on CPU, where ragged_dot is an E x dense masked matmul; 'ragged_dot' elsewhere.
    (The dispatch backend of 'auto' is `dispatch.default_backend`: on CPU the fused C++ kernel.)"""
    if platform is None:
        platform = jax.default_backend()
    if not isinstance(platform, str):
        raise ValueError(f"platform={platform!r} is invalid: accepted values are platform names like 'cpu', "
                         "'gpu', 'tpu' or None (JAX's default backend)")
    return "tiled" if platform.lower() == "cpu" else "ragged_dot"


# ----------------------------------------------------------------------------------------------------------------
# Tile plan
# ----------------------------------------------------------------------------------------------------------------

class TilePlan(NamedTuple):
    """Where rows go and which tiles exist (all int32; arrays, so it can cross a custom_vjp boundary).

    src_P: source row of each padded row; `num_rows` (one past the end) for padding.
    starts: per level, [J_l] first padded row of each tile.  groups: per level, [J_l] group of each tile.
    counts: [L] number of tiles in use per level (tiles past it are never visited).
    ends: [L, E] per level, one past the last tile of each group (tiles of group e: ends[l, e-1] .. ends[l, e]).
    """

    src_P: jax.Array
    starts: tuple
    groups: tuple
    counts: jax.Array
    ends: jax.Array


def level_bounds(num_rows: int, num_groups: int, tile_sizes: tuple[int, ...]) -> list[int]:
    """Static number of tiles per level that suffices for any group sizes summing to <= num_rows."""
    m, e, bounds = num_rows, num_groups, []
    for level, t in enumerate(tile_sizes):
        last = level == len(tile_sizes) - 1
        bound = (m + e * (t - 1)) // t if last else m // t
        if level > 0:
            ratio = tile_sizes[level - 1] // t
            bound = min(bound, e * (ratio if last else ratio - 1))
        bounds.append(bound)
    return bounds


def padded_rows(num_rows: int, num_groups: int, tile_sizes: tuple[int, ...]) -> int:
    """P: rows of the padded layout (any group sizes fit)."""
    return num_rows + num_groups * (tile_sizes[-1] - 1)


def plan_tiles(group_sizes_E: jax.Array, group_M: jax.Array, rank_M: jax.Array, tile_sizes: tuple[int, ...],
               valid_M: jax.Array | None = None) -> TilePlan:
    """Tile plan for M source rows, row m being the rank_M[m]-th row of group group_M[m] (invalid rows dropped)."""
    num_rows = group_M.shape[0]
    num_groups = group_sizes_E.shape[0]
    sizes_E = group_sizes_E.astype(jnp.int32)
    counts_LE, rest_E = [], sizes_E
    for level, t in enumerate(tile_sizes):
        n_E = rest_E // t if level < len(tile_sizes) - 1 else -(-rest_E // t)
        rest_E = rest_E - n_E * t
        counts_LE.append(n_E)
    padded_E = sum(n_E * t for n_E, t in zip(counts_LE, tile_sizes))
    pstart_E = jnp.cumsum(padded_E) - padded_E
    num_padded = padded_rows(num_rows, num_groups, tile_sizes)
    pos_M = pstart_E[group_M] + rank_M.astype(jnp.int32)
    if valid_M is not None:
        pos_M = jnp.where(valid_M, pos_M, num_padded)
    src_P = (jnp.full((num_padded,), num_rows, jnp.int32)
             .at[pos_M].set(jnp.arange(num_rows, dtype=jnp.int32), mode="drop"))
    starts, groups, counts, ends = [], [], [], []
    offset_E = jnp.zeros_like(sizes_E)
    for level, (t, bound) in enumerate(zip(tile_sizes, level_bounds(num_rows, num_groups, tile_sizes))):
        n_E = counts_LE[level]
        ends_E = jnp.cumsum(n_E)
        j = jnp.arange(bound, dtype=jnp.int32)
        g_J = jnp.clip(jnp.searchsorted(ends_E, j, side="right"), 0, num_groups - 1).astype(jnp.int32)
        starts.append((pstart_E[g_J] + offset_E[g_J] + (j - (ends_E[g_J] - n_E[g_J])) * t).astype(jnp.int32))
        groups.append(g_J)
        counts.append(ends_E[-1] if bound else jnp.int32(0))
        ends.append(ends_E)
        offset_E = offset_E + n_E * t
    return TilePlan(src_P, tuple(starts), tuple(groups), jnp.stack(counts).astype(jnp.int32),
                    jnp.stack(ends).astype(jnp.int32))


def slot_ranks(expert_ids_TK: jax.Array, num_experts: int):
    """(group_sizes_E, rank_TK): rank of each token-slot among the slots of its expert in slot order t*K + k.

    By counting (no sort) when T*E is small enough, else by a stable sort."""
    num_tokens, top_k = expert_ids_TK.shape
    ids_TK = expert_ids_TK.astype(jnp.int32)
    if num_tokens * num_experts <= COUNTING_MAX_ELEMENTS:
        t_idx = jnp.arange(num_tokens, dtype=jnp.int32)[:, None]
        counts_TE = jnp.zeros((num_tokens, num_experts), jnp.int32).at[t_idx, ids_TK].add(1)
        before_TE = jnp.cumsum(counts_TE, axis=0) - counts_TE  # slots of earlier tokens, per expert
        earlier_KK = jnp.tril(jnp.ones((top_k, top_k), bool), -1)  # same expert twice in one token
        dup_TK = jnp.sum((ids_TK[:, :, None] == ids_TK[:, None, :]) & earlier_KK, axis=-1, dtype=jnp.int32)
        rank_TK = jnp.take_along_axis(before_TE, ids_TK, axis=1) + dup_TK
        return jnp.sum(counts_TE, axis=0), rank_TK
    ids_M = ids_TK.reshape(-1)
    order_M = jnp.argsort(ids_M, stable=True)
    sizes_E = jnp.bincount(ids_M, length=num_experts).astype(jnp.int32)
    starts_E = jnp.cumsum(sizes_E) - sizes_E
    rank_sorted_M = jnp.arange(ids_M.shape[0], dtype=jnp.int32) - starts_E[ids_M[order_M]]
    rank_M = jnp.zeros_like(ids_M).at[order_M].set(rank_sorted_M, unique_indices=True)
    return sizes_E, rank_M.reshape(num_tokens, top_k)


def _group_tiles(plan: TilePlan, tile_sizes, group, body, carry):
    """carry = body(start, tile_rows, carry) for every tile of `group`, level by level."""
    for level, t in enumerate(tile_sizes):
        if plan.starts[level].shape[0] == 0:
            continue
        hi = plan.ends[level, group]
        lo = jnp.where(group > 0, plan.ends[level, jnp.maximum(group - 1, 0)], 0)
        def level_body(j, c, level=level, t=t):
            return body(plan.starts[level][j], t, c)
        carry = lax.fori_loop(lo, hi, level_body, carry)
    return carry


def _group_loops(plan: TilePlan, tile_sizes, num_groups, group_fn, carry):
    """carry = group_fn(e, carry) for e = 0..E-1 (group_fn runs _group_tiles with e's weights sliced once)."""
    return lax.fori_loop(0, num_groups, group_fn, carry)


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    return frozenset(vma)


def _zeros(shape, dtype, *like):
    """Zeros varying over the same shard_map axes as `like` (loop carries must keep one type inside shard_map)."""
    z = jnp.zeros(shape, dtype)
    axes = frozenset().union(*(_varying_axes(a) for a in jax.tree.leaves(like)))
    return lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


def _common_vma(*trees):
    """pcast every array to vary over the union of the shard_map axes any of them varies over, outside the
    custom VJPs (so their cotangents have the primal's type; autodiff of the pcast psums them back)."""
    axes = frozenset().union(*(_varying_axes(a) for a in jax.tree.leaves(trees)))
    if not axes:
        return trees

    def cast(a):
        missing = tuple(sorted(axes - _varying_axes(a)))
        return lax.pcast(a, missing, to="varying") if missing else a
    return jax.tree.map(cast, trees)


def _dot(a, b, dtype):
    return jnp.dot(a.astype(dtype), b, preferred_element_type=jnp.float32)


def _dot_nt(a, b, dtype):
    """a @ b.T"""
    return lax.dot_general(a.astype(dtype), b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _wgrad_transposed(a_shape, b_shape) -> bool:
    """Whether `_wgrad(a, b)` returns (a.T @ b).T: it transposes the narrower of its two [t, .] operands."""
    return a_shape[1] > b_shape[1]


def _wgrad(a, b, dtype):
    """a.T @ b for a [t, A], b [t, B] (a weight gradient), or its transpose [B, A] when A > B.

    XLA:CPU runs a dot whose lhs contracts its first dimension through a slower path (Eigen with packing) than
    a canonical one (~70 vs ~125 GFLOP per CPU-second at these tile shapes); transposing the narrower operand
    explicitly (kept from being folded back into the dot by an optimization barrier) is cheaper. Callers keep
    the accumulator in the returned layout and transpose it once at the end."""
    a, b = a.astype(dtype), b.astype(dtype)
    if _wgrad_transposed(a.shape, b.shape):
        return _dot(lax.optimization_barrier(b.T), a, dtype)
    return _dot(lax.optimization_barrier(a.T), b, dtype)


def _swap_last(a, swap: bool):
    return jnp.swapaxes(a, -1, -2) if swap else a


# ----------------------------------------------------------------------------------------------------------------
# Grouped matmul (ragged_dot contract)
# ----------------------------------------------------------------------------------------------------------------

def _gmm_fwd_loop(lhs, rhs, plan, tile_sizes):
    num_rows = lhs.shape[0]

    def group_fn(e, out):
        w = rhs[e]

        def body(start, t, out):
            idx = lax.dynamic_slice_in_dim(plan.src_P, start, t)
            rows = jnp.take(lhs, idx, axis=0, mode="fill", fill_value=0)
            return out.at[idx].set(_dot(rows, w, rhs.dtype).astype(out.dtype), mode="drop")
        return _group_tiles(plan, tile_sizes, e, body, out)

    out = _zeros((num_rows, rhs.shape[-1]), jnp.result_type(lhs, rhs), lhs, rhs, plan)
    return _group_loops(plan, tile_sizes, rhs.shape[0], group_fn, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_gmm(lhs, rhs, plan, tile_sizes):
    return _gmm_fwd_loop(lhs, rhs, plan, tile_sizes)


def _tiled_gmm_fwd(lhs, rhs, plan, tile_sizes):
    return _gmm_fwd_loop(lhs, rhs, plan, tile_sizes), (lhs, rhs, plan)


def _tiled_gmm_bwd(tile_sizes, res, dout):
    lhs, rhs, plan = res
    like = (lhs, rhs, plan, dout)
    swap = _wgrad_transposed(lhs.shape, dout.shape)
    acc_shape = _swap_last(rhs[0], swap).shape

    def group_fn(e, carry):
        dlhs, drhs = carry
        w = rhs[e]

        def body(start, t, c):
            dlhs, acc = c
            idx = lax.dynamic_slice_in_dim(plan.src_P, start, t)
            rows = jnp.take(lhs, idx, axis=0, mode="fill", fill_value=0)
            d = jnp.take(dout, idx, axis=0, mode="fill", fill_value=0)
            dlhs = dlhs.at[idx].set(_dot_nt(d, w, w.dtype).astype(dlhs.dtype), mode="drop")
            return dlhs, acc + _wgrad(rows, d, rhs.dtype)
        dlhs, acc = _group_tiles(plan, tile_sizes, e, body, (dlhs, _zeros(acc_shape, jnp.float32, *like)))
        return dlhs, lax.dynamic_update_index_in_dim(drhs, acc, e, 0)

    init = (_zeros(lhs.shape, lhs.dtype, *like), _zeros((rhs.shape[0],) + acc_shape, jnp.float32, *like))
    dlhs, drhs = _group_loops(plan, tile_sizes, rhs.shape[0], group_fn, init)
    return dlhs, _swap_last(drhs, swap).astype(rhs.dtype), None


_tiled_gmm.defvjp(_tiled_gmm_fwd, _tiled_gmm_bwd)


def tiled_gmm(lhs_MK, rhs_EKN, group_sizes_E, *, tile_sizes: Sequence[int] | None = None):
    """Dropless grouped matmul for CPU (ragged_dot contract): loops over row tiles, one expert weight per tile.
    tile_sizes: tile levels (module docstring); None = default_tile_sizes(M, E)."""
    num_rows = lhs_MK.shape[0]
    num_groups = rhs_EKN.shape[0]
    tile_sizes = check_tile_sizes(tile_sizes or default_tile_sizes(num_rows, num_groups))
    sizes_E = group_sizes_E.astype(jnp.int32)
    ends_E = jnp.cumsum(sizes_E)
    row_M = jnp.arange(num_rows, dtype=jnp.int32)
    group_M = jnp.clip(jnp.searchsorted(ends_E, row_M, side="right"), 0, num_groups - 1).astype(jnp.int32)
    rank_M = row_M - (ends_E - sizes_E)[group_M]
    plan = plan_tiles(sizes_E, group_M, rank_M, tile_sizes, valid_M=row_M < ends_E[-1])
    return _tiled_gmm(*_common_vma(lhs_MK, rhs_EKN, plan), tile_sizes)


def ragged_dot_gmm(lhs_MK, rhs_EKN, group_sizes_E):
    """`jax.lax.ragged_dot`: the accelerator path (XLA:CPU lowers it to an E x dense masked matmul)."""
    return jax.lax.ragged_dot(lhs_MK, rhs_EKN, group_sizes_E.astype(jnp.int32))


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


# ----------------------------------------------------------------------------------------------------------------
# Fused expert MLP (the dispatch backend 'tiled')
# ----------------------------------------------------------------------------------------------------------------

def _hidden(act, pre):
    """Expert hidden from the pre-activations: act(gate) * up (gated, pre = [gate | up]) or act(pre)."""
    if act.gated:
        half = pre.shape[-1] // 2
        return act.fn(pre[:, :half]) * pre[:, half:]
    return act.fn(pre)


def _slot_arrays(weights_TK, plan):
    """Token of each padded row (T = padding, points at an appended zero row) and its combine weight (0)."""
    top_k = weights_TK.shape[1]
    tok_P = plan.src_P // top_k
    wt_P = jnp.concatenate([weights_TK.reshape(-1).astype(jnp.float32), jnp.zeros((1,), jnp.float32)])[plan.src_P]
    return tok_P, wt_P


def _append_zero_row(a):
    return jnp.concatenate([a, jnp.zeros((1, a.shape[1]), a.dtype)], axis=0)


def _mlp_fwd_loop(x_TD, w_in, w_out, weights_TK, plan, tile_sizes, activation, save):
    act = _experts.get_activation(activation)
    tok_P, wt_P = _slot_arrays(weights_TK, plan)
    x_pad = _append_zero_row(x_TD)
    compute = jnp.result_type(x_TD, w_in)

    def group_fn(e, carry):
        wi, wo = w_in[e], w_out[e]  # sliced once per expert, not per tile

        def body(start, t, carry):
            y, pre_P = carry
            idx = lax.dynamic_slice_in_dim(tok_P, start, t)
            wt = lax.dynamic_slice_in_dim(wt_P, start, t)[:, None]
            xr = x_pad.at[idx].get(mode="promise_in_bounds")
            pre = _dot(xr, wi, wi.dtype)
            hw = _hidden(act, pre) * wt
            y = y.at[idx].add(_dot(hw, wo, wo.dtype), mode="drop")
            if save:
                pre_P = lax.dynamic_update_slice_in_dim(pre_P, pre.astype(pre_P.dtype), start, 0)
            return y, pre_P
        return _group_tiles(plan, tile_sizes, e, body, carry)

    like = (x_TD, w_in, w_out, weights_TK, plan)
    pre_P = _zeros((plan.src_P.shape[0] if save else 0, w_in.shape[-1]), compute, *like)
    y, pre_P = _group_loops(plan, tile_sizes, w_in.shape[0], group_fn,
                            (_zeros(x_TD.shape, jnp.float32, *like), pre_P))
    return y.astype(compute), pre_P


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _tiled_mlp(x_TD, w_in, w_out, weights_TK, plan, tile_sizes, activation):
    return _mlp_fwd_loop(x_TD, w_in, w_out, weights_TK, plan, tile_sizes, activation, save=False)[0]


def _tiled_mlp_fwd(x_TD, w_in, w_out, weights_TK, plan, tile_sizes, activation):
    y, pre_P = _mlp_fwd_loop(x_TD, w_in, w_out, weights_TK, plan, tile_sizes, activation, save=True)
    return y, (x_TD, w_in, w_out, weights_TK, plan, pre_P)


def _tiled_mlp_bwd(tile_sizes, activation, res, dy_TD):
    x_TD, w_in, w_out, weights_TK, plan, pre_P = res
    act = _experts.get_activation(activation)
    num_tokens, top_k = weights_TK.shape
    tok_P, wt_P = _slot_arrays(weights_TK, plan)
    x_pad = _append_zero_row(x_TD)
    dy_pad = _append_zero_row(dy_TD.astype(x_TD.dtype))

    # Weight-gradient accumulators in the layout _wgrad produces (transposed back once at the end).
    d_model, d_in, d_hidden = w_in.shape[1], w_in.shape[2], w_out.shape[1]
    swap_in = _wgrad_transposed((0, d_model), (0, d_in))       # x rows [t, D] with dpre [t, F_in]
    swap_out = _wgrad_transposed((0, d_hidden), (0, d_model))  # wt*h [t, F] with dy rows [t, D]
    like = (x_TD, w_in, w_out, weights_TK, plan, dy_TD)

    def group_fn(e, carry):
        dx, dw_in, dw_out, dwt_P = carry
        wi, wo = w_in[e], w_out[e]

        def body(start, t, c):
            dx, dwt_P, acc_in, acc_out = c
            idx = lax.dynamic_slice_in_dim(tok_P, start, t)
            wt = lax.dynamic_slice_in_dim(wt_P, start, t)[:, None]
            xr = x_pad.at[idx].get(mode="promise_in_bounds")
            dyr = dy_pad.at[idx].get(mode="promise_in_bounds")
            pre = lax.dynamic_slice_in_dim(pre_P, start, t, 0).astype(jnp.float32)
            h, hidden_vjp = jax.vjp(functools.partial(_hidden, act), pre)
            g_hw = _dot_nt(dyr, wo, wo.dtype)                       # d loss / d (wt * h)   [t, F]
            dwt_P = lax.dynamic_update_slice_in_dim(dwt_P, jnp.sum(g_hw * h, axis=-1), start, 0)
            (dpre,) = hidden_vjp(g_hw * wt)
            acc_out = acc_out + _wgrad(h * wt, dyr, wo.dtype)
            acc_in = acc_in + _wgrad(xr, dpre, wi.dtype)
            dx = dx.at[idx].add(_dot_nt(dpre, wi, wi.dtype), mode="drop")
            return dx, dwt_P, acc_in, acc_out

        acc = (_zeros(dw_in.shape[1:], jnp.float32, *like), _zeros(dw_out.shape[1:], jnp.float32, *like))
        dx, dwt_P, acc_in, acc_out = _group_tiles(plan, tile_sizes, e, body, (dx, dwt_P) + acc)
        return (dx, lax.dynamic_update_index_in_dim(dw_in, acc_in, e, 0),
                lax.dynamic_update_index_in_dim(dw_out, acc_out, e, 0), dwt_P)

    init = (_zeros(x_TD.shape, jnp.float32, *like), _zeros(_swap_last(w_in, swap_in).shape, jnp.float32, *like),
            _zeros(_swap_last(w_out, swap_out).shape, jnp.float32, *like),
            _zeros(plan.src_P.shape, jnp.float32, *like))
    dx, dw_in, dw_out, dwt_P = _group_loops(plan, tile_sizes, w_in.shape[0], group_fn, init)
    dw_in, dw_out = _swap_last(dw_in, swap_in), _swap_last(dw_out, swap_out)
    dweights_M = (_zeros((num_tokens * top_k,), jnp.float32, *like)
                  .at[plan.src_P].set(dwt_P, mode="drop"))
    return (dx.astype(x_TD.dtype), dw_in.astype(w_in.dtype), dw_out.astype(w_out.dtype),
            dweights_M.reshape(num_tokens, top_k).astype(weights_TK.dtype), None)


_tiled_mlp.defvjp(_tiled_mlp_fwd, _tiled_mlp_bwd)


def tiled_expert_mlp(expert_params: dict, x_TD: jax.Array, expert_ids_TK: jax.Array, weights_TK: jax.Array, *,
                     activation: str = "swiglu", tile_sizes: Sequence[int] | None = None) -> jax.Array:
    """y[t] = sum_k weights[t, k] * Expert_{expert_ids[t, k]}(x[t]), exact and dropless, as tile loops (CPU).

    Gated activations run w_gate and w_up as one matmul (concatenated along F); the parameter pytree is
    unchanged. Differentiable in x, the expert weights and the combine weights (custom VJP).
    tile_sizes: tile levels (module docstring); None = default_tile_sizes(T * K, E)."""
    act = _experts.get_activation(activation)
    num_experts = expert_params["w_up"].shape[0]
    tile_sizes = check_tile_sizes(tile_sizes or default_tile_sizes(expert_ids_TK.size, num_experts))
    group_sizes_E, rank_TK = slot_ranks(expert_ids_TK, num_experts)
    plan = plan_tiles(group_sizes_E, expert_ids_TK.reshape(-1).astype(jnp.int32), rank_TK.reshape(-1), tile_sizes)
    if act.gated:
        w_in = jnp.concatenate([expert_params["w_gate"], expert_params["w_up"]], axis=-1)
    else:
        w_in = expert_params["w_up"]
    args = _common_vma(x_TD, w_in, expert_params["w_down"], weights_TK, plan)
    return _tiled_mlp(*args, tile_sizes, activation)
