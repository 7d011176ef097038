"""Expert-choice routing grouped by position: against a brute-force loop, causal, balanced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grin_jax.moe import experts, expert_choice, layer


def expert_choice_ffn(params, router, x, *, top_k, activation="swiglu", capacity_factor=1.0):
    """The MoE layer with the 'expert_choice' router: (y [B, S, D], aux)."""
    config = layer.MoEConfig(num_experts=router.shape[1], top_k=top_k, d_model=x.shape[-1],
                             d_hidden=params["w_up"].shape[-1], activation=activation, router="expert_choice",
                             router_options={"capacity_factor": capacity_factor})
    return layer.moe_layer({"router": router, "experts": params}, x, config=config, training=True)


def brute_force(params, router, x_BSD, capacity, activation):
    x = np.asarray(x_BSD, np.float64)
    batch, seq, d = x.shape
    num_experts = router.shape[1]
    act = experts.get_activation(activation)
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    y = np.zeros_like(x)
    for s in range(seq):
        logits = x[:, s] @ np.asarray(router, np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for e in range(num_experts):
            chosen = np.argsort(-probs[:, e], kind="stable")[:capacity]
            for b in chosen:
                h = x[b, s] @ w["w_up"][e]
                if act.gated:
                    h = np.asarray(act.fn(jnp.asarray(x[b, s] @ w["w_gate"][e]))) * h
                else:
                    h = np.asarray(act.fn(jnp.asarray(h)))
                y[b, s] += probs[b, e] * (h @ w["w_down"][e])
    return y


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_matches_brute_force(activation):
    batch, seq, d, f, num_experts, top_k = 8, 3, 6, 5, 4, 2
    k = jax.random.split(jax.random.key(0), 3)
    params = experts.init_expert_params(k[0], num_experts=num_experts, d_model=d, d_hidden=f, activation=activation)
    router = jax.random.normal(k[1], (d, num_experts))
    x = jax.random.normal(k[2], (batch, seq, d))
    y, aux = jax.jit(lambda p, r, x: expert_choice_ffn(p, r, x, top_k=top_k, activation=activation))(
        params, router, x)
    capacity = expert_choice.tokens_per_expert(batch, num_experts, top_k, 1.0)
    assert capacity == 4
    np.testing.assert_allclose(np.asarray(y), brute_force(params, router, x, capacity, activation), rtol=2e-5, atol=2e-5)
    assert 0.0 <= float(aux["metrics"]["dropped_fraction"]) < 1.0
    assert float(aux["metrics"]["mean_experts_per_token"]) == pytest.approx(num_experts * capacity / batch)


def test_causal_and_differentiable():
    batch, seq, d, f, num_experts = 4, 5, 6, 5, 8
    k = jax.random.split(jax.random.key(1), 3)
    params = experts.init_expert_params(k[0], num_experts=num_experts, d_model=d, d_hidden=f)
    router = jax.random.normal(k[1], (d, num_experts))
    x = jax.random.normal(k[2], (batch, seq, d))
    fn = lambda x: expert_choice_ffn(params, router, x, top_k=2)[0]
    y = fn(x)
    y_changed_future = fn(x.at[:, 3:].set(7.0))
    np.testing.assert_array_equal(np.asarray(y[:, :3]), np.asarray(y_changed_future[:, :3]))
    grads = jax.grad(lambda r: jnp.sum(expert_choice_ffn(params, r, x, top_k=2)[0] ** 2))(router)
    assert np.all(np.isfinite(np.asarray(grads))) and float(jnp.abs(grads).sum()) > 0


def test_bad_input_shape():
    params = experts.init_expert_params(jax.random.key(0), num_experts=4, d_model=6, d_hidden=5)
    with pytest.raises(ValueError, match="batch, seq"):
        expert_choice_ffn(params, jnp.zeros((6, 4)), jnp.zeros((3, 6)), top_k=1)
