"""grin_jax.nn.attention: document-aware (segment) masking for packed rows; causality from the token index."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grin_jax.nn.attention import Attention, attention_mask, init_kv_cache

D, H, G, K = 32, 4, 2, 8


def _attn(window=None, seed=0):
    return Attention(D, H, G, K, sliding_window=window, rngs=nnx.Rngs(seed))


def _x(rng, b, s):
    return jnp.asarray(rng.normal(size=(b, s, D)), jnp.float32)


def _arange(b, s):
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


def _old_mask(q_pos, k_pos, window):
    """The mask before segment ids: causal / sliding window on positions."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed


@pytest.mark.parametrize("window", [None, 1, 3, 16])
def test_mask_without_segments_is_the_old_mask(window):
    idx = _arange(2, 12)
    np.testing.assert_array_equal(attention_mask(idx, idx, window), _old_mask(idx, idx, window))
    ones = jnp.ones((2, 12), jnp.int32)
    np.testing.assert_array_equal(attention_mask(idx, idx, window, ones, ones), _old_mask(idx, idx, window))
    with pytest.raises(ValueError, match="both"):
        attention_mask(idx, idx, window, ones, None)


@pytest.mark.parametrize("window", [None, 3])
def test_one_segment_is_bit_identical_to_no_segments(window):
    rng = np.random.default_rng(0)
    attn, x, pos = _attn(window), _x(rng, 2, 10), _arange(2, 10)
    y0, _ = attn(x, pos)
    y1, _ = attn(x, pos, segment_ids_BS=jnp.ones((2, 10), jnp.int32))
    np.testing.assert_array_equal(y0, y1)
    # the reference: the same weights, the pre-segment mask built from positions
    q, k, v = attn.q(x), attn.k(x), attn.v(x)
    from grin_jax.nn.attention import apply_rope, dot_product_attention, rope_cos_sin
    cos, sin = rope_cos_sin(pos, K, attn.rope_theta)
    ref = attn.o(dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v,
                                       _old_mask(pos, pos, window)))
    np.testing.assert_array_equal(y0, ref)


def _packed_row(lengths, pad):
    """segment ids (1, 2, ...; 0 for padding) and per-document positions of documents packed into one row."""
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad, int)])
    pos = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad, int)])
    return jnp.asarray(seg[None], jnp.int32), jnp.asarray(pos[None], jnp.int32)


@pytest.mark.parametrize("window", [None, 1, 3])
def test_packed_documents_equal_each_document_alone(window):
    rng = np.random.default_rng(1)
    attn = _attn(window, seed=2)
    lengths, pad = [5, 7, 1, 6], 3
    seg, pos = _packed_row(lengths, pad)
    x = _x(rng, 1, sum(lengths) + pad)
    packed, _ = attn(x, pos, segment_ids_BS=seg)
    start = 0
    for n in lengths:
        alone, _ = attn(x[:, start:start + n], _arange(1, n))
        np.testing.assert_allclose(packed[:, start:start + n], alone, atol=1e-5, rtol=0)
        start += n
    assert np.isfinite(np.asarray(packed)).all()  # padding (segment 0) attends to padding only: no empty row
    # Without segment ids the later documents see the earlier ones (the mask is what makes them separate).
    leaky, _ = attn(x, pos)
    assert window == 1 or np.abs(np.asarray(leaky[:, 5:12]) - np.asarray(packed[:, 5:12])).max() > 1e-3


def test_causality_comes_from_the_index_not_the_positions():
    idx = _arange(1, 6)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2]], jnp.int32)
    m = np.asarray(attention_mask(idx, idx, None, seg, seg))[0]
    want = np.tril(np.ones((6, 6), bool)) & (np.asarray(seg)[0][:, None] == np.asarray(seg)[0][None, :])
    np.testing.assert_array_equal(m, want)
    # positions restart per document: a query at position 0 of document 2 still sees nothing of document 1, and
    # nothing later in its own document
    rng = np.random.default_rng(3)
    attn, x = _attn(None), _x(rng, 1, 6)
    pos = jnp.asarray([[0, 1, 2, 0, 1, 2]], jnp.int32)
    y, _ = attn(x, pos, segment_ids_BS=seg)
    x2 = x.at[:, 5].set(100.0)  # a change to the last token changes no earlier output
    y2, _ = attn(x2, pos, segment_ids_BS=seg)
    np.testing.assert_array_equal(y[:, :5], y2[:, :5])


def test_cache_path_unchanged_and_rejects_segments():
    rng = np.random.default_rng(4)
    attn, x = _attn(3), _x(rng, 2, 9)
    full, _ = attn(x, _arange(2, 9))
    cache = init_kv_cache(2, 12, G, K)
    outs = []
    for t in range(9):  # token by token through the cache
        y, cache = attn(x[:, t:t + 1], _arange(2, 1) + t, cache=cache, cache_index=jnp.int32(t))
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)
    y5, _ = attn(x[:, :5], _arange(2, 5), cache=init_kv_cache(2, 12, G, K), cache_index=jnp.int32(0))
    np.testing.assert_allclose(y5, full[:, :5], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="segment_ids_BS"):
        attn(x[:, :1], _arange(2, 1), segment_ids_BS=jnp.ones((2, 1), jnp.int32), cache=cache,
             cache_index=jnp.int32(0))


def test_segments_under_jit():
    rng = np.random.default_rng(5)
    attn = _attn(4)
    seg, pos = _packed_row([6, 9], 1)
    x = _x(rng, 1, 16)
    graphdef, state = nnx.split(attn)

    @jax.jit
    def f(state, x, pos, seg):
        return nnx.merge(graphdef, state)(x, pos, segment_ids_BS=seg)[0]

    np.testing.assert_allclose(f(state, x, pos, seg), attn(x, pos, segment_ids_BS=seg)[0], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ the CPU kernel
def _masks(B, S, L):
    """Masks [B, S, L] the kernel must handle: causal, a sliding window, packed segments with padding, queries at
    the end of a longer cache (S < L, a different window per row), rows with no allowed key at all, and allowed
    keys that are not one run (the kernel's general path; the others take its one-run path)."""
    rng = np.random.default_rng(0)
    q_idx = jnp.broadcast_to(jnp.arange(L - S, L), (B, S))
    k_idx = jnp.broadcast_to(jnp.arange(L), (B, L))
    seg = np.cumsum(rng.integers(0, 2, (B, L)) * (rng.random((B, L)) < 0.05), axis=-1) + 1
    seg[:, -5:] = 0                                                    # padding: its own segment
    seg = jnp.asarray(seg)
    empty = np.array(attention_mask(q_idx, k_idx, None))
    empty[0, ::7] = False                                              # rows with no allowed key
    holes = np.array(attention_mask(q_idx, k_idx, None)) & (rng.random((B, S, L)) < 0.7)
    holes[:, :, L - S] = True                                          # allowed keys not in one run
    return {"causal": attention_mask(q_idx, k_idx, None), "window": attention_mask(q_idx, k_idx, 9),
            "segments": attention_mask(q_idx, k_idx, None, seg[:, L - S:], seg), "empty rows": jnp.asarray(empty),
            "holes": jnp.asarray(holes)}


@pytest.mark.parametrize("shape", [(2, 100, 100, 4, 2), (1, 70, 130, 2, 2), (3, 64, 64, 3, 1)])
def test_kernel_attention_equals_the_xla_path(shape):
    """backend='kernel' (the fused CPU kernel) against backend='xla': output and the gradients of q, k, v to 2e-6
    relative, for every mask kind (including rows with no allowed key, which average all values), partial row blocks
    (S not a multiple of 64), S < L, and R = H / G of 2, 1 and 3."""
    from grin_jax.nn.attention import dot_product_attention
    B, S, L, H, G = shape
    K = 16
    r = jax.random.split(jax.random.key(S), 4)
    q = jax.random.normal(r[0], (B, S, H, K))
    k, v = jax.random.normal(r[1], (B, L, G, K)), jax.random.normal(r[2], (B, L, G, K))
    cot = jax.random.normal(r[3], (B, S, H, K))
    for name, mask in _masks(B, S, L).items():
        results = {}
        for backend in ("xla", "kernel"):
            def f(q, k, v, backend=backend):
                out = dot_product_attention(q, k, v, mask, backend=backend)
                return jnp.sum(out * cot), out
            (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
            results[backend] = (out, *grads)
        for what, a, b in zip(("out", "dq", "dk", "dv"), results["xla"], results["kernel"]):
            scale = float(jnp.max(jnp.abs(a)))
            assert scale > 1e-3, (name, what)
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-6, atol=2e-6 * scale,
                                       err_msg=f"{name}: {what}")


def test_attention_backend_choice_and_errors():
    """'auto' takes the kernel on one CPU device in float32 and XLA otherwise; 'kernel' where it cannot run raises
    naming why; an unknown backend names the accepted ones."""
    from grin_jax.nn.attention import attention_kernel_unavailable, dot_product_attention
    assert attention_kernel_unavailable(jnp.float32) is None
    assert "bfloat16" in attention_kernel_unavailable(jnp.bfloat16)
    q = jnp.ones((1, 4, 2, 8))
    mask = attention_mask(_arange(1, 4), _arange(1, 4), None)
    with pytest.raises(ValueError, match="backend='kernel' cannot run here: the compute dtype is bfloat16"):
        dot_product_attention(q, q, q, mask, dtype=jnp.bfloat16, backend="kernel")
    with pytest.raises(ValueError, match=r"backend='flash'; accepted are \['auto', 'xla', 'kernel'\]"):
        dot_product_attention(q, q, q, mask, backend="flash")
    assert "custom_call" in jax.jit(lambda q: dot_product_attention(q, q, q, mask)).lower(q).as_text()
    assert "custom_call" not in jax.jit(lambda q: dot_product_attention(q, q, q, mask, backend="xla")).lower(q).as_text()


def test_rope_table_equals_the_direct_angles_and_leaves_no_transcendentals():
    """rope_cos_sin with max_positions: the table lookup gives the direct computation's cos and sin (and float64's,
    to float32's rounding of the angles), NaN past the table; a layer built with max_positions compiles without
    sine or cosine (the direct path recomputes them inside the fusions), and both layers give the same output."""
    from grin_jax.nn.attention import rope_cos_sin
    positions = jnp.asarray(np.random.default_rng(0).integers(0, 512, size=(3, 40)), jnp.int32)
    direct = rope_cos_sin(positions, 64, 10000.0)
    table = rope_cos_sin(positions, 64, 10000.0, max_positions=512)
    angles = np.asarray(positions, np.float64)[..., None] / 10000.0 ** (np.arange(0, 64, 2) / 64)
    for got, want, fn in zip(table, direct, (np.cos, np.sin)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
        # float64 angles: float32 rounds angles up to 511 rad by ~3e-5
        np.testing.assert_allclose(np.asarray(got), np.concatenate([fn(angles)] * 2, -1), rtol=0, atol=1e-4)
    outside = rope_cos_sin(jnp.asarray([[511, 512]], jnp.int32), 64, 10000.0, max_positions=512)[0]
    assert np.isfinite(np.asarray(outside[0, 0])).all() and np.isnan(np.asarray(outside[0, 1])).all()

    x = _x(np.random.default_rng(1), 2, 16)
    pos = _arange(2, 16)
    layers = {m: Attention(D, H, G, K, max_positions=m, rngs=nnx.Rngs(0)) for m in (None, 64)}
    outs, texts = {}, {}
    for m, layer in layers.items():
        fn = jax.jit(lambda x, p, layer=layer: layer(x, p)[0])
        outs[m] = fn(x, pos)
        texts[m] = fn.lower(x, pos).compile().as_text()
    np.testing.assert_allclose(np.asarray(outs[64]), np.asarray(outs[None]), rtol=0, atol=1e-6)
    assert " sine(" in texts[None] and " cosine(" in texts[None]  # the check can fail: the direct path has them
    assert " sine(" not in texts[64] and " cosine(" not in texts[64]
