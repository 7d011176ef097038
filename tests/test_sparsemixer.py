"""SparseMixer-v2 (grin_jax/moe/sparsemixer.py) against the reference implementation.

1. Exact replay of transformers' PhiMoE `sparsemixer` (torch, CPU): the torch random draws are replayed as explicit
   Gumbel / uniform inputs (docs/sparsemixer.md#replaying-transformers-random-draws), selections must be identical,
   weights and logit gradients equal to 1e-6 (float32) / 1e-12 (float64), in training and eval, over several logit
   regimes and jitter eps values.
2. An independent NumPy implementation of docs/sparsemixer.md (any top_k, closed-form backward rule).
3. Statistics of the sampled path (fixed seeds; each bound is a test with false-alarm probability <= 1e-6).

Axes: T tokens, E experts, K slots.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from grin_jax.moe.sparsemixer import sparsemixer_v2

import torch
from transformers.models.phimoe import modeling_phimoe as phimoe

# A bound that fails by chance with probability <= ALPHA (per check).
ALPHA = 1e-6
C_SMALL = np.float32(0.3333)  # the reference's c for a non-argmax pick that fails the u > 0.75 draw


# ----------------------------------------------------------------------------------------------------------------
# NumPy reference of docs/sparsemixer.md (written from the text, not from the JAX code)
# ----------------------------------------------------------------------------------------------------------------

def np_softmax(x):
    top = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - top)
    return e / np.sum(e, axis=-1, keepdims=True)


def np_slot_mask(z, remaining, eps):
    """Kept experts of one slot: (z'* - z_i) / max(|z_i|, z'*) <= 2 eps (0/0 kept), minus earlier picks."""
    top = np.max(remaining, axis=-1, keepdims=True)
    factor = np.maximum(np.abs(z), top)
    with np.errstate(divide="ignore", invalid="ignore"):
        dropped = (top - z) / factor > 2 * eps
    return ~dropped & (remaining > -np.inf)


def np_sparsemixer(z, *, eps, training, top_k, gumbel=None, uniform=None):
    """Returns ids [T,K], weights [T,K], per-slot (pi [T,E], m_o [T], c [T]) and the candidate counts [K,T]."""
    T, E = z.shape
    remaining = z.copy()
    ids, weights, slots, cands = [], [], [], []
    rows = np.arange(T)
    for s in range(top_k):
        keep = np_slot_mask(z, remaining, eps)
        masked = np.where(keep, remaining, -np.inf)
        pick = np.argmax(masked + gumbel[s], axis=-1) if training else np.argmax(remaining, axis=-1)
        pi = np_softmax(masked)
        m_o = pi[rows, pick]
        if training:
            one = (pick == np.argmax(pi, axis=-1)) | (uniform[s] > 0.75)
            c = (np.float32(0.3333) + np.float32(0.6667) * one.astype(np.float32)).astype(z.dtype)
        else:
            c = np.ones(T, z.dtype)
        ids.append(pick)
        weights.append(c * m_o)
        slots.append((pi, m_o, c))
        # candidates: kept experts with nonzero probability (the mask count unless the softmax underflows)
        cands.append(np.sum(keep & (pi > 0), axis=-1))
        remaining = remaining.copy()
        remaining[rows, pick] = -np.inf
    return np.stack(ids, -1), np.stack(weights, -1), slots, np.stack(cands)


def np_closed_form_grad(ids, slots, cot):
    """dL/dz = sum_s g_s * m_o_s * (onehot(D_s) - pi_s): the custom rule in training, plain autodiff in eval."""
    T, E = slots[0][0].shape
    grad = np.zeros((T, E), slots[0][0].dtype)
    for s, (pi, m_o, _) in enumerate(slots):
        onehot = np.eye(E, dtype=pi.dtype)[ids[:, s]]
        grad += (cot[:, s] * m_o)[:, None] * (onehot - pi)
    return grad


def _weights_and_grad(z, cot, gumbel, uniform, rng, *, top_k, jitter_eps, training):
    def f(zz):
        ids, w, cands = sparsemixer_v2(zz, top_k=top_k, jitter_eps=jitter_eps, training=training, rng=rng,
                                       gumbel_KTE=gumbel, uniform_KT=uniform)
        return w, (ids, cands)
    w, vjp, (ids, cands) = jax.vjp(f, z, has_aux=True)
    (dz,) = vjp(cot)
    return ids, w, cands, dz


_jitted_weights_and_grad = jax.jit(_weights_and_grad, static_argnames=("top_k", "jitter_eps", "training"))


def jax_weights_and_grad(z, cot, *, top_k, jitter_eps, training, gumbel_KTE=None, uniform_KT=None, rng=None,
                         jit=True):
    """(ids, weights, candidates, dL/dz) from the JAX implementation, L = sum(weights * cot).

    jit=False runs op by op (cached per primitive and shape: cheaper than one compilation per configuration)."""
    fn = _jitted_weights_and_grad if jit else _weights_and_grad
    out = fn(jnp.asarray(z), jnp.asarray(cot), gumbel_KTE, uniform_KT, rng, top_k=top_k, jitter_eps=jitter_eps,
             training=training)
    return tuple(np.asarray(o) for o in out)


# ----------------------------------------------------------------------------------------------------------------
# 1. Exact replay of transformers' PhiMoE sparsemixer
# ----------------------------------------------------------------------------------------------------------------

TOKENS_PER_REGIME = 256
REGIMES = ("normal", "near_ties", "offset_50", "times_1e3", "exact_ties")


def regime_logits(rs, num_experts):
    """[len(REGIMES) * 256, E] logits, one block of tokens per regime (routing is per token)."""
    T, E = TOKENS_PER_REGIME, num_experts
    blocks = {
        "normal": rs.randn(T, E),
        # many experts survive the mask: per-token centre, spread 1e-3
        "near_ties": rs.randn(T, 1) + 1e-3 * rs.rand(T, E),
        "offset_50": rs.randn(T, E) + 50.0,
        "times_1e3": rs.randn(T, E) * 1e3,
        # exact ties (first-index argmax), all-zero rows (the mask's 0/0 compares False: kept)
        "exact_ties": np.round(rs.randn(T, E) * 2) / 2 * (rs.rand(T, 1) < 0.8),
    }
    return np.concatenate([blocks[name] for name in REGIMES])


def torch_sparsemixer_with_noise(z, cot, *, eps, training, seed):
    """Run transformers' sparsemixer on z (torch autograd for dL/dz, L = sum(w * cot)), then replay its draws.

    torch draws, in order: exponential_ [T,E] (Gumbel = -log), rand [T,1], exponential_ [T,E], rand [T,1]
    (discarded: `rand_like(...).uniform_()` overwrites it), uniform_ [T,1]
    (docs/sparsemixer.md#replaying-transformers-random-draws)."""
    dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[z.dtype]
    z_t = torch.tensor(z, dtype=dtype, requires_grad=True)
    torch.manual_seed(seed)
    w_t, ids_t = phimoe.sparsemixer(z_t, eps, training)
    (w_t * torch.tensor(cot, dtype=dtype)).sum().backward()
    T, E = z.shape
    torch.manual_seed(seed)
    exp1 = torch.empty(T, E, dtype=dtype).exponential_()
    u1 = torch.rand(T, 1, dtype=dtype)
    exp2 = torch.empty(T, E, dtype=dtype).exponential_()
    torch.rand(T, 1, dtype=dtype)  # discarded by the reference
    u2 = torch.empty(T, 1, dtype=dtype).uniform_()
    gumbel_KTE = (-torch.stack([exp1, exp2]).log()).numpy()
    uniform_KT = torch.cat([u1, u2], dim=1).T.contiguous().numpy()
    return ids_t.numpy(), w_t.detach().numpy(), z_t.grad.numpy(), gumbel_KTE, uniform_KT


@pytest.mark.parametrize("num_experts", [8, 16])
@pytest.mark.parametrize("eps", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_transformers_phimoe_sparsemixer(num_experts, eps, dtype):
    tol = {"float32": 1e-6, "float64": 1e-12}[dtype]
    seed = 1000 * num_experts + int(eps * 100)
    rs = np.random.RandomState(seed)
    z = regime_logits(rs, num_experts).astype(dtype)
    T = z.shape[0]
    nonzero_grad_fraction = {}
    with jax.enable_x64(dtype == "float64"):
        for training in (True, False):
            cot = rs.randn(T, 2).astype(dtype)
            ids_t, w_t, dz_t, gumbel, uniform = torch_sparsemixer_with_noise(
                z, cot, eps=eps, training=training, seed=seed)
            ids, w, cands, dz = jax_weights_and_grad(
                z, cot, top_k=2, jitter_eps=eps, training=training, gumbel_KTE=jnp.asarray(gumbel),
                uniform_KT=jnp.asarray(uniform), jit=False)
            assert w.dtype == np.dtype(dtype) and dz.dtype == np.dtype(dtype)
            for r, name in enumerate(REGIMES):
                block = slice(r * TOKENS_PER_REGIME, (r + 1) * TOKENS_PER_REGIME)
                where = f"{name}, training={training}"
                np.testing.assert_array_equal(ids[block], ids_t[block], err_msg=f"selections differ ({where})")
                np.testing.assert_allclose(w[block], w_t[block], rtol=0, atol=tol, err_msg=f"weights ({where})")
                np.testing.assert_allclose(dz[block], dz_t[block], rtol=0, atol=tol, err_msg=f"dL/dz ({where})")
                nonzero_grad_fraction[name, training] = np.mean(np.any(dz_t[block] != 0, axis=-1))
            # The NumPy reference, given the same replayed noise, makes the same selections.
            ids_ref, _, slots, _ = np_sparsemixer(z, eps=eps, training=training, top_k=2, gumbel=gumbel,
                                                  uniform=uniform)
            np.testing.assert_array_equal(ids_ref, ids_t)
            if training:
                # Not vacuous: the noise matters (slot-1 samples off the argmax) and c = 0.3333 occurs.
                assert np.mean(ids_t[:, 0] != np.argmax(z, axis=-1)) > 0.2
                c = np.stack([s[2] for s in slots], -1)
                assert np.mean(c == C_SMALL) > 0.1
            else:
                np.testing.assert_array_equal(ids[:, 0], np.argmax(z, axis=-1))
    # Gradients are non-trivial: many tokens get router gradient where several experts survive the mask.
    assert nonzero_grad_fraction["near_ties", True] > 0.9
    assert nonzero_grad_fraction["offset_50", True] > 0.9
    assert max(nonzero_grad_fraction.values()) > 0.9
    if eps >= 0.5:
        assert nonzero_grad_fraction["normal", True] > 0.9


# ----------------------------------------------------------------------------------------------------------------
# 2. The NumPy reference: any top_k, closed-form backward, prefix property
# ----------------------------------------------------------------------------------------------------------------

def _noise(rs, k, T, E, dtype):
    return (rs.gumbel(size=(k, T, E)).astype(dtype), rs.rand(k, T).astype(dtype))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("top_k", [1, 3, 8])  # k = 2: the torch comparison above
def test_matches_numpy_reference_any_top_k(top_k, training):
    """ids exact; weights = c * pi[D] (c in {1, float32(0.3333)}); dL/dz = sum_s g_s m_o (onehot(D_s) - pi_s)."""
    rs = np.random.RandomState(top_k)
    T, E, eps = 512, 8, 0.3
    z = np.concatenate([rs.randn(T // 2, E), rs.randn(T // 2, E) + 20.0]).astype(np.float32)
    gumbel, uniform = _noise(rs, top_k, T, E, np.float32)
    cot = rs.randn(T, top_k).astype(np.float32)
    ids_ref, w_ref, slots, cands_ref = np_sparsemixer(z, eps=eps, training=training, top_k=top_k, gumbel=gumbel,
                                                      uniform=uniform)
    ids, w, cands, dz = jax_weights_and_grad(z, cot, top_k=top_k, jitter_eps=eps, training=training,
                                             gumbel_KTE=gumbel, uniform_KT=uniform)
    assert ids.shape == (T, top_k) and ids.dtype == np.int32 and cands.shape == (top_k, T)
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_array_equal(cands, cands_ref)
    assert all(len(set(row)) == top_k for row in ids.tolist()), "a token got the same expert twice"
    np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-6)
    dz_ref = np_closed_form_grad(ids_ref, slots, cot)
    np.testing.assert_allclose(dz, dz_ref, rtol=0, atol=1e-6)
    assert np.mean(np.any(dz_ref != 0, axis=-1)) > 0.5  # non-vacuous
    if training:
        c = np.stack([s[2] for s in slots], -1)
        assert set(np.unique(c).tolist()) <= {1.0, float(C_SMALL)}
        # c does not enter the backward rule: tokens with c = 0.3333 and a nonzero gradient exist, and a rule that
        # multiplied by c would differ from the JAX gradient there.
        scaled = [(pi, m_o * c_s, c_s) for pi, m_o, c_s in slots]
        assert np.abs(np_closed_form_grad(ids_ref, scaled, cot) - dz).max() > 1e-2
    else:
        np.testing.assert_array_equal(ids, np.argsort(-z, axis=-1, kind="stable")[:, :top_k])


def test_top_k_prefix_property():
    """top_k=3's first two slots are top_k=2 with the same noise (and top_k=1 its first slot): values and grads."""
    rs = np.random.RandomState(7)
    T, E, eps = 256, 16, 0.5
    z = rs.randn(T, E).astype(np.float32)
    gumbel, uniform = _noise(rs, 3, T, E, np.float32)
    cot = rs.randn(T, 3).astype(np.float32)
    results = {k: jax_weights_and_grad(z, cot[:, :k], top_k=k, jitter_eps=eps, training=True,
                                       gumbel_KTE=gumbel[:k], uniform_KT=uniform[:k]) for k in (1, 2)}
    for k in (1, 2):
        cot3 = cot.copy()
        cot3[:, k:] = 0  # only the first k slots receive upstream gradient
        ids3, w3, cands3, dz3 = jax_weights_and_grad(z, cot3, top_k=3, jitter_eps=eps, training=True,
                                                     gumbel_KTE=gumbel, uniform_KT=uniform)
        ids, w, cands, dz = results[k]
        np.testing.assert_array_equal(ids3[:, :k], ids)
        np.testing.assert_array_equal(w3[:, :k], w)
        np.testing.assert_array_equal(cands3[:k], cands)
        np.testing.assert_allclose(dz3, dz, rtol=0, atol=1e-7)
    assert np.mean(np.any(results[2][3] != 0, axis=-1)) > 0.9


def test_rng_path_is_deterministic_and_jittable():
    z = jnp.asarray(np.random.RandomState(0).randn(64, 8), jnp.float32)
    f = jax.jit(functools.partial(sparsemixer_v2, top_k=2, jitter_eps=0.5, training=True))
    a, b, c = f(z, rng=jax.random.key(1)), f(z, rng=jax.random.key(1)), f(z, rng=jax.random.key(2))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert np.any(np.asarray(a[0]) != np.asarray(c[0]))
    with pytest.raises(ValueError, match="rng"):
        sparsemixer_v2(z, training=True)


def test_bad_arguments_raise_value_error():
    z = jnp.zeros((4, 8), jnp.float32)
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match=rf"top_k={bad!r} is invalid: accepted values .* 1..num_experts=8"):
            sparsemixer_v2(z, top_k=bad, training=False)
    with pytest.raises(ValueError, match=r"jitter_eps=-0.1 is invalid: accepted values are >= 0"):
        sparsemixer_v2(z, jitter_eps=-0.1, training=False)
    with pytest.raises(ValueError, match=r"gumbel_KTE has shape \(2, 1, 8\): accepted shape .* \(2, 4, 8\)"):
        sparsemixer_v2(z, training=True, gumbel_KTE=jnp.zeros((2, 1, 8)), uniform_KT=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"uniform_KT has shape \(4,\): accepted shape .* \(2, 4\)"):
        sparsemixer_v2(z, training=True, gumbel_KTE=jnp.zeros((2, 4, 8)), uniform_KT=jnp.zeros((4,)))
    with pytest.raises(ValueError, match=r"logits must be \[tokens, experts\]"):
        sparsemixer_v2(jnp.zeros((2, 4, 8)), training=False)


# ----------------------------------------------------------------------------------------------------------------
# 3. Statistics of the sampled path (jax.random noise)
# ----------------------------------------------------------------------------------------------------------------

# One token, E = 8, eps = 0.35 (2 eps = 0.7): slot 1 keeps {0, 1, 4, 7} (ratios 0, .4, .1, .6) and drops
# {2, 3, 5, 6} (ratios .8, 1.3, 3, 1).
STAT_LOGITS = np.array([1.0, 0.6, 0.2, -0.3, 0.9, -2.0, 0.0, 0.4], np.float32)
STAT_EPS = 0.35
STAT_SAMPLES = 40_000


@pytest.fixture(scope="module")
def sampled():
    z = jnp.asarray(np.broadcast_to(STAT_LOGITS, (STAT_SAMPLES, 8)))
    f = jax.jit(functools.partial(sparsemixer_v2, top_k=2, jitter_eps=STAT_EPS, training=True))
    ids, w, _ = f(z, rng=jax.random.key(2024))
    return np.asarray(ids), np.asarray(w)


def _chi_square_matches(counts, probs):
    """Counts agree with probs: zero-probability cells are empty and Pearson's X^2 is below its 1 - ALPHA quantile."""
    counts, probs = np.asarray(counts, np.float64).ravel(), np.asarray(probs, np.float64).ravel()
    assert np.all(counts[probs == 0] == 0), "samples in a zero-probability cell"
    live = probs > 0
    expected = counts.sum() * probs[live]
    stat = np.sum((counts[live] - expected) ** 2 / expected)
    bound = scipy.stats.chi2.isf(ALPHA, df=live.sum() - 1)
    assert stat < bound, f"chi-square {stat:.1f} >= {bound:.1f} (df={live.sum() - 1})"
    return stat, bound


def test_slot1_samples_follow_masked_softmax(sampled):
    ids, _ = sampled
    _, _, slots, cands = np_sparsemixer(STAT_LOGITS[None], eps=STAT_EPS, training=False, top_k=2)
    pi1 = slots[0][0][0]
    assert cands[0, 0] == 4 and np.count_nonzero(pi1) == 4  # several experts survive the mask
    counts = np.bincount(ids[:, 0], minlength=8)
    _chi_square_matches(counts, pi1)
    # The same counts are far from the unmasked softmax (the test can fail).
    with pytest.raises(AssertionError):
        _chi_square_matches(counts, np_softmax(STAT_LOGITS.astype(np.float64)))


def test_slot2_joint_distribution(sampled):
    """P(D1 = i, D2 = j) = pi_i * pi'^(i)_j, pi'^(i) the masked softmax after removing i (mask re-computed)."""
    ids, _ = sampled
    pi1 = np_sparsemixer(STAT_LOGITS[None], eps=STAT_EPS, training=False, top_k=1)[2][0][0][0]
    joint = np.zeros((8, 8))
    for i in np.flatnonzero(pi1):
        remaining = STAT_LOGITS[None].copy()
        remaining[0, i] = -np.inf
        keep = np_slot_mask(STAT_LOGITS[None], remaining, STAT_EPS)
        joint[i] = pi1[i] * np_softmax(np.where(keep, remaining, -np.inf))[0]
    counts = np.zeros((8, 8))
    np.add.at(counts, (ids[:, 0], ids[:, 1]), 1)
    _chi_square_matches(counts, joint)


def test_heun_midpoint_probability(sampled):
    """c = 1 always for the argmax pick; P(c = 1 | pick is not the argmax) = 0.25 (binomial bound, each slot)."""
    ids, w = sampled
    for slot in range(2):
        # the pick's masked-softmax probability (deterministic given the earlier picks)
        _, _, slots, _ = np_sparsemixer(np.broadcast_to(STAT_LOGITS, (ids.shape[0], 8)).copy(), eps=STAT_EPS,
                                        training=True, top_k=2, gumbel=_gumbel_forcing(ids, 8),
                                        uniform=np.zeros((2, ids.shape[0]), np.float32))
        pi, m_o, _ = slots[slot]
        c = w[:, slot] / m_o
        assert np.all(np.isclose(c, 1.0, rtol=1e-6) | np.isclose(c, C_SMALL, rtol=1e-6))
        is_argmax = ids[:, slot] == np.argmax(pi, axis=-1)
        assert np.all(np.isclose(c[is_argmax], 1.0, rtol=1e-6))
        ones = np.isclose(c[~is_argmax], 1.0, rtol=1e-6)
        n = ones.size
        assert n > 5000
        lo, hi = scipy.stats.binom.ppf([ALPHA / 2, 1 - ALPHA / 2], n, 0.25)
        assert lo <= ones.sum() <= hi, f"slot {slot + 1}: P(c=1 | not argmax) = {ones.mean():.4f}, n={n}"


def _gumbel_forcing(ids_TK, num_experts):
    """[K, T, E] noise that makes the NumPy reference's Gumbel-max pick the given ids (to replay given picks)."""
    T, K = ids_TK.shape
    g = np.zeros((K, T, num_experts), np.float32)
    for s in range(K):
        g[s, np.arange(T), ids_TK[:, s]] = 1e4
    return g


def test_custom_backward_equals_closed_form_with_rng():
    """With jax.random noise: dL/dz = g * m_o * (onehot(D) - pi) summed over slots, c not included."""
    rs = np.random.RandomState(3)
    T, E, eps = 1024, 16, 0.5
    z = rs.randn(T, E).astype(np.float32)
    cot = rs.randn(T, 2).astype(np.float32)
    ids, w, _, dz = jax_weights_and_grad(z, cot, top_k=2, jitter_eps=eps, training=True, rng=jax.random.key(5))
    ids_ref, _, slots, _ = np_sparsemixer(z, eps=eps, training=True, top_k=2, gumbel=_gumbel_forcing(ids, E),
                                    uniform=np.zeros((2, T), np.float32))
    np.testing.assert_array_equal(ids_ref, ids)  # the picks were legal (each among its slot's candidates)
    np.testing.assert_allclose(dz, np_closed_form_grad(ids, slots, cot), rtol=0, atol=1e-6)
    m_o = np.stack([s[1] for s in slots], -1)
    c = w / m_o
    assert np.mean(np.isclose(c, C_SMALL, rtol=1e-6)) > 0.2  # c = 0.3333 is frequent, yet absent from the rule
    assert np.mean(np.any(dz != 0, axis=-1)) > 0.9



def test_reference_consequences_at_grin_eps():
    """docs/sparsemixer.md#how-many-tokens-get-a-router-gradient: at eps = 0.01 on N(0,1) logits (E = 16) only
    ~5 % of tokens keep >= 2 candidates in a slot, and at eval ~95 % of the weights are exactly 1.0. (Measured:
    slot 1 5.0 %, slot 2 6.7 %, either 11.4 %, 94.2 % of eval weights 1.0; the bounds below are > 10 standard
    errors wide at T = 20000.)"""
    z = jnp.asarray(np.random.RandomState(11).randn(20_000, 16), jnp.float32)
    _, w, cands = jax.jit(functools.partial(sparsemixer_v2, top_k=2, jitter_eps=0.01, training=False))(z)
    cands, w = np.asarray(cands), np.asarray(w)
    assert 0.03 < np.mean(cands[0] >= 2) < 0.065
    assert 0.04 < np.mean(cands[1] >= 2) < 0.085
    assert 0.92 < np.mean(w == 1.0) < 0.965
