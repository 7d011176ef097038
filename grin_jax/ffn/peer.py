"""The PEER FFN kind: parameter-efficient expert retrieval over N = n^2 single-neuron experts with product keys
(He, "Mixture of A Million Experts", arXiv 2407.04153). Method, sources and the differences from `peer-pytorch`:
docs/peer.md.

Axes: B batch, S sequence, T = B*S tokens, D model, H PEER heads, K experts kept per head (top_k), N experts,
n = sqrt(N) sub-keys per half, Q = d_key (the full query dimension of a head; each half has Q/2).

    expert i:      e_i(x) = act(u_i . x) v_i               u_i, v_i in R^D, no biases; i = i1 * n + i2
    head j:        q_j(x) = BN(x W_q[:, j, :]) in R^Q, split into halves q_j^1 (first Q/2), q_j^2 (last Q/2)
                   (BN: the query BatchNorm, query_norm='batchnorm', the paper's default; identity with 'none')
    product keys:  score(i) = q_j^1 . c_{i1} + q_j^2 . c'_{i2}   (sub-keys c, c' in R^{Q/2}: shared by the heads, or
                                                            one set per head with shared_keys=False)
    retrieval:     top-K over each half's n scores, then top-K over the K^2 sums = the exact top-K over all N keys
                   (product_key_topk)
    gates:         g = softmax (or relu) over the head's K scores
    output:        f(x) = sum_j sum_{i in top-K(j)} g_i e_i(x)

Parameters (logical axis names; sharding.LOGICAL_AXIS_RULES maps 'peer_experts' to the mesh's expert axis, so the
expert tables' rows are sharded over it; the other `peer_*` names are replicated):
    w_query [D, H, Q]                    ('embed', 'peer_heads', 'peer_key')
    sub_keys [2, n, Q/2]                 (None, 'peer_keys', 'peer_key')                 shared_keys=True
             [H, 2, n, Q/2]              ('peer_heads', None, 'peer_keys', 'peer_key')   shared_keys=False
    w_in (u), w_out (v) [N, D]           ('peer_experts', 'embed')                       shared_experts=True
                                         (no w_in with expert_type='value': a product-key memory)
                        [H, N, D]        ('peer_heads', 'peer_experts', 'embed')         shared_experts=False
    query_norm.scale, .bias [H, Q]       ('peer_heads', 'peer_key')                      query_norm='batchnorm'
Running statistics (nnx.BatchStat, not parameters; query_norm='batchnorm'):
    query_norm.mean, .var [H, Q] float32 ('peer_heads', 'peer_key')   initially 0 and 1

Query BatchNorm (QueryBatchNorm): each of the H*Q query features is normalised over the tokens, with a learned scale
and bias. training=True: the batch statistics (mean, biased variance) of the tokens whose `token_mask_BS` is
non-zero (the train step passes the batch's loss mask: padding does not count), differentiated through; the running
averages become m * running + (1 - m) * batch (m = bn_momentum). training=False (eval, generation): the running
averages. Under jit with the batch sharded over the mesh's data axes the token sums are global (SPMD), so the
statistics are the global batch's, as on one device. The running averages are updated in place on the module; the
functional model returns them (models.apply_train) and the train state carries them as state['model_state'], out of
the optimizer's reach and into the checkpoints (models/lm.py, train/step.py). The normalisation is folded into the
query matmul (QueryBatchNorm.fold: x w' + b', the statistics from those of x), so no [T, H, Q] array is normalised.
Initialisation (the paper states none; peer-pytorch uses N(0, 1) tables, N(0, 0.02^2) keys): fan-in scaled normals,
    w_query ~ N(0, 1/D), sub_keys ~ N(0, 2/Q) (scores of unit-variance queries have unit variance),
    w_in ~ N(0, 1/D) (u.x has unit variance for a unit-variance x), w_out ~ N(0, 1/(H*K)) (the fan-in of the
    H*K-neuron hidden layer, as the dense FFN's w_down).

Memory: the gathered rows u, v [T, H, K, D] are formed `chunk_tokens` tokens at a time inside `lax.map` over
`jax.checkpoint`ed chunks, so the peak (forward and backward) is O(chunk_tokens * H * K * D) rather than
O(T * H * K * D). The routing (scores [T, H, n], top-K) is computed for all tokens at once (O(T * H * n)) by XLA;
the CPU kernel (backend 'auto'/'kernel') scores 64 tokens at a time in cache and keeps only the top-K.
With table_update='dense' the tables' gradient is dense ([N, D], as the optimiser update); with 'sparse' the
train step passes zero `row_sinks` [T, H, K, D] that are added to the gathered rows, differentiates those instead of
the tables (which enter under stop_gradient) and updates only the retrieved rows (grin_jax/train/sparse_rows.py).

Metrics, per PEER layer, over the real tokens only (token_mask_BS non-zero; the train and eval steps pass the loss
mask, 0 exactly on padding): aux['metrics'] (retrieval_metrics: the batch's usage and unevenness of the retrieval
counts, head_overlap; logged in training as train/<section>/*) and aux['sums']['router_score_mass'] [N] ([H, N]
with separate pools; expert_score_mass: the gates summed per expert), which the eval step returns and
grin_jax.train.evaluate adds up over the evaluation set into the paper's usage (the fraction of experts whose
accumulated router score is non-zero) and unevenness (KL(z || uniform) of the accumulated scores z normalised)
(accumulated_metrics, PEERFFN.eval_metrics: eval/<section>/usage, summary.json validation_<section>/usage, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grin_jax import sections as _sections
from grin_jax.ffn import register_ffn
from grin_jax.nn.layers import batch_stat, normal_init, param

SCORE_ACTIVATIONS = ("softmax", "relu")
EXPERT_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf) GELU, as torch.nn.GELU()
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
QUERY_NORMS = ("none", "batchnorm")
EXPERT_TYPES = ("singleton", "value")
TABLE_UPDATES = ("dense", "sparse")
BACKENDS = ("auto", "xla", "kernel")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PEERConfig:
    """PEER options (paper defaults unless stated).

    num_experts: N, a perfect square (paper 1024^2; the default 128^2 = 16384 is sized for the tiny models).
    heads: H query heads (paper 8). top_k: K experts kept per head (paper 16; K <= sqrt(N)).
    d_key: Q, the full query dimension of a head; each half and each sub-key has Q/2 (even; None = d_model, which is
      peer-pytorch's default `dim_key = dim // 2` per half).
    score_activation: 'softmax' (paper) | 'relu' over a head's K scores.
    expert_activation: 'gelu' (exact erf GELU; paper and peer-pytorch) | 'relu' | 'silu'.
    expert_type: 'singleton' (paper): e_i(x) = act(u_i . x) v_i | 'value': e_i(x) = v_i, a product-key memory
      (Lample et al. 2019, the paper's PKM baseline): no w_in table and no expert activation, the output is the
      gate-weighted sum of the retrieved values.
    shared_keys: True (paper): one pair of sub-key sets for all heads; False (peer-pytorch): a pair per head.
    shared_experts: True (paper): one expert pool for all heads; False: a separate pool of N experts per head
      (peer-pytorch `separate_embed_per_head=True`).
    query_norm: 'batchnorm' (paper): BatchNorm of each head's query over the tokens (QueryBatchNorm: batch
      statistics of the non-padding tokens in training, running averages at eval) | 'none' (peer-pytorch).
    bn_momentum: the running averages' momentum m in [0, 1): running = m * running + (1 - m) * batch (flax / Keras
      convention; torch's momentum=0.1 is m = 0.9). Default 0.99 (flax's).
    bn_epsilon: added to the variance before the square root (> 0; torch and flax default 1e-5).
    chunk_tokens: the token chunk of the expert computation (None = all tokens at once): the gathered expert rows
      never exceed chunk_tokens * H * K * D per table.
    table_update: 'dense': the expert tables are parameters like any other (a dense [N, D] gradient and AdamW
      update each step) | 'sparse': the row-sparse update (grin_jax/train/sparse_rows.py): the step differentiates
      the gathered rows instead of the tables and a lazy AdamW updates only the rows retrieved in the step, O(T*H*K*D)
      instead of O(N*D); worth it when N is well above the T*H*K retrievals per step (docs/peer.md).
    backend: the experts' computation and the product-key top-k: 'auto' (the CPU kernels where they apply: CPU,
      float32, singleton experts, one device; else 'xla') | 'xla' (lax.top_k; take-then-einsum in token chunks) |
      'kernel' (the C++ kernels; an error where they do not apply).
    """

    d_model: int
    num_experts: int = 128 ** 2
    heads: int = 8
    top_k: int = 16
    d_key: int | None = None
    score_activation: str = "softmax"
    expert_activation: str = "gelu"
    expert_type: str = "singleton"
    shared_keys: bool = True
    shared_experts: bool = True
    query_norm: str = "batchnorm"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-5
    chunk_tokens: int | None = 1024
    table_update: str = "dense"
    backend: str = "auto"

    def __post_init__(self):
        def fail(name, accepted):
            raise ValueError(f"peer.{name}={getattr(self, name)!r} is invalid: accepted values are {accepted}")

        if self.d_key is None:
            object.__setattr__(self, "d_key", self.d_model)
        N = self.num_experts
        if not _is_int(N) or N < 1 or math.isqrt(N) ** 2 != N or N > 2 ** 24:
            fail("num_experts", "perfect squares n**2 from 1 to 4096**2 (product keys: n sub-keys per half; "
                 "expert ids exact in float32)")
        for name in ("heads", "top_k"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "integers >= 1")
        n = math.isqrt(self.num_experts)
        if self.top_k > n:
            fail("top_k", f"integers 1..sqrt(num_experts)={n} (the top-k is taken over each half's {n} sub-keys)")
        if not _is_int(self.d_key) or self.d_key < 2 or self.d_key % 2:
            fail("d_key", "None (= d_model) or even integers >= 2 (the query is split in halves)")
        if self.score_activation not in SCORE_ACTIVATIONS:
            fail("score_activation", list(SCORE_ACTIVATIONS))
        if self.expert_activation not in EXPERT_ACTIVATIONS:
            fail("expert_activation", sorted(EXPERT_ACTIVATIONS))
        if self.expert_type not in EXPERT_TYPES:
            fail("expert_type", list(EXPERT_TYPES))
        for name in ("shared_keys", "shared_experts"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        if self.query_norm not in QUERY_NORMS:
            fail("query_norm", list(QUERY_NORMS))
        if not _is_real(self.bn_momentum) or not 0 <= self.bn_momentum < 1:
            fail("bn_momentum", "finite numbers in [0, 1) (running = m * running + (1 - m) * batch)")
        if not _is_real(self.bn_epsilon) or not self.bn_epsilon > 0:
            fail("bn_epsilon", "finite numbers > 0")
        if self.chunk_tokens is not None and (not _is_int(self.chunk_tokens) or self.chunk_tokens < 1):
            fail("chunk_tokens", "None (no chunking) or integers >= 1")
        if self.table_update not in TABLE_UPDATES:
            fail("table_update", list(TABLE_UPDATES))
        if self.backend not in BACKENDS:
            fail("backend", list(BACKENDS))

    @property
    def num_keys(self) -> int:
        """n = sqrt(N), the sub-keys per half."""
        return math.isqrt(self.num_experts)

    @property
    def num_pools(self) -> int:
        return 1 if self.shared_experts else self.heads

    @classmethod
    def from_section(cls, values, *, d_model: int) -> "PEERConfig":
        return _sections.from_section(cls, values, d_model=d_model, section="peer")

    def to_section(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "d_model"}

    @property
    def loss_weights(self) -> dict:
        return {}


# ------------------------------------------------------------------------------------------------ product keys
def topk_from_half_scores(s1: jax.Array, s2: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Exact top-k over the n^2 sums s1[i1] + s2[i2] (flat index i = i1 * n + i2) from the half scores
    s1, s2 [..., n]: (scores [..., k] descending, indices [..., k] int32), by XLA.

    Tie order: that of `lax.top_k` over the full score vector (equal scores: the lower flat index first). The first
    stage keeps each half's top-k (lax.top_k: equal half scores -> lower sub-key index first); the second takes the
    top-k of the k^2 candidate sums (_top_k_by_score_then_index: lax.top_k plus a tie repair, no full sort).
    Exact whenever the float32 sums s1 + s2 order the candidates as the exact sums do; a rounding that makes two
    sums equal whose halves differ may swap two experts of equal float32 score (the scores returned are then still
    equal to the brute force's).
    Scores are differentiable (gathered from s1, s2 at the selected indices); the selection is not.
    """
    n = _check_halves(s1, s2)
    v1, i1 = jax.lax.top_k(jax.lax.stop_gradient(s1), k)
    v2, i2 = jax.lax.top_k(jax.lax.stop_gradient(s2), k)
    batch = v1.shape[:-1]
    sums = (v1[..., :, None] + v2[..., None, :]).reshape(*batch, k * k)
    flat = (i1[..., :, None] * n + i2[..., None, :]).reshape(*batch, k * k).astype(jnp.int32)
    indices = _top_k_by_score_then_index(sums, flat, k)
    scores = (jnp.take_along_axis(s1, indices // n, axis=-1) + jnp.take_along_axis(s2, indices % n, axis=-1))
    return scores, indices


def _check_halves(s1: jax.Array, s2: jax.Array) -> int:
    """n, the sub-keys per half, after checking the half scores s1, s2 [..., n]."""
    n = s1.shape[-1]
    if s2.shape[-1] != n:
        raise ValueError(f"product_key_topk: halves with {n} and {s2.shape[-1]} sub-keys")
    return _check_num_keys(n)


def _check_num_keys(n: int) -> int:
    if n * n > 2 ** 24:
        raise ValueError(f"product_key_topk: {n}^2 experts; accepted are up to 4096^2 = 2^24 (flat ids exact in "
                         "float32)")
    return n


def _kernel_retrieve(q1_PA: jax.Array, q2_PB: jax.Array, keys1_GnA: jax.Array, keys2_GnB: jax.Array,
                     k: int) -> tuple[jax.Array, jax.Array]:
    """product_key_topk's selection by the C++ kernel (moe/csrc/expert_mlp.cc ProductKeyRetrieve: the half scores
    by sgemm a block of rows at a time in cache, the same selection as topk_from_half_scores by insertion into sorted
    lists of k; CPU, float32) for query rows q1 [P, A], q2 [P, B] and sub-keys [G, n, A], [G, n, B] (row p uses
    group p % G): (flat ids [P, k] int32, their scores s1[i1] + s2[i2] [P, k] float32), no gradient."""
    from grin_jax.moe import cpu_kernel
    cpu_kernel.load()
    _check_num_keys(keys1_GnA.shape[1])
    P = q1_PA.shape[0]
    out = (jax.ShapeDtypeStruct((P, k), jnp.int32), jax.ShapeDtypeStruct((P, k), jnp.float32))
    args = (jax.lax.stop_gradient(a) for a in (q1_PA, q2_PB, keys1_GnA, keys2_GnB))
    return jax.ffi.ffi_call(cpu_kernel.PEER_RETRIEVE_TARGET, out, vmap_method="sequential")(*args, k=np.int64(k))


@jax.custom_vjp
def _selected_scores(q1_PA, q2_PB, keys1_GnA, keys2_GnB, ids_Pk, values_Pk):
    """values_Pk (the selected product-key scores q1[p] . keys1[g, i1] + q2[p] . keys2[g, i2], g = p % G, computed
    by the selection) with their gradient to the queries and sub-keys from the C++ kernel
    (ProductKeyScoresBwd): O(P k Q) through the k selected sub-key pairs per row, where the gradient through the
    dense half scores [P, n] costs O(P n Q) and a scatter."""
    return values_Pk


def _selected_scores_fwd(q1_PA, q2_PB, keys1_GnA, keys2_GnB, ids_Pk, values_Pk):
    return values_Pk, (q1_PA, q2_PB, keys1_GnA, keys2_GnB, ids_Pk)


def _selected_scores_bwd(res, dv_Pk):
    from grin_jax.moe import cpu_kernel
    q1, q2, keys1, keys2, ids = res
    out = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q1, q2, keys1, keys2))
    grads = jax.ffi.ffi_call(cpu_kernel.PEER_KEYS_BWD_TARGET, out, vmap_method="sequential")(
        q1, q2, keys1, keys2, ids, dv_Pk.astype(jnp.float32))
    return (*grads, None, None)


_selected_scores.defvjp(_selected_scores_fwd, _selected_scores_bwd)


def _top_k_by_score_then_index(values: jax.Array, ids: jax.Array, k: int) -> jax.Array:
    """The ids [..., k] of the k largest values [..., M] ordered by (value descending, id ascending): equal to a
    two-key sort's first k (ids distinct, 0 <= id < 2^24), at the cost of two lax.top_k (a two-key lax.sort is ~15x slower
    on CPU). lax.top_k breaks ties by position, not by id, so: (1) the k-th value v_k is the threshold; the
    entries above it are top_k's first `above` outputs; (2) of the entries equal to v_k the k - above with the
    lowest ids fill the rest (a top_k over -id); (3) the k are put in (value desc, id asc) order by their ranks
    (k^2 comparisons)."""
    top_values, top_pos = jax.lax.top_k(values, k)
    # kth by a min, not the slice top_values[..., -1:]: XLA CPU merges that slice into top_k's and falls back from
    # its top-k routine to a full sort (10x slower)
    kth = jnp.min(top_values, axis=-1, keepdims=True)
    above = jnp.sum(top_values > kth, axis=-1, keepdims=True)                   # <= k - 1: all are in the top-k
    # lax.top_k over float32 (over int32 it is a full sort on CPU): ids < 2^24 are exact in float32
    neg_tied_ids, _ = jax.lax.top_k(jnp.where(values == kth, -ids.astype(jnp.float32), -jnp.inf), k)
    slot = jnp.arange(k)
    tied = jnp.take_along_axis(-neg_tied_ids, jnp.clip(slot - above, 0, k - 1), axis=-1).astype(ids.dtype)
    chosen_ids = jnp.where(slot < above, jnp.take_along_axis(ids, top_pos, axis=-1), tied)
    chosen_values = jnp.where(slot < above, top_values, kth)
    # rank of each chosen entry: how many chosen entries come before it in (value desc, id asc) order
    a_v, b_v = chosen_values[..., :, None], chosen_values[..., None, :]
    a_i, b_i = chosen_ids[..., :, None], chosen_ids[..., None, :]
    rank = jnp.sum((b_v > a_v) | ((b_v == a_v) & (b_i < a_i)), axis=-1)        # a permutation of 0..k-1
    return jnp.sum(jnp.where(rank[..., :, None] == slot, chosen_ids[..., :, None], 0), axis=-2)


def _half_scores(q_half: jax.Array, keys: jax.Array) -> jax.Array:
    """q_half [..., A] against sub-keys [n, A] (shared) or [G, n, A] (one set per group; q's axis -2 is G):
    [..., n] float32 at full precision."""
    hi = jax.lax.Precision.HIGHEST
    if keys.ndim == 2:
        return jnp.einsum("...q,nq->...n", q_half, keys, precision=hi)
    return jnp.einsum("...gq,gnq->...gn", q_half, keys, precision=hi)


def product_key_topk(q_half1: jax.Array, q_half2: jax.Array, keys1: jax.Array, keys2: jax.Array,
                     k: int, *, kernel: bool = False) -> tuple[jax.Array, jax.Array]:
    """Top-k of the N = n^2 product keys for queries split in halves q_half1 [..., A], q_half2 [..., B] and sub-keys
    keys1 [n, A], keys2 [n, B] (or [G, n, A], [G, n, B]: one pair per group, the queries' axis -2 being G; PEER's
    per-head keys): (scores [..., k], indices [..., k] int32 with i = i1 * n + i2), equal to lax.top_k over the N
    scores q_half1 . keys1[i1] + q_half2 . keys2[i2] (see topk_from_half_scores for the tie order). The scores are
    differentiable in the queries and the sub-keys.
    kernel=False: XLA (topk_from_half_scores; the gradient goes through the dense half scores [..., n]).
    kernel=True: the C++ kernels (CPU, float32): the half scores, the selection and its scores by
    ProductKeyRetrieve (_kernel_retrieve: no [..., n] array leaves the cache), the scores' gradient by
    ProductKeyScoresBwd through the k selected sub-key pairs only (_selected_scores); the same selection as
    kernel=False, the scores to float32 rounding (the half scores are OpenBLAS's sums, not XLA's)."""
    if not kernel:
        return topk_from_half_scores(_half_scores(q_half1, keys1), _half_scores(q_half2, keys2), k)
    groups = 1 if keys1.ndim == 2 else keys1.shape[0]
    if keys2.shape[-2] != keys1.shape[-2]:
        raise ValueError(f"product_key_topk: halves with {keys1.shape[-2]} and {keys2.shape[-2]} sub-keys")
    batch = q_half1.shape[:-1]
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    rows = lambda a: f32(a).reshape(-1, a.shape[-1])  # noqa: E731
    grouped = lambda a: f32(a).reshape(groups, *a.shape[-2:])  # noqa: E731
    args = (rows(q_half1), rows(q_half2), grouped(keys1), grouped(keys2))
    ids, values = _kernel_retrieve(*args, k)
    scores = _selected_scores(*args, ids, values)
    return scores.reshape(*batch, k), ids.reshape(*batch, k)


# ------------------------------------------------------------------------------------------------ experts
def _experts_chunk(x_TD, idx_THK, g_THK, w_in, w_out, act, sink_in=None, sink_out=None):
    """sum_{h, k} g * act(x . u_idx) v_idx for one chunk of tokens: [T, D] (w_in None: sum_{h, k} g * v_idx, a
    product-key memory). sink_in, sink_out [T, H, K, D] (the row-sparse update): added to the gathered rows, so
    their gradients are the rows' gradients."""
    if w_in is None:
        a = g_THK
    else:
        u = jnp.take(w_in, idx_THK, axis=0)                  # [T, H, K, D]
        if sink_in is not None:
            u = u + sink_in
        a = act(jnp.einsum("td,thkd->thk", x_TD, u)) * g_THK
    v = jnp.take(w_out, idx_THK, axis=0)
    if sink_out is not None:
        v = v + sink_out
    return jnp.einsum("thk,thkd->td", a, v)


def expert_mixture(x_TD, idx_THK, g_THK, w_in, w_out, *, act, chunk_tokens: int | None, sinks=None):
    """The experts' output [T, D] for flat expert ids idx [T, H, K] (rows of w_in, w_out [P, D]; w_in None: the
    values w_out alone, expert_type='value') and gates g.
    With chunk_tokens < T: lax.map over checkpointed chunks of chunk_tokens tokens (the last padded with gate 0),
    so at most chunk_tokens * H * K rows per table are gathered at a time, in the forward and the backward.
    sinks: None, or (sink_in or None, sink_out) [T, H, K, D] zeros added to the gathered rows (the row-sparse
    update: their gradients are the rows' gradients; pass the tables under stop_gradient)."""
    sink_in, sink_out = (None, None) if sinks is None else sinks
    T = x_TD.shape[0]
    if chunk_tokens is None or T <= chunk_tokens:
        return _experts_chunk(x_TD, idx_THK, g_THK, w_in, w_out, act, sink_in, sink_out)
    C = chunk_tokens
    chunks = -(-T // C)
    pad = chunks * C - T

    def split(a):
        if a is None:
            return None
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(chunks, C, *a.shape[1:])

    @jax.checkpoint
    def body(xs):
        x, idx, g, s_in, s_out = xs
        return _experts_chunk(x, idx, g, w_in, w_out, act, s_in, s_out)

    y = jax.lax.map(body, (split(x_TD), split(idx_THK), split(g_THK), split(sink_in), split(sink_out)))
    return y.reshape(chunks * C, -1)[:T]


# ------------------------------------------------------------------------------------------------ the CPU kernel
PEER_KERNEL_ACTIVATIONS = {"gelu": 0, "relu": 1, "silu": 2}  # as PeerActivation in moe/csrc/expert_mlp.cc


def _kernel_fwd_call(x_TD, ids_TJ, g_TJ, w_in, w_out, code):
    from grin_jax.moe import cpu_kernel
    T, J = ids_TJ.shape
    out = (jax.ShapeDtypeStruct(x_TD.shape, jnp.float32), jax.ShapeDtypeStruct((T, J), jnp.float32))
    return jax.ffi.ffi_call(cpu_kernel.PEER_FWD_TARGET, out, vmap_method="sequential")(
        x_TD, ids_TJ, g_TJ, w_in, w_out, activation=np.int64(code))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _kernel_mixture(x_TD, ids_TJ, g_TJ, w_in, w_out, sinks, code, rows):
    del sinks  # zeros by construction (the row-sparse train step's): only their gradient is used
    return _kernel_fwd_call(x_TD, ids_TJ, g_TJ, w_in, w_out, code)[0]


def _kernel_mixture_fwd(x_TD, ids_TJ, g_TJ, w_in, w_out, sinks, code, rows):
    y_TD, s_TJ = _kernel_fwd_call(x_TD, ids_TJ, g_TJ, w_in, w_out, code)
    return y_TD, (x_TD, ids_TJ, g_TJ, w_in, w_out, s_TJ, sinks)


def _kernel_mixture_bwd(code, rows, res, dy_TD):
    from grin_jax.moe import cpu_kernel
    x_TD, ids_TJ, g_TJ, w_in, w_out, s_TJ, sinks = res
    T, J = ids_TJ.shape
    table = (T * J, x_TD.shape[1]) if rows else w_in.shape
    out = (jax.ShapeDtypeStruct(x_TD.shape, jnp.float32), jax.ShapeDtypeStruct((T, J), jnp.float32),
           jax.ShapeDtypeStruct(table, jnp.float32), jax.ShapeDtypeStruct(table, jnp.float32))
    dx, dg, d_in, d_out = jax.ffi.ffi_call(cpu_kernel.PEER_BWD_TARGET, out, vmap_method="sequential")(
        x_TD, ids_TJ, g_TJ, w_in, w_out, s_TJ, dy_TD.astype(jnp.float32), activation=np.int64(code))
    if rows:  # the tables enter under stop_gradient: their (unused) cotangent is dropped by the compiler
        return (dx, None, dg, jnp.zeros_like(w_in), jnp.zeros_like(w_out),
                (d_in.reshape(sinks[0].shape), d_out.reshape(sinks[1].shape)))
    return dx, None, dg, d_in, d_out, None


_kernel_mixture.defvjp(_kernel_mixture_fwd, _kernel_mixture_bwd)


def kernel_mixture(x_TD, idx_THK, g_THK, w_in, w_out, *, activation: str, sinks=None):
    """expert_mixture by the C++ kernel (moe/csrc/expert_mlp.cc, CPU, float32, singleton experts): the gathered
    rows are never materialised; the backward writes the tables' dense gradients, or with `sinks` (the row-sparse
    update's zeros [T, H, K, D]; tables under stop_gradient) the rows' gradients as the sinks' gradients.
    Memory: the saved u . x [T, H*K]; dense table gradients [R, D] (rows mode: [T, H*K, D] each), nothing else of
    size T * H * K * D."""
    from grin_jax.moe import cpu_kernel
    cpu_kernel.load()  # built and registered once per process (raises KernelUnavailable saying why)
    T, H, K = idx_THK.shape
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    rows = sinks is not None
    if rows and sinks[0] is None:
        raise ValueError("kernel_mixture: singleton experts have two tables and two sinks")
    return _kernel_mixture(f32(x_TD), idx_THK.reshape(T, H * K).astype(jnp.int32), f32(g_THK.reshape(T, H * K)),
                           f32(w_in), f32(w_out), sinks, PEER_KERNEL_ACTIVATIONS[activation], rows)


def kernel_unavailable(config: "PEERConfig", dtype) -> str | None:
    """None when `backend='auto'` runs this layer on the CPU kernel, else the reason it does not: the platform, the
    compute dtype, the expert type, a mesh of more than one device (the kernel is one device's; XLA partitions the
    take-then-einsum) or the kernel not building here."""
    from grin_jax.moe import cpu_kernel
    if config.expert_type != "singleton":
        return "expert_type='value' has no kernel"
    return cpu_kernel.auto_unavailable(dtype)


# ------------------------------------------------------------------------------------------------ metrics
def _token_weights(mask_T: jax.Array | None, T: int) -> jax.Array:
    """[T] float32: 1 for the tokens that count (mask non-zero; all without a mask), 0 for padding."""
    return jnp.ones((T,), jnp.float32) if mask_T is None else (mask_T.reshape(T) > 0).astype(jnp.float32)


def retrieval_metrics(idx_THK: jax.Array, num_pool_experts: int, mask_T: jax.Array | None = None) -> dict:
    """Per-batch retrieval metrics over the tokens whose mask is non-zero (all tokens without a mask; padding does
    not count). usage: the fraction of the P experts retrieved at least once; unevenness: KL(z || uniform) of the
    retrieval distribution z (retrieval counts / total); head_overlap: the mean over tokens and pairs of heads of
    |S_a & S_b| / K (0 with one head; 0 with separate pools, whose experts are distinct). Every token masked:
    usage 0, unevenness 0, head_overlap 0. (The evaluation's usage and unevenness are the paper's, from the router
    score accumulated over the evaluation set: expert_score_mass, accumulated_metrics.)"""
    idx = jax.lax.stop_gradient(idx_THK)
    T, H, K = idx.shape
    w_T = _token_weights(mask_T, T)
    counts = jnp.zeros((num_pool_experts,), jnp.float32).at[idx.reshape(-1)].add(
        jnp.broadcast_to(w_T[:, None, None], idx.shape).reshape(-1))
    z = counts / jnp.maximum(jnp.sum(counts), 1.0)
    usage = jnp.mean((counts > 0).astype(jnp.float32))
    unevenness = jnp.sum(jnp.where(z > 0, z * jnp.log(jnp.maximum(z, 1e-30) * num_pool_experts), 0.0))
    if H > 1:
        # Pairs of equal ids among a token's H*K ids (no id repeats within a head, so every such pair is two heads'):
        # the (H*K)^2 comparisons less the H*K of each id with itself, halved (fused by XLA; a sort is slow on CPU).
        ids = idx.reshape(T, H * K)
        equal_T = jnp.sum((ids[:, :, None] == ids[:, None, :]).astype(jnp.int32), axis=(1, 2))
        pairs_T = ((equal_T - H * K) // 2).astype(jnp.float32)
        overlap = jnp.sum(w_T * pairs_T) / jnp.maximum(jnp.sum(w_T), 1.0) / (H * (H - 1) / 2 * K)
    else:
        overlap = jnp.float32(0.0)
    return {"usage": usage, "unevenness": unevenness, "head_overlap": overlap}


def expert_score_mass(idx_THK: jax.Array, gates_THK: jax.Array, num_pool_experts: int,
                      mask_T: jax.Array | None = None) -> jax.Array:
    """The router score mass per expert [P] float32: m_i = sum over the tokens t with a non-zero mask (all without a
    mask), heads h and slots k with idx[t, h, k] = i of gates[t, h, k] (a scatter-add; no gradient). Summed over an
    evaluation set this is the paper's accumulated router score (accumulated_metrics)."""
    idx = jax.lax.stop_gradient(idx_THK)
    T = idx.shape[0]
    g_THK = jax.lax.stop_gradient(gates_THK).astype(jnp.float32) * _token_weights(mask_T, T)[:, None, None]
    return jnp.zeros((num_pool_experts,), jnp.float32).at[idx.reshape(-1)].add(g_THK.reshape(-1))


def accumulated_metrics(mass) -> dict:
    """The paper's expert usage and unevenness from a layer's accumulated router score mass [N] (or [H, N] for
    separate pools: the H*N experts of the layer), on the host in float64: usage = the fraction of experts whose
    accumulated score is non-zero; unevenness = KL(z || uniform) in nats, z = mass / sum(mass) over the P experts
    (0 when every expert has the same mass, log P when one has it all). No mass at all (no real token): usage 0,
    unevenness NaN."""
    m = np.asarray(mass, np.float64).reshape(-1)
    if m.size == 0 or not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError(f"accumulated router score mass must be a non-empty array of finite values >= 0 "
                         f"(got shape {np.shape(mass)}, min {np.min(m) if m.size else None})")
    total = m.sum()
    if total <= 0:
        return {"usage": 0.0, "unevenness": float("nan")}
    z = m[m > 0] / total
    return {"usage": float(np.mean(m > 0)), "unevenness": float(np.sum(z * np.log(z * m.size)))}


# ------------------------------------------------------------------------------------------------ query BatchNorm
def query_moments(x_TD: jax.Array, w_DHQ: jax.Array,
                  mask_T: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean [H, Q], biased variance [H, Q], count) of the queries q = x w over the tokens whose mask is non-zero
    (all tokens without a mask), float32, from the statistics of x [T, D] (so that no [T, H, Q] array is formed,
    forward or backward): mean_q = mean_x w and var_q = diag(w^T C w), C = the masked covariance of x [D, D], two-pass
    (from the deviations to the mean; var_q >= 0 is enforced against rounding). Under jit with the tokens sharded
    over the mesh's data axes these are sums over the global batch (SPMD: a reduction over a sharded axis is global).
    count 0 (every token masked): mean 0, variance 0."""
    hi = jax.lax.Precision.HIGHEST
    x, w = x_TD.astype(jnp.float32), w_DHQ.astype(jnp.float32)
    weight_T = _token_weights(mask_T, x.shape[0])
    count = jnp.sum(weight_T)
    denominator = jnp.maximum(count, 1.0)
    mean_D = jnp.einsum("t,td->d", weight_T, x, precision=hi) / denominator
    centred = (x - mean_D) * weight_T[:, None]             # the weights are 0 or 1: C = centred^T centred / count
    cov_DD = jnp.einsum("td,te->de", centred, centred, precision=hi) / denominator
    mean = jnp.einsum("d,dhq->hq", mean_D, w, precision=hi)
    var = jnp.einsum("dhq,dhq->hq", w, jnp.einsum("de,ehq->dhq", cov_DD, w, precision=hi), precision=hi)
    return mean, jnp.maximum(var, 0.0), count


class QueryBatchNorm(nnx.Module):
    """BatchNorm of the queries q = x w [T, H, Q] (the paper's query BatchNorm): each of the H*Q features is
    normalised over the tokens, y = (q - mean) / sqrt(var + epsilon) * scale + bias, with a learned scale and bias
    (nnx.Param [H, Q], 'peer_heads', 'peer_key') and running averages `mean`, `var` (nnx.BatchStat [H, Q] float32,
    initially 0 and 1: not parameters, the train state carries them as state['model_state'], models/lm.py).

    Folded into the query projection (`fold`): y = x w' + b' with w' = w * s, b' = bias - mean * s,
    s = scale / sqrt(var + epsilon), the same function and gradient as normalising q, but the layer's only
    [T, H, Q]-sized work is its matmul (normalising q costs ~8 passes over it, forward and backward).
    training=True: the batch statistics of the tokens with a non-zero mask (query_moments: padding excluded;
    biased variance, as flax), differentiated through (as every BatchNorm); the running averages become
    m * running + (1 - m) * batch (m = momentum, the batch statistics under stop_gradient; not updated when every
    token is masked). training=False: the running averages, nothing updated.
    """

    def __init__(self, heads: int, d_key: int, *, momentum: float, epsilon: float, param_dtype=jnp.float32):
        names = ("peer_heads", "peer_key")
        self.scale = param(jnp.ones((heads, d_key), param_dtype), names)
        self.bias = param(jnp.zeros((heads, d_key), param_dtype), names)
        self.mean = batch_stat(jnp.zeros((heads, d_key), jnp.float32), names)
        self.var = batch_stat(jnp.ones((heads, d_key), jnp.float32), names)
        self.momentum, self.epsilon = float(momentum), float(epsilon)

    def fold(self, x_TD: jax.Array, w_DHQ: jax.Array, *, training: bool,
             mask_T: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(w' [D, H, Q], b' [H, Q]) float32 with x w' + b' = BatchNorm(x w) (the class docstring)."""
        if training:
            mean, var, count = query_moments(x_TD, w_DHQ, mask_T)
            m, seen = self.momentum, count > 0
            for stat, batch in ((self.mean, mean), (self.var, var)):
                old = stat[...]
                stat[...] = jnp.where(seen, m * old + (1.0 - m) * jax.lax.stop_gradient(batch), old)
        else:
            mean, var = self.mean[...], self.var[...]
        s = self.scale[...].astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
        return w_DHQ.astype(jnp.float32) * s, self.bias[...].astype(jnp.float32) - mean * s


def _project(x_TD: jax.Array, w_DHQ: jax.Array, b_HQ: jax.Array | None) -> jax.Array:
    """x w + b [T, H, Q] float32 at full precision (b None: no bias)."""
    q = jnp.einsum("td,dhq->thq", x_TD.astype(jnp.float32), w_DHQ, precision=jax.lax.Precision.HIGHEST)
    return q if b_HQ is None else q + b_HQ


# ------------------------------------------------------------------------------------------------ the kind
@register_ffn("peer")
class PEERFFN(nnx.Module):
    Config = PEERConfig
    takes_token_mask = True  # __call__ accepts token_mask_BS (the query BatchNorm's statistics skip padding)

    def __init__(self, config: PEERConfig, *, norm: str = "layernorm", norm_eps: float = 1e-5,
                 param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        del norm, norm_eps  # the kind's only norm is its query BatchNorm (query_norm)
        c = config
        self.config = c
        D, H, K, Q, N, n = c.d_model, c.heads, c.top_k, c.d_key, c.num_experts, c.num_keys
        self.w_query = param(normal_init(rngs.params(), (D, H, Q), param_dtype, D ** -0.5),
                             ("embed", "peer_heads", "peer_key"))
        key_std = (Q // 2) ** -0.5
        if c.shared_keys:
            self.sub_keys = param(normal_init(rngs.params(), (2, n, Q // 2), param_dtype, key_std),
                                  (None, "peer_keys", "peer_key"))
        else:
            self.sub_keys = param(normal_init(rngs.params(), (H, 2, n, Q // 2), param_dtype, key_std),
                                  ("peer_heads", None, "peer_keys", "peer_key"))
        shape, names = (((N, D), ("peer_experts", "embed")) if c.shared_experts
                        else ((H, N, D), ("peer_heads", "peer_experts", "embed")))
        self.w_in = (param(normal_init(rngs.params(), shape, param_dtype, D ** -0.5), names)
                     if c.expert_type == "singleton" else None)
        self.w_out = param(normal_init(rngs.params(), shape, param_dtype, (H * K) ** -0.5), names)
        self.query_norm = (QueryBatchNorm(H, Q, momentum=c.bn_momentum, epsilon=c.bn_epsilon,
                                          param_dtype=param_dtype) if c.query_norm == "batchnorm" else None)
        self.dtype = dtype

    def query_map(self, x_TD: jax.Array, *, training: bool = False,
                  mask_T: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """(w [D, H, Q], b [H, Q] or None) float32: the heads' queries are x w + b, the query BatchNorm folded in
        when there is one (QueryBatchNorm.fold; training: batch statistics of the tokens whose mask is non-zero,
        running averages updated; else the running averages)."""
        w = self.w_query[...].astype(jnp.float32)
        if self.query_norm is None:
            return w, None
        return self.query_norm.fold(x_TD, w, training=training, mask_T=mask_T)

    def queries(self, x_TD: jax.Array, *, training: bool = False, mask_T: jax.Array | None = None) -> jax.Array:
        """The heads' queries [T, H, Q] float32, after the query BatchNorm when there is one (query_map)."""
        return _project(x_TD, *self.query_map(x_TD, training=training, mask_T=mask_T))

    def route(self, x_TD: jax.Array, *, training: bool = False,
              mask_T: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(flat expert ids [T, H, K] int32 into the (H*)N rows of the tables, gates [T, H, K] float32). Each half of
        the queries comes from its own half of the query map (no [T, H, Q] array is sliced)."""
        c = self.config
        half = c.d_key // 2
        w, b = self.query_map(x_TD, training=training, mask_T=mask_T)
        q1 = _project(x_TD, w[..., :half], None if b is None else b[:, :half])
        q2 = _project(x_TD, w[..., half:], None if b is None else b[:, half:])
        keys = self.sub_keys[...].astype(jnp.float32)   # [2, n, Q/2], or [H, 2, n, Q/2] per head
        scores, idx = product_key_topk(q1, q2, keys[..., 0, :, :], keys[..., 1, :, :], c.top_k,
                                       kernel=self.use_kernel())
        gates = jax.nn.softmax(scores, axis=-1) if c.score_activation == "softmax" else jax.nn.relu(scores)
        if not c.shared_experts:
            idx = idx + (jnp.arange(c.heads, dtype=jnp.int32) * c.num_experts)[:, None]
        return idx, gates

    def tables(self) -> dict:
        """{name: the expert table's value} (w_out, and w_in unless expert_type='value')."""
        return {name: getattr(self, name)[...] for name in self.table_names()}

    def table_names(self) -> tuple:
        return ("w_in", "w_out") if self.config.expert_type == "singleton" else ("w_out",)

    def use_kernel(self) -> bool:
        """Whether the experts run on the CPU kernel (config.backend; decided at trace time)."""
        backend = self.config.backend
        if backend == "xla":
            return False
        reason = kernel_unavailable(self.config, self.dtype)
        if backend == "kernel" and reason is not None:
            raise ValueError(f"peer.backend='kernel' cannot run this layer: {reason}; use backend='xla' or 'auto'")
        return reason is None

    def row_sink_shapes(self, tokens: int) -> dict:
        """The row-sparse update's sinks for `tokens` tokens: {table name: ShapeDtypeStruct [T, H, K, D]} with
        table_update='sparse' (the rows each table gives the step), else {}."""
        c = self.config
        if c.table_update != "sparse":
            return {}
        shape = (tokens, c.heads, c.top_k, c.d_model)
        return {name: jax.ShapeDtypeStruct(shape, self.dtype) for name in self.table_names()}

    def __call__(self, x_BSD: jax.Array, *, training: bool = False, rng=None, token_mask_BS=None, row_sinks=None):
        """(y [B, S, D], aux {'losses': {}, 'metrics': {'usage', 'unevenness', 'head_overlap'},
        'sums': {'router_score_mass': [N] float32, or [H, N] with separate pools}}).
        token_mask_BS: non-zero for the real tokens (None: all), 0 for padding; the model passes the batch's loss
        mask (the train and eval steps). Only the real tokens count in the query BatchNorm's batch statistics
        (training), in the retrieval metrics and in the router score mass (expert_score_mass: summed over the
        evaluation set by grin_jax.train.evaluate into the paper's usage and unevenness, eval_metrics).
        row_sinks: {table name: zeros [T, H, K, D]} (row_sink_shapes; the row-sparse update's train step): the tables
        enter under stop_gradient and the sinks are added to their gathered rows, so the sinks' gradients are the
        rows' gradients; aux['row_ids'] = {table name: ids [T, H, K]} into the table's rows."""
        del rng
        c = self.config
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        mask_T = None if token_mask_BS is None else token_mask_BS.reshape(B * S)
        idx, gates = self.route(x_TD, training=training, mask_T=mask_T)
        tables = {name: t.astype(self.dtype).reshape(-1, D) for name, t in self.tables().items()}
        sinks = None
        if row_sinks:
            tables = {name: jax.lax.stop_gradient(t) for name, t in tables.items()}
            sinks = (row_sinks.get("w_in"), row_sinks["w_out"])
        if self.use_kernel():
            y_TD = kernel_mixture(x_TD, idx, gates, tables["w_in"], tables["w_out"],
                                  activation=c.expert_activation, sinks=sinks).astype(self.dtype)
        else:
            y_TD = expert_mixture(x_TD.astype(self.dtype), idx, gates.astype(self.dtype), tables.get("w_in"),
                                  tables["w_out"], act=EXPERT_ACTIVATIONS[c.expert_activation],
                                  chunk_tokens=c.chunk_tokens, sinks=sinks)
        P = c.num_pools * c.num_experts
        metrics = retrieval_metrics(idx, P, mask_T)
        mass = expert_score_mass(idx, gates, P, mask_T)
        mass = mass if c.shared_experts else mass.reshape(c.heads, c.num_experts)
        aux = {"losses": {}, "metrics": metrics, "sums": {"router_score_mass": mass}}
        if row_sinks:
            aux["row_ids"] = {name: idx for name in row_sinks}
        return y_TD.reshape(B, S, D).astype(x_BSD.dtype), aux

    @staticmethod
    def eval_metrics(sums: dict) -> dict:
        """The section's evaluation metrics from its sums over the evaluation set ({'router_score_mass': [L, N] or
        [L, H, N]}, stacked over the section's L layers; grin_jax.train.evaluate): 'usage', 'unevenness' (the
        paper's, accumulated_metrics: the mean over the layers) and 'usage_per_layer', 'unevenness_per_layer'
        (lists in layer order; None for a NaN: no real token was evaluated)."""
        mass = np.asarray(sums["router_score_mass"], np.float64)
        layers = [accumulated_metrics(m) for m in mass]
        out = {}
        for name in ("usage", "unevenness"):
            values = [m[name] for m in layers]
            out[name] = float(np.mean(values))
            out[f"{name}_per_layer"] = [v if math.isfinite(v) else None for v in values]
        return out

    @staticmethod
    def param_counts(config: PEERConfig) -> dict:
        """peer_experts: the tables u, v (2 * P * N * D, P pools; v alone with expert_type='value'), active
        H * K * 2 * D per token (H * K * D for values);
        peer_router: the query network (D * H * Q) and the sub-keys (2 * n * Q/2, times H when per head), all active
        (every token scores every sub-key). The query BatchNorm's scale and bias (2 * H * Q) are not claimed: they
        count as 'norms' (params.count_params); its running mean and variance are not parameters."""
        c = config
        tables = 2 if c.expert_type == "singleton" else 1
        experts = tables * c.num_pools * c.num_experts * c.d_model
        router = c.d_model * c.heads * c.d_key + (1 if c.shared_keys else c.heads) * 2 * c.num_keys * (c.d_key // 2)
        return {"peer_experts": (experts, c.heads * c.top_k * tables * c.d_model), "peer_router": (router, router)}

    @staticmethod
    def check_mesh(config: PEERConfig, sizes: dict) -> None:
        """Nothing to check: the expert tables' rows (N = n^2) are sharded over the expert axis where it divides N and
        replicated otherwise (sharding rules), and the layer is plain XLA, partitioned by the compiler."""
        del config, sizes
