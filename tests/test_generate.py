"""KV-cache generation equals argmax decoding by full recomputation; nucleus sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grin_jax.models import ModelConfig, apply_jit, generate, init, sample_logits

PROMPT, NEW = 5, 9
CONFIG = ModelConfig.make(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32,
                          sliding_window=6,  # < PROMPT + NEW: the window slides during decoding
                          attention_bias=True, lm_head_bias=True, layout="moe",
                          moe=dict(num_experts=4, top_k=2, d_hidden=24, input_jitter=0.01,
                                   router_options={"jitter_eps": 0.3}))


@pytest.fixture(scope="module")
def model():
    graphdef, params = init(CONFIG, 3)
    # larger weights than the default init so the next-token argmax is decisive (no float near-ties)
    params = jax.tree.map(lambda x: x * 3.0, params)
    prompt = jax.random.randint(jax.random.key(4), (2, PROMPT), 0, CONFIG.vocab_size)
    return graphdef, params, prompt


def _greedy_by_recomputation(graphdef, params, prompt, new):
    batch, length = prompt.shape
    tokens = np.zeros((batch, length + new), np.int32)  # future slots: causal attention never sees them
    tokens[:, :length] = np.asarray(prompt)
    for t in range(length, length + new):
        logits, _ = apply_jit(graphdef, params, jnp.asarray(tokens))
        tokens[:, t] = np.argmax(np.asarray(logits[:, t - 1]), axis=-1)
    return tokens


def test_kv_cache_greedy_equals_full_recomputation(model):
    graphdef, params, prompt = model
    out = generate(graphdef, params, prompt, max_new_tokens=NEW)
    assert out.shape == (2, PROMPT + NEW) and out.dtype == jnp.int32
    expected = _greedy_by_recomputation(graphdef, params, prompt, NEW)
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert len(set(expected[:, PROMPT:].ravel().tolist())) > 2  # a non-degenerate continuation
    # eos: once emitted, the row stays at eos
    eos = int(expected[0, PROMPT + 1])
    out_eos = np.asarray(generate(graphdef, params, prompt, max_new_tokens=NEW, eos_id=eos))
    first = PROMPT + list(expected[0, PROMPT:]).index(eos)
    np.testing.assert_array_equal(out_eos[0, :first + 1], expected[0, :first + 1])
    assert np.all(out_eos[0, first:] == eos)


def test_sampling_is_reproducible_and_valid(model):
    graphdef, params, prompt = model
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.9)
    a = generate(graphdef, params, prompt, rng=jax.random.key(7), **kw)
    b = generate(graphdef, params, prompt, rng=jax.random.key(7), **kw)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :PROMPT], prompt)
    assert np.all((np.asarray(a) >= 0) & (np.asarray(a) < CONFIG.vocab_size))


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draw = jax.jit(jax.vmap(lambda k, p: sample_logits(logits, k, 1.0, p)[0], in_axes=(0, None)),
                   static_argnums=1)
    samples = np.asarray(draw(keys, 0.7))  # {0.5, 0.3} reach 0.8 >= 0.7; 0.15 and 0.05 are cut
    assert set(samples.tolist()) == {1, 3}
    assert abs(np.mean(samples == 1) - 0.5 / 0.8) < 0.05
    assert set(np.asarray(draw(keys, 0.45)).tolist()) == {1}  # the top token alone reaches 0.45
    np.testing.assert_array_equal(sample_logits(logits, None, 0.0), [1])  # temperature 0: argmax


def test_generate_errors():
    graphdef, params = init(CONFIG.replace(num_layers=1), 0)
    prompt = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="exceeds ModelConfig.max_seq_len=32"):
        generate(graphdef, params, prompt, max_new_tokens=29)
    with pytest.raises(ValueError, match="needs rng"):
        generate(graphdef, params, prompt, max_new_tokens=2, temperature=0.5)
    with pytest.raises(ValueError, match="top_p=0.0 is invalid"):
        generate(graphdef, params, prompt, max_new_tokens=2, top_p=0.0)
