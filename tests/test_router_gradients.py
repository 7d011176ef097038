"""Router-gradient study (grin_jax/studies/router_gradients.py): exact gradients and what each estimator converges to.

Everything runs in float64 inside `jax.enable_x64(True)` (an autouse fixture; the setting does not leak to other test
files).

Statistical checks: `_assert_mean` compares a Monte Carlo sample mean with a claimed expectation coordinate by
coordinate with the empirical Bernstein bound: with probability >= 1 - delta,
    |mean - mu| <= sqrt(2 V ln(4 / delta) / n) + 7 R ln(4 / delta) / (3 (n - 1))
for n iid draws in a range of width R with sample variance V (two-sided). delta = ALPHA / E (Bonferroni over the E
coordinates), so each check fails by chance with probability <= ALPHA = 1e-6. R is the observed range times 2 (the
estimators here are bounded; the factor is a safety margin because the true range is not known in closed form). Unlike
"k standard errors" this does not lean on the normal approximation far in the tail. `test_the_checks_can_fail` shows
the same check rejects a sign-flipped estimator and a biased one.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.special

from grin_jax.studies import router_gradients as rg

ALPHA = 1e-6
C_SMALL = float(np.float32(0.3333))  # the shipped code's c for a non-argmax pick without the u > 0.75 draw


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


def _problem(seed, *, scale=1.0, num_experts=8):
    return rg.index_problem(rg.make_problems(jax.random.key(seed), 1, num_experts=num_experts, scale=scale,
                                             dtype=jnp.float64), 0)


def _bound(samples_NE, alpha=ALPHA):
    samples = np.asarray(samples_NE)
    n, num = samples.shape
    log_term = math.log(4 * num / alpha)
    var = samples.var(axis=0, ddof=1)
    width = 2 * (samples.max(axis=0) - samples.min(axis=0))
    return np.sqrt(2 * var * log_term / n) + 7 * width * log_term / (3 * (n - 1)) + 1e-12


def _assert_mean(samples_NE, expected_E, what):
    mean = np.asarray(samples_NE).mean(axis=0)
    bound = _bound(samples_NE)
    excess = np.abs(mean - np.asarray(expected_E)) / bound
    assert np.all(excess <= 1), (f"{what}: sample mean {mean} differs from {np.asarray(expected_E)} by more than "
                                 f"the 1e-6 bound {bound} (worst coordinate at {excess.max():.2f} x bound)")


# ---------------------------------------------------------------------------------------------------------------
# The exact gradient
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", rg.HEADS)
@pytest.mark.parametrize("top_k,temperature,jitter_eps", [(1, 1.0, math.inf), (2, 2.0, math.inf), (2, 1.0, 0.3)])
def test_exact_gradient_matches_central_differences(head, top_k, temperature, jitter_eps):
    problem = _problem(1)
    z = problem.logits
    kw = dict(head=head, top_k=top_k, temperature=temperature, jitter_eps=jitter_eps)
    grad = np.asarray(rg.exact_gradient(problem, **kw))
    loss = jax.jit(lambda z: rg.expected_loss(z, problem, **kw))
    h = 1e-6
    tuples = rg.ordered_tuples(8, top_k)
    mask0 = np.asarray(rg.tuple_probs_and_weights(z, tuples, jitter_eps=jitter_eps)[0] > 0)
    fd = np.zeros(8)
    for i in range(8):
        step = h * np.eye(8)[i]
        for sign in (1, -1):  # the mask is frozen only where it does not change inside the stencil
            moved = np.asarray(rg.tuple_probs_and_weights(z + sign * step, tuples, jitter_eps=jitter_eps)[0] > 0)
            assert np.array_equal(moved, mask0)
        fd[i] = (loss(z + step) - loss(z - step)) / (2 * h)
    assert np.linalg.norm(grad) > 1e-3
    np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-8 * max(1.0, np.abs(grad).max()))
    if top_k == 1:  # and the closed form of the module docstring
        closed = rg.exact_gradient_one_slot(problem, head=head, temperature=temperature, jitter_eps=jitter_eps)
        np.testing.assert_allclose(grad, closed, rtol=0, atol=1e-13)


def test_masked_objective_probabilities_follow_the_shipped_mask():
    """tuple probabilities: sum to 1; zero exactly for the tuples the shipped router can never pick (mask)."""
    problem = _problem(2)
    for top_k, eps in ((1, 0.2), (2, 0.2), (2, math.inf)):
        probs, _, ids, forced = rg.estimator_outcomes("sparsemixer_v2", problem, head="quad", top_k=top_k,
                                                      settings=rg.Settings(jitter_eps=eps))
        probs, ids, forced = map(np.asarray, (probs, ids, forced))
        np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-12)
        live = probs > 0
        assert np.array_equal(ids[live], forced[live]), "the replay did not pick the enumerated tuple"
        assert (~live).sum() == 0 if math.isinf(eps) else (~live).sum() > 0
        assert not np.any(np.all(ids[~live] == forced[~live], axis=-1)), "a masked tuple was picked"


# ---------------------------------------------------------------------------------------------------------------
# Estimators: Monte Carlo of their own random draws against theory
# ---------------------------------------------------------------------------------------------------------------

N = 20_000


@pytest.mark.parametrize("head,top_k", [("quad", 1), ("ce", 2)])
def test_reinforce_is_unbiased(head, top_k):
    problem = _problem(3)
    samples = rg.estimator_samples("reinforce", problem, jax.random.key(10), head=head, top_k=top_k, num_samples=N)
    _assert_mean(samples, rg.exact_gradient(problem, head=head, top_k=top_k), f"reinforce {head} top-{top_k}")


@pytest.mark.parametrize("jitter_eps", [math.inf, 0.5])
def test_sparsemixer_v2_one_slot_theory(jitter_eps):
    """The shipped code, quadratic head, K = 1: Monte Carlo of its own draws = the closed form
    sum_{i!=a} p_i [1/4 f'(x_i) + 3/4 f'(x_i/3)].E_i grad p_i + p_a f'(x_a).E_a grad p_a, whose non-argmax terms
    are those of grad sum_i p_i f(sg(p_i) E_i) (Heun's rule, exact for quadratic f)."""
    problem = _problem(4)
    settings = rg.Settings(jitter_eps=jitter_eps)
    kw = dict(head="quad", jitter_eps=jitter_eps)
    # the closed form (c = 1/3 exactly) and its Heun identity: deterministic, float64
    theory = rg.midpoint_expectation(problem, **kw)
    np.testing.assert_allclose(theory, rg.heun_target(problem, **kw), rtol=0, atol=1e-13)
    # the enumerated outcomes of the shipped code give the closed form with the shipped c = float32(0.3333)
    exact = rg.exact_moments("sparsemixer_v2", problem, head="quad", top_k=1, settings=settings).mean
    np.testing.assert_allclose(exact, rg.midpoint_expectation(problem, small_c=C_SMALL, **kw), rtol=0, atol=1e-12)
    assert np.linalg.norm(exact - theory) < 1e-3 * np.linalg.norm(theory)  # 0.3333 vs 1/3
    # the shipped code with its own random draws converges to it
    samples = rg.estimator_samples("sparsemixer_v2", problem, jax.random.key(11), head="quad", top_k=1,
                                   num_samples=N, settings=settings)
    assert np.count_nonzero(np.abs(np.asarray(samples)).sum(-1)) > N // 2
    _assert_mean(samples, theory, f"shipped sparsemixer_v2 eps={jitter_eps}")


def test_heun_identity_needs_a_quadratic_head():
    """For cross-entropy the third-order rule is close but not exact: the identity checked above to 1e-13 fails here
    by far more than rounding (so that check is not vacuous)."""
    problem = _problem(4)
    target = rg.heun_target(problem, head="ce")
    gap = np.linalg.norm(rg.midpoint_expectation(problem, head="ce") - target) / np.linalg.norm(target)
    assert 1e-9 < gap < 1e-2


def test_sparsemixer_v2_star_one_slot_theory():
    """v2*, quadratic head, K = 1, no mask: its non-argmax terms are exactly those of the gradient of its own
    objective J_2 (temperature 2, sampling and weight paths both), the argmax term is 2 f'(x_a).x_a grad p_a."""
    problem = _problem(5)
    kw = dict(head="quad", temperature=2.0)
    theory = rg.midpoint_expectation(problem, keep_prob=5 / 8, factor=2.0, **kw)
    np.testing.assert_allclose(theory, rg.heun_target(problem, include_weight_path=True, **kw), rtol=0, atol=1e-13)
    exact = rg.exact_moments("sparsemixer_v2_star", problem, head="quad", top_k=1,
                             settings=rg.Settings(jitter_eps=math.inf)).mean
    np.testing.assert_allclose(exact, theory, rtol=0, atol=1e-13)
    samples = rg.estimator_samples("sparsemixer_v2_star", problem, jax.random.key(12), head="quad", top_k=1,
                                   num_samples=N, settings=rg.Settings(jitter_eps=math.inf))
    _assert_mean(samples, theory, "sparsemixer_v2_star")
    # the only remaining error against grad J_2 is the argmax term: [f(x_a) - f(0) - f'(x_a).x_a] grad p_a
    z, experts = problem.logits, problem.experts
    p = jax.nn.softmax(z / 2)
    a = int(jnp.argmax(z))
    x = p[a] * experts[a]
    f = lambda y: rg.head_loss("quad", y, problem)  # noqa: E731
    grad_pa = p[a] * (jnp.eye(8)[a] - p) / 2
    residual = (f(x) - f(jnp.zeros(4)) - jnp.dot(jax.grad(f)(x), x)) * grad_pa
    np.testing.assert_allclose(rg.exact_gradient(problem, top_k=1, **kw) - theory, residual, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name,jitter_eps", [("sparsemixer_v2", 0.3), ("sparsemixer_v2_star", math.inf)])
def test_top2_enumeration_is_the_mean_of_the_random_draws(name, jitter_eps):
    """Top-2: the enumerated moments (used for the tables) are what the router's own random draws average to."""
    problem = _problem(6)
    settings = rg.Settings(jitter_eps=jitter_eps)
    exact = rg.exact_moments(name, problem, head="ce", top_k=2, settings=settings)
    samples = rg.estimator_samples(name, problem, jax.random.key(13), head="ce", top_k=2, num_samples=N,
                                   settings=settings)
    _assert_mean(samples, exact.mean, f"{name} top-2")
    np.testing.assert_allclose(rg.sample_moments(samples).var_trace, exact.var_trace, rtol=0.1)


def _st_gumbel_two_expert_mean(problem, tau):
    """E[g] of straight-through Gumbel-softmax for E = 2, K = 1 by quadrature over L = g_1 - g_2 ~ Logistic(0, 1)
    (NumPy/SciPy, written from the definition, independent of the JAX estimator)."""
    z = np.asarray(problem.logits)
    experts, t = np.asarray(problem.experts), np.asarray(problem.target)
    delta = z[0] - z[1]
    pi = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    dpi = pi[0] * pi[1] * np.array([1.0, -1.0])  # grad pi_1; grad pi_2 = -grad pi_1
    density = lambda l: scipy.special.expit(l) * scipy.special.expit(-l)  # noqa: E731  (logistic pdf, overflow-free)

    def sample(l):
        d = 0 if delta + l > 0 else 1
        y = pi[d] * experts[d]
        fp = y - t  # f'(y) for the quadratic head
        s1 = scipy.special.expit((delta + l) / tau)
        ds1 = s1 * (1 - s1) / tau * np.array([1.0, -1.0])
        pathwise = (fp @ experts[d]) * (dpi if d == 0 else -dpi)
        straight_through = pi[0] * (fp @ experts[0]) * ds1 - pi[1] * (fp @ experts[1]) * ds1
        return pathwise + straight_through

    out = np.zeros(2)
    for j in range(2):
        for lo, hi in ((-np.inf, -delta), (-delta, np.inf)):  # D flips at l = -delta
            out[j] += scipy.integrate.quad(lambda l: sample(l)[j] * density(l), lo, hi, epsabs=1e-12)[0]
    return out


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_st_gumbel_mean_matches_quadrature_and_is_biased(tau):
    problem = _problem(7, num_experts=2)
    expected = _st_gumbel_two_expert_mean(problem, tau)
    samples = rg.estimator_samples("st_gumbel", problem, jax.random.key(14), head="quad", top_k=1, num_samples=N,
                                   settings=rg.Settings(tau=tau))
    _assert_mean(samples, expected, f"st_gumbel tau={tau}")
    exact = np.asarray(rg.exact_gradient(problem, head="quad", top_k=1))
    assert np.linalg.norm(expected - exact) > 0.05 * np.linalg.norm(exact), "ST-Gumbel is biased for J"


def test_gshard_is_autodiff_of_its_deterministic_mixture():
    problem = _problem(8)
    for top_k in (1, 2):
        grad = rg.estimator_samples("gshard", problem, None, head="ce", top_k=top_k, num_samples=1)[0]
        loss = jax.jit(lambda z: rg.head_loss("ce", rg.gshard_combine(z[None], top_k=top_k)[0] @ problem.experts,
                                              problem))
        h = 1e-6
        fd = [(loss(problem.logits + h * e) - loss(problem.logits - h * e)) / (2 * h) for e in np.eye(8)]
        np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-8)


def test_the_checks_can_fail():
    """The convergence check rejects a sign-flipped REINFORCE and the (biased, about half-size) SparseMixer-v2 when
    either is claimed to be an unbiased estimator of grad J."""
    problem = _problem(3)
    exact = rg.exact_gradient(problem, head="quad", top_k=1)
    samples = rg.estimator_samples("reinforce", problem, jax.random.key(10), head="quad", top_k=1, num_samples=N)
    _assert_mean(samples, exact, "reinforce")
    with pytest.raises(AssertionError, match="1e-6 bound"):
        _assert_mean(-samples, exact, "sign-flipped reinforce")
    v2 = rg.estimator_samples("sparsemixer_v2", problem, jax.random.key(11), head="quad", top_k=1, num_samples=N,
                              settings=rg.Settings(jitter_eps=math.inf))
    with pytest.raises(AssertionError, match="1e-6 bound"):
        _assert_mean(v2, exact, "sparsemixer_v2 claimed unbiased")


def test_candidates_at_grin_eps():
    """eps = 0.01 on N(0, 1) logits, E = 16: about 1 token in 9 keeps >= 2 candidates in some slot (slot 1 alone:
    about 1 in 20); eps = 0.5: all do. The mask is scale-invariant."""
    key = jax.random.key(15)
    small = rg.candidate_stats(key, num_tokens=20_000, num_experts=16, jitter_eps=0.01)
    large = rg.candidate_stats(key, num_tokens=20_000, num_experts=16, jitter_eps=0.5)
    assert 0.05 < small["grad_fraction"] < 0.2 and large["grad_fraction"] > 0.99
    assert small["slot1_hist"][1] > 0.9
    scaled = rg.candidate_stats(key, num_tokens=20_000, num_experts=16, jitter_eps=0.01, scale=4.0)
    assert scaled["grad_fraction"] == small["grad_fraction"]
    np.testing.assert_allclose(small["slot1_hist"].sum(), 1.0)
