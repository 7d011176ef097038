"""SparseMixer-v2, GRIN's gradient-informed top-k router (docs/sparsemixer.md), as a `jax.custom_vjp`.

Axes: T tokens, E experts, K slots per token.

Per slot s (s = 1..K), from the raw router logits z [T, E]:
  1. z_s   = z with every earlier pick set to -inf;  z_s* = max z_s.
  2. mask  : expert i dropped when (z_s* - z_i) / max(|z_i|, z_s*) > 2*eps   (factor uses the ORIGINAL z;
             a 0/0 compares False, i.e. kept).  l_s = z_s with dropped experts at -inf.
  3. pick  : training D_s = argmax(l_s + gumbel_s) (a sample from softmax(l_s)); eval D_s = argmax z_s.
  4. pi_s  = softmax(l_s);  m_o = pi_s[D_s].
  5. train : c = 0.3333 + 0.6667 * [(D_s == argmax pi_s) or (u_s > 0.75)]   (float32 constants);
             forward weight m_s = c * m_o; backward dL/dz = g * m_o * (onehot(D_s) - pi_s)  (c does not enter;
             no other path from m_s to z).
     eval  : m_s = pi_s[D_s] with ordinary autodiff.
The K weights are not renormalised. K = 2 is exactly transformers' PhiMoE `sparsemixer`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Heun's third-order rule: f(x) - f(0) = .25 f'(x) + .75 f'(x/3); a non-argmax sample keeps weight 1 with
# probability 0.25 and 1/3 otherwise. The constants are the reference's float32 ones (c = 0.3333, not 1/3).
MIDPOINT_KEEP_THRESHOLD = 0.75
SCALE_OFFSET = 0.3333
SCALE_SLOPE = 0.6667


@jax.custom_vjp
def _gradient_informed_weight(z_TE, m_o_T, onehot_TE, pi_TE, c_T):
    """Forward: c * m_o. Backward: only dL/dz = g * m_o * (onehot - pi); nothing else receives gradient."""
    del z_TE, onehot_TE, pi_TE
    return c_T * m_o_T


def _giw_fwd(z_TE, m_o_T, onehot_TE, pi_TE, c_T):
    return c_T * m_o_T, (m_o_T, onehot_TE, pi_TE, c_T)


def _giw_bwd(residuals, g_T):
    m_o_T, onehot_TE, pi_TE, c_T = residuals
    scaled_T = g_T * m_o_T
    dz_TE = scaled_T[:, None] * (onehot_TE - pi_TE)
    return (dz_TE, jnp.zeros_like(m_o_T), jnp.zeros_like(onehot_TE), jnp.zeros_like(pi_TE), jnp.zeros_like(c_T))


_gradient_informed_weight.defvjp(_giw_fwd, _giw_bwd)


def sparsity_mask(z_TE: jax.Array, remaining_TE: jax.Array, jitter_eps: float) -> jax.Array:
    """Experts kept by the jitter-eps rule: [T, E] bool (False for experts already picked).

    `remaining_TE` is the slot's logits with earlier picks at -inf; the factor uses the original logits z.
    """
    z_TE = jax.lax.stop_gradient(z_TE)
    remaining_TE = jax.lax.stop_gradient(remaining_TE)
    top_T1 = jnp.max(remaining_TE, axis=-1, keepdims=True)
    factor_TE = jnp.maximum(jnp.abs(z_TE), top_T1)
    dropped_TE = ((top_T1 - z_TE) / factor_TE) > (2 * jitter_eps)  # NaN (0/0) compares False: kept
    return jnp.logical_and(~dropped_TE, remaining_TE > -jnp.inf)


def _midpoint_scale(picked_T, pi_TE, uniform_T, dtype):
    is_argmax_T = picked_T == jnp.argmax(pi_TE, axis=-1)
    one_T = jnp.logical_or(is_argmax_T, uniform_T > MIDPOINT_KEEP_THRESHOLD)
    # float32 arithmetic as the reference (torch.add(0.3333, mask, alpha=0.6667)), then cast.
    c_T = jnp.float32(SCALE_OFFSET) + jnp.float32(SCALE_SLOPE) * one_T.astype(jnp.float32)
    return c_T.astype(dtype)


def sparsemixer_v2(
    logits_TE: jax.Array,
    *,
    top_k: int = 2,
    jitter_eps: float = 0.01,
    training: bool,
    rng: jax.Array | None = None,
    gumbel_KTE: jax.Array | None = None,
    uniform_KT: jax.Array | None = None,
):
    """SparseMixer-v2 routing.

    Args:
      logits_TE: router logits z [T, E] (float32 or float64).
      top_k: K, number of slots (experts per token), 1 <= K <= E.
      jitter_eps: the mask's eps (GRIN: 0.01).
      training: sampled picks + custom gradient (True) or deterministic argmax with ordinary autodiff (False).
      rng: PRNG key for the Gumbel and uniform draws in training (ignored when both noises are given).
      gumbel_KTE: optional explicit Gumbel(0,1) noise per slot [K, T, E] (training only).
      uniform_KT: optional explicit U(0,1) draws per slot [K, T] (training only).

    Returns:
      (expert_ids [T, K] int32, weights [T, K], candidates [K, T] int32: per slot, the experts that survive the
      mask AND have a nonzero masked-softmax probability; a token's router gets task-loss gradient from a slot
      exactly when this is >= 2. It is below the mask count only where the softmax underflows, e.g. surviving
      logits ~100 or more below the max in float32).
    """
    if logits_TE.ndim != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {logits_TE.shape}")
    num_tokens, num_experts = logits_TE.shape
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} is invalid: accepted values are integers 1..num_experts={num_experts}")
    if not jitter_eps >= 0:
        raise ValueError(f"jitter_eps={jitter_eps!r} is invalid: accepted values are >= 0")
    for name, noise, shape in (("gumbel_KTE", gumbel_KTE, (top_k, num_tokens, num_experts)),
                               ("uniform_KT", uniform_KT, (top_k, num_tokens))):
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(noise.shape)}: accepted shape is [top_k, tokens"
                             f"{', experts' if name == 'gumbel_KTE' else ''}] = {shape}")
    dtype = logits_TE.dtype
    if training and (gumbel_KTE is None or uniform_KT is None):
        if rng is None:
            raise ValueError("sparsemixer_v2: training=True needs rng (or explicit gumbel_KTE and uniform_KT)")
        key_g, key_u = jax.random.split(rng)
        if gumbel_KTE is None:
            gumbel_KTE = jax.random.gumbel(key_g, (top_k, num_tokens, num_experts), dtype)
        if uniform_KT is None:
            uniform_KT = jax.random.uniform(key_u, (top_k, num_tokens), dtype)

    z_TE = logits_TE
    remaining_TE = z_TE
    ids, weights, candidates = [], [], []
    for slot in range(top_k):  # K is a small static number (the slots), not experts or tokens
        keep_TE = sparsity_mask(z_TE, remaining_TE, jitter_eps)
        masked_TE = jnp.where(keep_TE, remaining_TE, -jnp.inf)
        if training:
            picked_T = jnp.argmax(jax.lax.stop_gradient(masked_TE) + gumbel_KTE[slot], axis=-1)
        else:
            picked_T = jnp.argmax(jax.lax.stop_gradient(remaining_TE), axis=-1)
        onehot_TE = jax.nn.one_hot(picked_T, num_experts, dtype=dtype)
        if training:
            pi_TE = jax.lax.stop_gradient(jax.nn.softmax(masked_TE, axis=-1))
            m_o_T = jnp.sum(pi_TE * onehot_TE, axis=-1)
            c_T = _midpoint_scale(picked_T, pi_TE, uniform_KT[slot], dtype)
            weight_T = _gradient_informed_weight(z_TE, m_o_T, onehot_TE, pi_TE, c_T)
        else:
            pi_TE = jax.nn.softmax(masked_TE, axis=-1)
            weight_T = jnp.sum(pi_TE * onehot_TE, axis=-1)
        ids.append(picked_T.astype(jnp.int32))
        weights.append(weight_T)
        candidates.append(jnp.sum(jax.lax.stop_gradient(pi_TE) > 0, axis=-1).astype(jnp.int32))
        remaining_TE = jnp.where(onehot_TE > 0, -jnp.inf, remaining_TE)
    return jnp.stack(ids, axis=-1), jnp.stack(weights, axis=-1), jnp.stack(candidates, axis=0)
