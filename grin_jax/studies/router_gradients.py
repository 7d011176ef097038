"""Router-gradient estimators against the exact gradient, on toy MoE problems small enough to enumerate.

Axes: E experts, d expert-output dim, C classes, K slots (top-k), P ordered K-tuples of experts, R rows (one row =
one gradient sample or one enumerated outcome), N problems.

The toy
-------
One token. Router logits z in R^E; fixed expert outputs E_i in R^d (rows of `experts`). A routing decision is an
ordered tuple D = (D_1, ..., D_K) of distinct experts with slot weights m_k, and the layer output is
y = sum_k m_k E_{D_k}. Two heads:
  quad: f(y) = 1/2 ||y - t||^2
  ce:   f(y) = CE(W y, label) = logsumexp(W y) - (W y)[label].

The exact objective (what every estimator is compared with)
-----------------------------------------------------------
For a temperature T and a mask eps (eps = inf: no mask):
  pi_1 = MaskedSoftmax(z / T) over all experts,
  pi_k = MaskedSoftmax(z / T) over the experts not yet picked (D_1..D_{k-1} removed; mask recomputed per slot with
         the project's rule, `sparsemixer.sparsity_mask`, which is invariant to the scale of z, so the same mask for
         z and z / T),
  D_k ~ pi_k sequentially (sampling without replacement, SparseMixer's slot order),
  m_k = pi_k[D_k]               (the gate value of the picked expert; no renormalisation, no midpoint factor c),
  J_{T,eps}(z) = E_D[ f(sum_k m_k E_{D_k}) ] = sum over the E!/(E-K)! ordered tuples of P(D) f(y(D)).
The mask is frozen at z (it is piecewise constant, so this is the derivative almost everywhere). `exact_gradient`
differentiates the enumerated sum with autodiff; tests check it against central finite differences in float64.

Which objective each estimator is measured against (the reference `g`):
  sparsemixer_v2       J_{1,inf}: its own sampling distribution (softmax(z)) and its intended forward weight
                       pi_D (the c factor is a numerical-integration device: at eval there is no c), without the
                       mask (the mask is one of the things under study). `bias_masked` in the study also compares it
                       with J_{1,eps} (its own masked distribution), which isolates the estimator's own error.
  sparsemixer_v2_star  J_{2,inf} = J_{1,inf}(z / 2): it samples from softmax(z / 2). (Also J_{2,eps} as above.)
  gshard               J_{1,inf}. GShard / Mixtral is deterministic and optimises f(top-k softmax mixture), a
                       different objective; it is compared with the same sampled-mixture objective as the others.
  st_gumbel            J_{1,inf}.
  reinforce            J_{1,inf} (unbiased for it by construction).
Every study row also reports the cosine to the gradient of J_{1,inf} ('cos_T1'), the same for all rows.

The estimators (each returns per-row gradient samples w.r.t. z; rows are independent draws)
-------------------------------------------------------------------------------------------
sparsemixer_v2 (GRIN Algorithm 1, what GRIN-MoE was trained with and PhiMoE implements): the project's shipped
  `grin_jax.moe.sparsemixer.sparsemixer_v2(training=True)`, differentiated through its custom_vjp. Per slot:
  D ~ pi = MaskedSoftmax(z); forward weight c * pi_D with c = 1 if D is the slot's argmax, else c = 1 with
  probability 1/4 (u > 0.75) and 0.3333 otherwise; backward dL/dz = (dL/dm) pi_D (onehot(D) - pi).
sparsemixer_v2_star (GRIN Algorithm 2, the corrected derivation; implemented here, `sparsemixer_v2_star`). It differs
  from v2 in exactly three places:
    1. temperature 2: D ~ pi* = MaskedSoftmax(z / 2), and the gate is h = pi*_D E_D;
    2. the Bernoulli rate: c = 1 with probability 5/8 (u > 3/8) for a non-argmax pick, 1/3 otherwise (v2: 1/4);
    3. the factor 2: forward y = 2h + sg(c h - 2h) (value c h, gradient 2 dh); v2 is y = h + sg(c h - h).
  Because d pi*_D / dz = pi*_D (onehot(D) - pi*) / 2, the factor 2 and the temperature cancel in the backward
  formula: v2*'s rule is v2's rule with pi -> pi* and rate 1/4 -> 5/8.
gshard: top-k of softmax(z) over all experts, renormalised over the k picked (Mixtral), ordinary autodiff, no noise.
  For K = 1 renormalisation makes the weight identically 1 and the router gradient zero, so K = 1 uses the
  unrenormalised weight (Switch). Mirrors the project's `topk_softmax` router (written out here so the study does
  not depend on the router registry's interface).
st_gumbel (straight-through Gumbel-softmax, temperature tau): one Gumbel vector g; D = top-K of z + g (Gumbel-top-k,
  exactly sequential sampling without replacement from softmax(z)); slot k's soft relaxation
  s_k = softmax((z + g) / tau) over the experts not yet picked. Combine weights
  w_k = pi_k * (onehot(D_k) + s_k - sg(s_k)): forward value pi_k[D_k] at D_k (the exact sample), backward through
  pi_k at D_k (pathwise) and through s_k for all experts (straight-through; needs every expert's output).
reinforce (score function, leave-one-out baseline, n >= 2 tuples per estimate): for tuples D^1..D^n ~ P(.; z) iid,
  g = 1/n sum_j [ (f_j - b_j) grad log P(D^j; z) + grad_z f(y(D^j; z)) ],  b_j = mean of f over the other n - 1
  tuples. The second term is the pathwise gradient through the gate values m_k(z). Unbiased for J_{1,inf}; costs n
  forward passes.

Theory checked by the tests (one slot, K = 1, a = argmax, x_i = p_i E_i, p = MaskedSoftmax(z / T), grad p_i =
p_i (e_i - p) / T):
  exact   grad J = sum_i [ f(x_i) - f(0) + <f'(x_i), x_i> ] grad p_i          (sum_i grad p_i = 0 lets f(0) in)
  v2      E[g] = sum_{i!=a} p_i [1/4 <f'(x_i), E_i> + 3/4 <f'(x_i/3), E_i>] grad p_i + <f'(x_a), x_a> grad p_a
               (`midpoint_expectation`, with c = 1/3 exactly; the shipped 0.3333 moves it by ~1e-4 relative)
          For quadratic f Heun's rule is exact, 1/4 f'(x) + 3/4 f'(x/3) integrates f' over [0, x], so the
          non-argmax terms equal [f(x_i) - f(0)] grad p_i: the gradient of sum_i p_i f(sg(p_i) E_i), i.e. only the
          sampling half of grad J (the <f'(x_i), x_i> half is missing; to first order both halves are equal, so v2
          is about half the exact gradient). The argmax term is first order.
  v2*     E[g] = sum_{i!=a} 2 p_i [5/8 <f'(x_i), E_i> + 3/8 <f'(x_i/3), E_i>] grad p_i + 2 <f'(x_a), x_a> grad p_a
          (T = 2): for quadratic f the non-argmax terms are exactly those of grad J_{2,.}; the argmax term is first
          order.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grin_jax.moe import sparsemixer as _sm

HEADS = ("quad", "ce")
ESTIMATORS = ("sparsemixer_v2", "sparsemixer_v2_star", "gshard", "st_gumbel", "reinforce")
# Which estimators have a finite outcome set (exact moments by enumeration) and which need Monte Carlo.
ENUMERABLE = ("sparsemixer_v2", "sparsemixer_v2_star", "gshard")
MONTE_CARLO = ("st_gumbel", "reinforce")
MASKED = ("sparsemixer_v2", "sparsemixer_v2_star")  # the estimators that take jitter_eps

V2_KEEP_PROB = 0.25  # P(c = 1) for a non-argmax pick: u > 0.75 in the shipped code
V2_STAR_KEEP_PROB = 5 / 8  # Algorithm 2: B ~ Bernoulli(5/8), u > 3/8 here
V2_STAR_TEMPERATURE = 2.0
V2_STAR_FACTOR = 2.0
_FORCE = 1.0e4  # Gumbel value that forces a pick when replaying an enumerated outcome through the sampling code


class Problem(NamedTuple):
    """One toy MoE problem (a pytree; a leading axis N makes a batch of problems).

    logits: z [E]; experts: E_i [E, d]; target: t [d] (quad head); readout: W [C, d] and label: int32 [] (ce head).
    """

    logits: jax.Array
    experts: jax.Array
    target: jax.Array
    readout: jax.Array
    label: jax.Array


def make_problems(key, num: int, *, num_experts: int = 8, dim: int = 4, num_classes: int = 5, scale: float = 1.0,
                  dtype=None) -> Problem:
    """`num` random problems (batched Problem): z ~ N(0, scale^2), E_i, t ~ N(0, 1), W ~ N(0, 4 / d), label uniform."""
    if not 2 <= num_experts <= 8:
        raise ValueError(f"num_experts={num_experts} is invalid: accepted values are 2..8 (enumeration)")
    dtype = dtype or jnp.result_type(float)
    kz, ke, kt, kw, kl = jax.random.split(key, 5)
    return Problem(
        logits=scale * jax.random.normal(kz, (num, num_experts), dtype),
        experts=jax.random.normal(ke, (num, num_experts, dim), dtype),
        target=jax.random.normal(kt, (num, dim), dtype),
        readout=(2.0 / math.sqrt(dim)) * jax.random.normal(kw, (num, num_classes, dim), dtype),
        label=jax.random.randint(kl, (num,), 0, num_classes, jnp.int32),
    )


def index_problem(problems: Problem, n: int) -> Problem:
    return jax.tree_util.tree_map(lambda a: a[n], problems)


def head_loss(head: str, y: jax.Array, problem: Problem) -> jax.Array:
    """f(y) for one output y [d]."""
    if head == "quad":
        return 0.5 * jnp.sum((y - problem.target) ** 2)
    if head == "ce":
        scores = problem.readout @ y
        return jax.nn.logsumexp(scores) - scores[problem.label]
    raise ValueError(f"head={head!r} is unknown: accepted values are {HEADS}")


def _rows_loss(head: str, y_RD: jax.Array, problem: Problem) -> jax.Array:
    return jax.vmap(lambda y: head_loss(head, y, problem))(y_RD)


# ------------------------------------------------------------------------------------------------------------------
# Exact objective by enumeration
# ------------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def ordered_tuples(num_experts: int, top_k: int) -> np.ndarray:
    """All ordered K-tuples of distinct experts: [E!/(E-K)!, K] int32."""
    return np.array(list(itertools.permutations(range(num_experts), top_k)), dtype=np.int32).reshape(-1, top_k)


def _keep(z_E: jax.Array, remaining_RE: jax.Array, jitter_eps: float) -> jax.Array:
    """The project's mask (no gradient); eps = inf keeps every expert not yet picked."""
    if math.isinf(jitter_eps):
        return remaining_RE > -jnp.inf
    return _sm.sparsity_mask(jnp.broadcast_to(z_E, remaining_RE.shape), remaining_RE, jitter_eps)


def tuple_probs_and_weights(z_E: jax.Array, tuples_PK, *, temperature: float = 1.0, jitter_eps: float = math.inf):
    """P(D) [P] and slot weights m_k = pi_k[D_k] [P, K] of each ordered tuple (module docstring); differentiable
    in z."""
    tuples_PK = jnp.asarray(tuples_PK)
    num_tuples, top_k = tuples_PK.shape
    num_experts = z_E.shape[-1]
    remaining_PE = jnp.broadcast_to(z_E, (num_tuples, num_experts))
    probs_P = jnp.ones((num_tuples,), z_E.dtype)
    weights = []
    for k in range(top_k):
        keep_PE = _keep(z_E, remaining_PE, jitter_eps)
        pi_PE = jax.nn.softmax(jnp.where(keep_PE, remaining_PE / temperature, -jnp.inf), axis=-1)
        m_P = jnp.take_along_axis(pi_PE, tuples_PK[:, k:k + 1], axis=-1)[:, 0]
        probs_P = probs_P * m_P
        weights.append(m_P)
        picked_PE = jax.nn.one_hot(tuples_PK[:, k], num_experts, dtype=bool)
        remaining_PE = jnp.where(picked_PE, -jnp.inf, remaining_PE)
    return probs_P, jnp.stack(weights, axis=-1)


def _outputs(weights_PK, tuples_PK, experts_ED):
    return jnp.einsum("pk,pkd->pd", weights_PK, experts_ED[jnp.asarray(tuples_PK)])


def expected_loss(z_E, problem: Problem, *, head: str, top_k: int, temperature: float = 1.0,
                  jitter_eps: float = math.inf) -> jax.Array:
    """J_{T,eps}(z) = sum over ordered tuples of P(D) f(y(D)) (module docstring)."""
    tuples_PK = ordered_tuples(z_E.shape[-1], top_k)
    probs_P, weights_PK = tuple_probs_and_weights(z_E, tuples_PK, temperature=temperature, jitter_eps=jitter_eps)
    return jnp.sum(probs_P * _rows_loss(head, _outputs(weights_PK, tuples_PK, problem.experts), problem))


def exact_gradient(problem: Problem, *, head: str, top_k: int, temperature: float = 1.0,
                   jitter_eps: float = math.inf) -> jax.Array:
    """grad_z J_{T,eps}(z) [E] (mask frozen at z)."""
    return jax.grad(expected_loss)(problem.logits, problem, head=head, top_k=top_k, temperature=temperature,
                                   jitter_eps=jitter_eps)


# ------------------------------------------------------------------------------------------------------------------
# One-slot theory (K = 1)
# ------------------------------------------------------------------------------------------------------------------

def _one_slot_terms(problem: Problem, head: str, temperature: float, jitter_eps: float):
    z = problem.logits
    keep = _keep(z, z[None], jitter_eps)[0]
    p = jax.nn.softmax(jnp.where(keep, z / temperature, -jnp.inf))
    grad_p_EE = (p[:, None] * (jnp.eye(z.shape[-1], dtype=z.dtype) - p[None, :])) / temperature  # row i: grad p_i
    fprime = jax.grad(lambda y: head_loss(head, y, problem))
    argmax = jnp.argmax(z)
    return p, grad_p_EE, fprime, argmax


def midpoint_expectation(problem: Problem, *, head: str, keep_prob: float = V2_KEEP_PROB, factor: float = 1.0,
                         temperature: float = 1.0, jitter_eps: float = math.inf, small_c: float = 1 / 3) -> jax.Array:
    """E[g] of a one-slot SparseMixer-type estimator (K = 1), in closed form:
        sum_i factor p_i E_c<f'(c p_i E_i), E_i> grad p_i,   c = 1 for the argmax; otherwise 1 w.p. keep_prob,
        small_c w.p. 1 - keep_prob.
    v2: keep_prob 1/4, factor 1, T 1. v2*: keep_prob 5/8, factor 2, T 2."""
    p, grad_p_EE, fprime, argmax = _one_slot_terms(problem, head, temperature, jitter_eps)
    E_ED = problem.experts

    def coef(i):
        x = p[i] * E_ED[i]
        full = jnp.dot(fprime(x), E_ED[i])
        mixed = keep_prob * full + (1 - keep_prob) * jnp.dot(fprime(small_c * x), E_ED[i])
        return factor * p[i] * jnp.where(i == argmax, full, mixed)

    coefs = jax.vmap(coef)(jnp.arange(p.shape[0]))
    return coefs @ grad_p_EE


def heun_target(problem: Problem, *, head: str, temperature: float = 1.0, jitter_eps: float = math.inf,
                include_weight_path: bool = False) -> jax.Array:
    """The vector the one-slot theory says a SparseMixer-type estimator equals for quadratic f:
        sum_{i != a} [f(x_i) - f(0) (+ <f'(x_i), x_i> if include_weight_path)] grad p_i
        + (1 or 2) <f'(x_a), x_a> grad p_a.
    include_weight_path=False is v2's claim (the non-argmax terms are the gradient of sum_i p_i f(sg(p_i) E_i));
    True is v2*'s (the non-argmax terms are those of the exact gradient; argmax term doubled)."""
    p, grad_p_EE, fprime, argmax = _one_slot_terms(problem, head, temperature, jitter_eps)
    E_ED = problem.experts
    f0 = head_loss(head, jnp.zeros_like(E_ED[0]), problem)

    def coef(i):
        x = p[i] * E_ED[i]
        path = jnp.dot(fprime(x), x)
        sample = head_loss(head, x, problem) - f0
        non_argmax = sample + path if include_weight_path else sample
        return jnp.where(i == argmax, (2.0 if include_weight_path else 1.0) * path, non_argmax)

    coefs = jax.vmap(coef)(jnp.arange(p.shape[0]))
    return coefs @ grad_p_EE


def exact_gradient_one_slot(problem: Problem, *, head: str, temperature: float = 1.0,
                            jitter_eps: float = math.inf) -> jax.Array:
    """grad J_{T,eps} for K = 1 in closed form: sum_i [f(x_i) - f(0) + <f'(x_i), x_i>] grad p_i."""
    p, grad_p_EE, fprime, _ = _one_slot_terms(problem, head, temperature, jitter_eps)
    E_ED = problem.experts
    f0 = head_loss(head, jnp.zeros_like(E_ED[0]), problem)

    def coef(i):
        x = p[i] * E_ED[i]
        return head_loss(head, x, problem) - f0 + jnp.dot(fprime(x), x)

    return jax.vmap(coef)(jnp.arange(p.shape[0])) @ grad_p_EE


# ------------------------------------------------------------------------------------------------------------------
# Routers as combine matrices: y_r = C_r @ experts, C [R, E]
# ------------------------------------------------------------------------------------------------------------------

def _dense(ids_RK, weights_RK, num_experts):
    return jnp.einsum("rk,rke->re", weights_RK, jax.nn.one_hot(ids_RK, num_experts, dtype=weights_RK.dtype))


def sparsemixer_v2_star(logits_TE, *, top_k: int = 2, jitter_eps: float = 0.01, rng=None, gumbel_KTE=None,
                        uniform_KT=None):
    """v2* (GRIN Algorithm 2), training only; the same interface and noise conventions as the shipped
    `sparsemixer_v2` (module docstring: temperature 2, rate 5/8, factor 2). Returns (ids [T, K], weights [T, K])."""
    num_tokens, num_experts = logits_TE.shape
    dtype = logits_TE.dtype
    if gumbel_KTE is None or uniform_KT is None:
        key_g, key_u = jax.random.split(rng)
        if gumbel_KTE is None:
            gumbel_KTE = jax.random.gumbel(key_g, (top_k, num_tokens, num_experts), dtype)
        if uniform_KT is None:
            uniform_KT = jax.random.uniform(key_u, (top_k, num_tokens), dtype)
    z_TE = logits_TE
    remaining_TE = z_TE
    ids, weights = [], []
    for slot in range(top_k):
        keep_TE = _keep_rows(z_TE, remaining_TE, jitter_eps)  # scale-invariant: the mask of z/2 is the mask of z
        scaled_TE = jnp.where(keep_TE, remaining_TE / V2_STAR_TEMPERATURE, -jnp.inf)
        picked_T = jnp.argmax(jax.lax.stop_gradient(scaled_TE) + gumbel_KTE[slot], axis=-1)
        onehot_TE = jax.nn.one_hot(picked_T, num_experts, dtype=dtype)
        pi_TE = jax.nn.softmax(scaled_TE, axis=-1)
        p_T = jnp.sum(pi_TE * onehot_TE, axis=-1)
        is_argmax_T = picked_T == jnp.argmax(jax.lax.stop_gradient(pi_TE), axis=-1)
        one_T = jnp.logical_or(is_argmax_T, uniform_KT[slot] > 1 - V2_STAR_KEEP_PROB)
        c_T = jnp.where(one_T, 1.0, 1.0 / 3.0).astype(dtype)
        h_T = V2_STAR_FACTOR * p_T
        weights.append(h_T + jax.lax.stop_gradient(c_T * p_T - h_T))
        ids.append(picked_T.astype(jnp.int32))
        remaining_TE = jnp.where(onehot_TE > 0, -jnp.inf, remaining_TE)
    return jnp.stack(ids, axis=-1), jnp.stack(weights, axis=-1)


def _keep_rows(z_TE, remaining_TE, jitter_eps):
    if math.isinf(jitter_eps):
        return remaining_TE > -jnp.inf
    return _sm.sparsity_mask(z_TE, remaining_TE, jitter_eps)


def sparsemixer_v2_shipped(logits_TE, *, top_k: int, jitter_eps: float, rng=None, gumbel_KTE=None,
                           uniform_KT=None):
    """The shipped SparseMixer-v2 (training): (ids [T, K], weights [T, K])."""
    ids_TK, weights_TK, _ = _sm.sparsemixer_v2(logits_TE, top_k=top_k, jitter_eps=jitter_eps, training=True,
                                               rng=rng, gumbel_KTE=gumbel_KTE, uniform_KT=uniform_KT)
    return ids_TK, weights_TK


_SPARSEMIXERS = {"sparsemixer_v2": (sparsemixer_v2_shipped, V2_KEEP_PROB, 1.0),
                 "sparsemixer_v2_star": (sparsemixer_v2_star, V2_STAR_KEEP_PROB, V2_STAR_TEMPERATURE)}


def gshard_combine(logits_TE, *, top_k: int):
    """Top-k of softmax(z), renormalised for K >= 2 (GShard / Mixtral), unrenormalised for K = 1 (Switch)."""
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    top_TK, ids_TK = jax.lax.top_k(probs_TE, top_k)
    if top_k > 1:
        top_TK = top_TK / jnp.sum(top_TK, axis=-1, keepdims=True)
    return _dense(ids_TK, top_TK, logits_TE.shape[-1])


def st_gumbel_combine(logits_TE, *, top_k: int, tau: float, rng=None, gumbel_TE=None):
    """Straight-through Gumbel-softmax combine matrix (module docstring)."""
    if gumbel_TE is None:
        gumbel_TE = jax.random.gumbel(rng, logits_TE.shape, logits_TE.dtype)
    num_experts = logits_TE.shape[-1]
    perturbed_TE = logits_TE + gumbel_TE
    remaining_TE = logits_TE
    combine_TE = jnp.zeros_like(logits_TE)
    for _ in range(top_k):
        picked_T = jnp.argmax(jax.lax.stop_gradient(perturbed_TE), axis=-1)
        hard_TE = jax.nn.one_hot(picked_T, num_experts, dtype=logits_TE.dtype)
        soft_TE = jax.nn.softmax(perturbed_TE / tau, axis=-1)
        pi_TE = jax.nn.softmax(remaining_TE, axis=-1)
        combine_TE = combine_TE + pi_TE * (hard_TE + soft_TE - jax.lax.stop_gradient(soft_TE))
        perturbed_TE = jnp.where(hard_TE > 0, -jnp.inf, perturbed_TE)
        remaining_TE = jnp.where(hard_TE > 0, -jnp.inf, remaining_TE)
    return combine_TE


def _row_gradients(combine_fn: Callable, problem: Problem, head: str, num_rows: int) -> jax.Array:
    """grad of sum_r f(C_r(z_r) @ experts) w.r.t. the replicated logits z_r: row r is the sample of row r."""
    z_RE = jnp.broadcast_to(problem.logits, (num_rows, problem.logits.shape[-1]))

    def total(logits_RE):
        return jnp.sum(_rows_loss(head, combine_fn(logits_RE) @ problem.experts, problem))

    return jax.grad(total)(z_RE)


def _log_prob_tuples(z_E, tuples_NK):
    """log P(D) under sequential sampling without replacement from softmax(z) (no mask), [N]."""
    num_experts = z_E.shape[-1]
    remaining_NE = jnp.broadcast_to(z_E, (tuples_NK.shape[0], num_experts))
    logp_N = jnp.zeros((tuples_NK.shape[0],), z_E.dtype)
    for k in range(tuples_NK.shape[1]):
        ls_NE = jax.nn.log_softmax(remaining_NE, axis=-1)
        logp_N = logp_N + jnp.take_along_axis(ls_NE, tuples_NK[:, k:k + 1], axis=-1)[:, 0]
        remaining_NE = jnp.where(jax.nn.one_hot(tuples_NK[:, k], num_experts, dtype=bool), -1e30, remaining_NE)
    return logp_N


def reinforce_gradients(problem: Problem, key, *, head: str, top_k: int, num_rows: int, num_inner: int = 2):
    """REINFORCE with a leave-one-out baseline over num_inner iid tuples per estimate: [num_rows, E]."""
    if num_inner < 2:
        raise ValueError(f"num_inner={num_inner} is invalid: the leave-one-out baseline needs >= 2")
    z_E = problem.logits
    num_experts = z_E.shape[-1]

    def one(k):
        g_NE = jax.random.gumbel(k, (num_inner, num_experts), z_E.dtype)
        tuples_NK = jax.lax.top_k(jax.lax.stop_gradient(z_E) + g_NE, top_k)[1]  # Gumbel-top-k

        def surrogate(z):
            _, weights_NK = tuple_probs_and_weights(z, tuples_NK)
            f_N = _rows_loss(head, _outputs(weights_NK, tuples_NK, problem.experts), problem)
            fs_N = jax.lax.stop_gradient(f_N)
            baseline_N = (jnp.sum(fs_N) - fs_N) / (num_inner - 1)
            return jnp.mean((fs_N - baseline_N) * _log_prob_tuples(z, tuples_NK) + f_N)

        return jax.grad(surrogate)(z_E)

    return jax.vmap(one)(jax.random.split(key, num_rows))


# ------------------------------------------------------------------------------------------------------------------
# Estimators: samples (a PRNG key in, gradient samples out) and exact outcome sets
# ------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """Estimator settings: jitter_eps (v2, v2*), tau (st_gumbel), num_inner (reinforce)."""

    jitter_eps: float = 0.01
    tau: float = 1.0
    num_inner: int = 2


def reference_temperature(name: str) -> float:
    """The temperature of the objective an estimator is compared with (module docstring)."""
    return V2_STAR_TEMPERATURE if name == "sparsemixer_v2_star" else 1.0


def estimator_samples(name: str, problem: Problem, key, *, head: str, top_k: int, num_samples: int,
                      settings: Settings = Settings()) -> jax.Array:
    """num_samples independent gradient samples w.r.t. z, [num_samples, E], from the estimator's own random draws."""
    num_experts = problem.logits.shape[-1]
    if name in _SPARSEMIXERS:
        router = _SPARSEMIXERS[name][0]

        def combine(logits_RE):
            ids_RK, weights_RK = router(logits_RE, top_k=top_k, jitter_eps=settings.jitter_eps, rng=key)
            return _dense(ids_RK, weights_RK, num_experts)

        return _row_gradients(combine, problem, head, num_samples)
    if name == "gshard":
        return _row_gradients(functools.partial(gshard_combine, top_k=top_k), problem, head, num_samples)
    if name == "st_gumbel":
        return _row_gradients(functools.partial(st_gumbel_combine, top_k=top_k, tau=settings.tau, rng=key),
                              problem, head, num_samples)
    if name == "reinforce":
        return reinforce_gradients(problem, key, head=head, top_k=top_k, num_rows=num_samples,
                                   num_inner=settings.num_inner)
    raise ValueError(f"estimator={name!r} is unknown: accepted values are {ESTIMATORS}")


@functools.lru_cache(maxsize=None)
def _outcome_table(num_experts: int, top_k: int):
    """Every (tuple, bits) outcome of a SparseMixer-type router: tuple ids [R, K] and Bernoulli bits [R, K]."""
    tuples_PK = ordered_tuples(num_experts, top_k)
    bits_QK = np.array(list(itertools.product((0, 1), repeat=top_k)), dtype=np.int32)
    ids_RK = np.repeat(tuples_PK, len(bits_QK), axis=0)
    bits_RK = np.tile(bits_QK, (len(tuples_PK), 1))
    return ids_RK, bits_RK


def estimator_outcomes(name: str, problem: Problem, *, head: str, top_k: int, settings: Settings = Settings()):
    """The estimator's complete outcome set: probabilities [R], gradient samples [R, E], the ids the router picked
    [R, K] and the ids it was forced to [R, K] (equal wherever the probability is > 0).

    SparseMixer-type estimators: every ordered tuple x every Bernoulli outcome, replayed through the router with
    explicit noise (a Gumbel vector that is _FORCE at the wanted expert and 0 elsewhere, u = 0.9 for B = 1 and
    u = 0.1 for B = 0); probability P(D) * prod_k P(B_k). GShard: one outcome of probability 1."""
    z_E = problem.logits
    num_experts = z_E.shape[-1]
    if name == "gshard":
        grads = estimator_samples(name, problem, None, head=head, top_k=top_k, num_samples=1, settings=settings)
        ids = jax.lax.top_k(z_E, top_k)[1][None].astype(jnp.int32)
        return jnp.ones((1,), z_E.dtype), grads, ids, ids
    if name not in _SPARSEMIXERS:
        raise ValueError(f"estimator={name!r} has no finite outcome set: accepted values are {ENUMERABLE}")
    router, keep_prob, temperature = _SPARSEMIXERS[name]
    ids_RK, bits_RK = _outcome_table(num_experts, top_k)
    num_rows = ids_RK.shape[0]
    gumbel_KRE = jnp.asarray(_FORCE * np.moveaxis(np.eye(num_experts)[ids_RK], 1, 0), z_E.dtype)
    uniform_KR = jnp.asarray(np.where(bits_RK, 0.9, 0.1).T, z_E.dtype)
    probs_R, _ = tuple_probs_and_weights(jax.lax.stop_gradient(z_E), ids_RK, temperature=temperature,
                                         jitter_eps=settings.jitter_eps)
    probs_R = probs_R * jnp.prod(jnp.asarray(np.where(bits_RK, keep_prob, 1 - keep_prob), z_E.dtype), axis=-1)

    def combine(logits_RE):
        ids, weights = router(logits_RE, top_k=top_k, jitter_eps=settings.jitter_eps, gumbel_KTE=gumbel_KRE,
                              uniform_KT=uniform_KR)
        return _dense(ids, weights, num_experts)

    grads_RE = _row_gradients(combine, problem, head, num_rows)
    z_RE = jnp.broadcast_to(z_E, (num_rows, num_experts))
    ids_picked = router(z_RE, top_k=top_k, jitter_eps=settings.jitter_eps, gumbel_KTE=gumbel_KRE,
                        uniform_KT=uniform_KR)[0]
    return probs_R, grads_RE, ids_picked, jnp.asarray(ids_RK)


# ------------------------------------------------------------------------------------------------------------------
# Moments and metrics
# ------------------------------------------------------------------------------------------------------------------

class Moments(NamedTuple):
    mean: jax.Array  # [E]
    var_trace: jax.Array  # [] trace of the covariance of one sample
    num_samples: int  # 0 = exact (enumeration)


def exact_moments(name: str, problem: Problem, *, head: str, top_k: int, settings: Settings = Settings()) -> Moments:
    probs_R, grads_RE, _, _ = estimator_outcomes(name, problem, head=head, top_k=top_k, settings=settings)
    mean = probs_R @ grads_RE
    var = probs_R @ jnp.sum((grads_RE - mean) ** 2, axis=-1)
    return Moments(mean, var, 0)


def sample_moments(samples_NE: jax.Array) -> Moments:
    n = samples_NE.shape[0]
    mean = jnp.mean(samples_NE, axis=0)
    var = jnp.sum(jnp.var(samples_NE, axis=0, ddof=1))
    return Moments(mean, var, n)


def metrics(moments: Moments, reference: jax.Array, unit: jax.Array | None = None) -> dict:
    """bias = ||E g - g*|| / ||g*||, var = tr Cov(g) / ||g*||^2, cos(E g, g*) (0 when E g = 0 or g* = 0),
    norm_ratio = ||E g|| / ||g*||, noise = tr Cov(g) / ||E g||^2 (scale-free: variance per unit of the estimator's
    own mean; NaN when E g = 0), and for Monte Carlo moments the bias noise floor sqrt(var / N) (0 for exact
    moments). `unit` replaces ||g*|| as the normaliser (the study measures the error against a masked objective, whose
    gradient can be 0, in units of the unmasked gradient's norm)."""
    ref_norm = jnp.linalg.norm(reference) if unit is None else unit
    mean_norm = jnp.linalg.norm(moments.mean)
    dot = jnp.dot(moments.mean, reference)
    cos = jnp.where(dot != 0, dot / (mean_norm * jnp.linalg.norm(reference) + 1e-300), 0.0)
    var = moments.var_trace / ref_norm ** 2
    floor = jnp.sqrt(var / moments.num_samples) if moments.num_samples else jnp.zeros_like(var)
    noise = jnp.where(mean_norm > 0, moments.var_trace / jnp.where(mean_norm > 0, mean_norm, 1.0) ** 2, jnp.nan)
    return {"bias": jnp.linalg.norm(moments.mean - reference) / ref_norm, "var": var, "cos": cos,
            "norm_ratio": mean_norm / ref_norm, "bias_floor": floor, "noise": noise}


STUDY_METRICS = ("bias", "var", "cos", "norm_ratio", "noise", "bias_floor", "bias_masked", "cos_masked",
                 "cos_T1")


@functools.lru_cache(maxsize=None)
def _study_fn(name: str, head: str, top_k: int, settings: Settings, mc_samples: int):
    temperature = reference_temperature(name)

    def one(problem, key):
        if name in ENUMERABLE:
            moments = exact_moments(name, problem, head=head, top_k=top_k, settings=settings)
        else:
            samples = estimator_samples(name, problem, key, head=head, top_k=top_k, num_samples=mc_samples,
                                        settings=settings)
            moments = sample_moments(samples)
        ref = exact_gradient(problem, head=head, top_k=top_k, temperature=temperature)
        out = metrics(moments, ref)
        eps = settings.jitter_eps if name in MASKED else math.inf
        masked = metrics(moments, exact_gradient(problem, head=head, top_k=top_k, temperature=temperature,
                                                 jitter_eps=eps), unit=jnp.linalg.norm(ref))
        out["bias_masked"], out["cos_masked"] = masked["bias"], masked["cos"]
        out["cos_T1"] = metrics(moments, exact_gradient(problem, head=head, top_k=top_k))["cos"]
        return out

    return jax.jit(jax.vmap(one))


def study_metrics(name: str, problems: Problem, keys, *, head: str, top_k: int, settings: Settings = Settings(),
                  mc_samples: int = 4000) -> dict:
    """Every metric of one estimator configuration on a batch of problems: {metric: [N]} (numpy).

    Moments are exact (enumeration) for ENUMERABLE estimators and from `mc_samples` draws (key n for problem n)
    otherwise. Reference: the gradient of the estimator's own objective without mask (`reference_temperature`).
    Extra entries: 'bias_masked' / 'cos_masked' against its own masked objective J_{T,eps} (the error is in units of
    the unmasked gradient's norm), 'cos_T1' against J_{1,inf}."""
    out = _study_fn(name, head, top_k, settings, mc_samples)(problems, keys)
    return {k: np.asarray(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------------------------
# Candidates per token (the mask) on random logits
# ------------------------------------------------------------------------------------------------------------------

def candidate_stats(key, *, num_tokens: int, num_experts: int, jitter_eps: float, scale: float = 1.0,
                    top_k: int = 2) -> dict:
    """Run the shipped router on z ~ N(0, scale^2) [T, E]: histogram of slot-1 candidates (experts with nonzero
    masked-softmax probability) [E + 1], and the fraction of tokens whose router gets a task-loss gradient (some slot
    has >= 2 candidates). The mask ratio (z* - z_i) / max(|z_i|, z*) is scale-invariant, so neither depends on
    `scale` (except through softmax underflow)."""
    k_z, k_r = jax.random.split(key)
    z_TE = scale * jax.random.normal(k_z, (num_tokens, num_experts), jnp.float32)
    _, _, cands_KT = _sm.sparsemixer_v2(z_TE, top_k=top_k, jitter_eps=jitter_eps, training=True, rng=k_r)
    hist = jnp.bincount(cands_KT[0], length=num_experts + 1)
    return {"slot1_hist": np.asarray(hist) / num_tokens,
            "grad_fraction": float(jnp.mean(jnp.any(cands_KT >= 2, axis=0))),
            "mean_slot1_candidates": float(jnp.mean(cands_KT[0]))}
