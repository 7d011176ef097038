"""Routers (grin_jax/moe/routing.py): the registry, the top-k softmax baseline against NumPy, and the
'router_grad_fraction' metric against autodiff.

Axes: T tokens, E experts, K slots.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grin_jax.moe import routing

T, E = 512, 16


@functools.partial(jax.jit, static_argnames=("router", "options"))
def _route_and_grad(logits, cot, rng, *, router, options):
    def loss(z):
        opts = dict(options)
        r = routing.route(router, z, rng=rng, top_k=opts.pop("top_k"), training=opts.pop("training"), options=opts)
        return jnp.sum(r.weights * cot), r.metrics
    return jax.grad(loss, has_aux=True)(logits)


def route_and_grad(router, logits, seed, scale=1.0, **options):
    """(metrics, dL/dz) for L = sum(weights * scale * cot), cot a fixed random cotangent [T, K] (the same for any
    scale), the router's noise from jax.random.key(seed)."""
    cot = np.random.RandomState(seed).randn(logits.shape[0], options["top_k"]) * scale
    grad, metrics = _route_and_grad(logits, jnp.asarray(cot, logits.dtype), jax.random.key(seed), router=router,
                                    options=tuple(sorted(options.items())))
    return metrics, np.asarray(grad)


def test_registry():
    assert {"sparsemixer_v2", "topk_softmax"} <= set(routing.ROUTERS)
    rs = np.random.RandomState(0)
    z = jnp.asarray(rs.randn(8, 4), jnp.float32)
    token_routers = [n for n, spec in routing.ROUTERS.items() if spec.dispatch == "token_choice"]
    assert {"sparsemixer_v2", "topk_softmax"} <= set(token_routers)
    for name in token_routers:
        r = jax.jit(functools.partial(routing.route, name, top_k=2, training=True))(z, rng=jax.random.key(0))
        assert isinstance(r, routing.Routing)
        assert r.expert_ids.shape == (8, 2) and r.expert_ids.dtype == jnp.int32 and r.weights.shape == (8, 2)
        np.testing.assert_allclose(np.asarray(r.probs), np.asarray(jax.nn.softmax(z, axis=-1)), rtol=1e-6)
        assert r.probs.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(r.logits), np.asarray(z))
        assert "router_grad_fraction" in r.metrics


REGIMES = {
    "normal": lambda rs: rs.randn(T, E),
    "times_30": lambda rs: rs.randn(T, E) * 30,
    # surviving logits ~1e3 apart: the masked softmax underflows to exactly 0, so no gradient although the
    # mask keeps them (the metric must count experts with nonzero probability, not mask survivors)
    "times_1e3": lambda rs: rs.randn(T, E) * 1e3,
    "offset_50": lambda rs: rs.randn(T, E) + 50,
}


# The gradient is linear in the cotangent: scaling it by 2^100 lifts gradients that float32 flushes to zero
# (below the smallest normal number; XLA:CPU flushes subnormals) into range, without overflowing (|dL/dz| <~ 2^103).
LIFT = 2.0 ** 100


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_router_grad_fraction_equals_autodiff(regime):
    """'router_grad_fraction' = fraction of tokens with a nonzero logit gradient under autodiff (training)."""
    rs = np.random.RandomState(1)
    logits = jnp.asarray(REGIMES[regime](rs), jnp.float32)
    fractions = []
    for eps in (0.01, 0.1, 0.5):
        options = dict(top_k=2, training=True, jitter_eps=eps)
        seed = round(eps * 100)
        metrics, grad = route_and_grad("sparsemixer_v2", logits, seed, **options)
        metric = float(metrics["router_grad_fraction"])
        has_grad = np.any(grad != 0, axis=-1)
        lifted = np.abs(route_and_grad("sparsemixer_v2", logits, seed, scale=LIFT, **options)[1]).max(axis=-1)
        where = f"{regime}, eps={eps}"
        # Exact: the metric counts the tokens whose router gradient is mathematically nonzero.
        assert metric == pytest.approx(np.mean(lifted > 0), abs=1e-7), where
        # At scale 1 a token may lose its gradient only by float32 underflow: every counted token keeps a nonzero
        # gradient unless its true gradient is below the smallest normal float32.
        underflow = (lifted > 0) & ~has_grad
        assert not np.any(has_grad & ~(lifted > 0)), where
        assert np.all(lifted[underflow] < np.finfo(np.float32).tiny * LIFT), where
        assert np.mean(underflow) < 0.01, where
        fractions.append(metric)
    if regime in ("normal", "times_30"):
        # the metric moves with eps (GRIN's eps = 0.01 gives few tokens a router gradient)
        assert fractions[0] < 0.25 and fractions[2] > 0.9
    if regime == "times_1e3":
        assert fractions[2] < 0.6  # most mask survivors have probability exactly 0 here


def test_router_grad_fraction_topk_softmax():
    logits = jnp.asarray(np.random.RandomState(2).randn(T, E), jnp.float32)
    for top_k, renormalize in ((1, True), (1, False), (2, True), (2, False)):
        options = dict(top_k=top_k, training=True, renormalize=renormalize)
        metrics, grad = route_and_grad("topk_softmax", logits, 0, **options)
        metric = float(metrics["router_grad_fraction"])
        assert metric == np.mean(np.any(grad != 0, axis=-1))
        assert metric == (0.0 if (top_k, renormalize) == (1, True) else 1.0)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_topk_softmax_equals_numpy(top_k, renormalize):
    rs = np.random.RandomState(top_k)
    z = rs.randn(64, 8).astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids_ref = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    w_ref = np.take_along_axis(p, ids_ref, -1)
    if renormalize:
        w_ref = w_ref / w_ref.sum(-1, keepdims=True)
    # gradient of sum(w * cot): renormalised = softmax over the top-k set; otherwise softmax over all experts
    cot = rs.randn(64, top_k)
    onehot = np.eye(8)[ids_ref]  # [T, K, E]
    if renormalize:
        q = np.einsum("tk,tke->te", w_ref, onehot)
        grad_ref = np.einsum("tk,tke->te", cot * w_ref, onehot) - np.sum(cot * w_ref, -1, keepdims=True) * q
    else:
        grad_ref = np.einsum("tk,tke->te", cot * w_ref, onehot) - np.sum(cot * w_ref, -1, keepdims=True) * p

    @jax.jit
    def run(z, cot):
        def f(zz):
            r = routing.route("topk_softmax", zz, top_k=top_k, training=False,
                              options={"renormalize": renormalize})
            return r.weights, r.expert_ids
        w, vjp, ids = jax.vjp(f, z, has_aux=True)
        return w, ids, vjp(cot)[0]

    r, ids, grad = run(jnp.asarray(z, jnp.float32), jnp.asarray(cot, jnp.float32))
    np.testing.assert_array_equal(np.asarray(ids), ids_ref)
    np.testing.assert_allclose(np.asarray(r), w_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), grad_ref, rtol=1e-5, atol=1e-6)


def test_sparsemixer_router_passes_noise_and_options():
    """The registered router forwards jitter_eps and explicit noise to sparsemixer_v2 unchanged."""
    from grin_jax.moe.sparsemixer import sparsemixer_v2
    rs = np.random.RandomState(3)
    z = jnp.asarray(rs.randn(32, 8), jnp.float32)
    noise = dict(gumbel_KTE=jnp.asarray(rs.gumbel(size=(2, 32, 8)), jnp.float32),
                 uniform_KT=jnp.asarray(rs.rand(2, 32), jnp.float32))
    token_first = {"gumbel_TKE": jnp.swapaxes(noise["gumbel_KTE"], 0, 1), "uniform_TK": noise["uniform_KT"].T}

    @jax.jit
    def run(z, noise, token_first):
        return (routing.route("sparsemixer_v2", z, top_k=2, training=True, options={"jitter_eps": 0.3},
                              noise=token_first),
                sparsemixer_v2(z, top_k=2, jitter_eps=0.3, training=True, **noise))

    r, (ids, w, cands) = run(z, noise, token_first)
    np.testing.assert_array_equal(np.asarray(r.expert_ids), np.asarray(ids))
    np.testing.assert_array_equal(np.asarray(r.weights), np.asarray(w))
    np.testing.assert_allclose(float(r.metrics["mean_candidates"]), np.mean(np.asarray(cands)))
    np.testing.assert_allclose(float(r.metrics["router_grad_fraction"]),
                               np.mean(np.any(np.asarray(cands) >= 2, axis=0)))


def test_bad_arguments_raise_value_error():
    z = jnp.zeros((4, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"router='gshard' is unknown: accepted values are .*sparsemixer_v2"):
        routing.route("gshard", z, top_k=2, training=False)
    for name in ("sparsemixer_v2", "topk_softmax", "expert_choice"):
        for bad in (0, 9):
            with pytest.raises(ValueError, match=rf"top_k={bad} is invalid: accepted values .*1..num_experts=8"):
                routing.route(name, z, top_k=bad, training=False)
    with pytest.raises(ValueError, match=r"logits must be \[tokens, experts\]"):
        routing.route("topk_softmax", jnp.zeros((2, 4, 8)), top_k=2, training=False)
    with pytest.raises(ValueError, match=r"router_options.jitter_eps=-0.5 is invalid: accepted values are finite"):
        routing.route("sparsemixer_v2", z, top_k=2, training=False, options={"jitter_eps": -0.5})
    with pytest.raises(ValueError, match=r"router_options \['eps'\] are unknown for router='sparsemixer_v2': "
                                         r"accepted keys are \['jitter_eps'\]"):
        routing.route("sparsemixer_v2", z, top_k=2, training=False, options={"eps": 0.1})
    with pytest.raises(ValueError, match=r"training needs its noise"):
        routing.route("sparsemixer_v2", z, top_k=2, training=True)
