"""Autoregressive generation with a KV cache: one jitted prefill, then one jitted decode step per token.

Axes: B batch, P prompt length, N new tokens, V vocabulary.

    tokens_BT = generate(graphdef, params, prompt_BP, max_new_tokens=N)                      # greedy
    tokens_BT = generate(graphdef, params, prompt_BP, max_new_tokens=N, temperature=0.8, top_p=0.95, rng=key)

All prompts in a batch have the same length P (no padding). The cache holds P + N positions (slot j =
position j); the sliding window, if any, is applied by the attention mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grin_jax.models.lm import VARIABLES, DecoderLM, apply_with_cache, init_cache


def sample_logits(logits_BV: jax.Array, rng, temperature=0.0, top_p=1.0) -> jax.Array:
    """Next token [B] int32: argmax when temperature == 0, else a sample from softmax(logits / temperature)
    restricted to the smallest set of most likely tokens whose probability reaches top_p (nucleus).

    temperature and top_p may be traced scalars (one compiled step serves every setting); a Python 0.0
    temperature skips the sampling code."""
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if isinstance(temperature, (int, float)) and temperature == 0:
        return greedy_B
    temperature = jnp.asarray(temperature, jnp.float32)
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    sorted_BV = jnp.sort(scaled_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of strictly more likely tokens
    keep_BV = before_BV < top_p                           # the most likely token is always kept
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    scaled_BV = jnp.where(scaled_BV >= threshold_B1, scaled_BV, -jnp.inf)
    sample_B = jax.random.categorical(rng, scaled_BV, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sample_B, greedy_B)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, params, prompt_BP, cache, rng, temperature, top_p):
    logits_BPV, _, cache = apply_with_cache(graphdef, params, prompt_BP, cache, jnp.int32(0))
    return sample_logits(logits_BPV[:, -1], rng, temperature, top_p), cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode_step(graphdef, params, token_B, cache, index, rng, temperature, top_p):
    logits_B1V, _, cache = apply_with_cache(graphdef, params, token_B[:, None], cache, index)
    return sample_logits(logits_B1V[:, -1], rng, temperature, top_p), cache


def generate(graphdef, params=None, prompt_BP=None, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, rng=None, eos_id: int | None = None, cache_dtype=None) -> jax.Array:
    """Generate `max_new_tokens` tokens after `prompt_BP` ([B, P] int). Returns [B, P + N] int32.

    graphdef, params: from `init` (the model's variables: running statistics included, read in eval mode) or
    `trainer.load_trained`; or pass a DecoderLM as `graphdef` alone.
    temperature 0 = greedy; top_p in (0, 1] nucleus sampling; rng: a key (needed when temperature > 0).
    eos_id: once a row emits it, the row's later tokens are eos_id; generation stops when every row is done.
    """
    if isinstance(graphdef, DecoderLM):
        if prompt_BP is None:
            prompt_BP = params
        graphdef, params = nnx.split(graphdef, VARIABLES)
    config = graphdef_config(graphdef, params)
    prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
    if prompt_BP.ndim != 2 or prompt_BP.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1], got shape {prompt_BP.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: accepted values are integers >= 1")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} is invalid: accepted values are >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: accepted values are in (0, 1]")
    batch, prompt_len = prompt_BP.shape
    total = prompt_len + max_new_tokens
    if total > config.max_seq_len:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {total} exceeds "
                         f"ModelConfig.max_seq_len={config.max_seq_len}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng")
    rng = jax.random.key(0) if rng is None else rng
    temperature, top_p = jnp.float32(temperature), jnp.float32(top_p)  # traced: no recompilation per setting
    cache = init_cache(config, batch, total, cache_dtype)
    rng, step_rng = jax.random.split(rng)
    token_B, cache = _prefill(graphdef, params, prompt_BP, cache, step_rng, temperature, top_p)
    out = [token_B]
    done_B = np.zeros((batch,), bool) if eos_id is None else np.asarray(token_B) == eos_id
    for n in range(1, max_new_tokens):
        if eos_id is not None and done_B.all():
            out.append(jnp.full((batch,), eos_id, jnp.int32))
            continue
        rng, step_rng = jax.random.split(rng)
        token_B, cache = _decode_step(graphdef, params, token_B, cache, jnp.int32(prompt_len + n - 1), step_rng,
                                      temperature, top_p)
        if eos_id is not None:
            token_B = jnp.where(jnp.asarray(done_B), eos_id, token_B)
            done_B = done_B | (np.asarray(token_B) == eos_id)
        out.append(token_B)
    return jnp.concatenate([prompt_BP, jnp.stack(out, axis=1)], axis=1)


def graphdef_config(graphdef, params):
    """The ModelConfig of a split DecoderLM."""
    return nnx.merge(graphdef, params).config
