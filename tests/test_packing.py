"""Packing is invisible to the model: a document's loss inside a packed row (segment ids + per-document positions,
as the data pipeline makes them) equals its loss evaluated alone, with full and sliding-window attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grin_jax.data import packing
from grin_jax.models import lm
from grin_jax.models.config import ModelConfig

VOCAB, EOS, PAD, SEQ = 64, 63, 62, 64


def _config(window):
    return ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=SEQ,
                       sliding_window=window)


def _row(docs, seq_len):
    """The pipeline's row for the stream `EOS d0 EOS d1 EOS ...` (packing.py layout)."""
    tokens = np.concatenate([[EOS]] + [np.append(d, EOS) for d in docs]).astype(np.int32)
    doc_ids = np.concatenate([[-1]] + [np.full(len(d) + 1, j) for j, d in enumerate(docs)])
    assert len(tokens) <= seq_len + 1
    return packing.window_features(tokens, doc_ids, seq_len, PAD)


def _nll(logits_BSV, targets_BS):
    logp = jax.nn.log_softmax(logits_BSV, axis=-1)
    return np.asarray(-jnp.take_along_axis(logp, jnp.asarray(targets_BS)[..., None], axis=-1)[..., 0])


@pytest.mark.parametrize("window", [None, 4])
def test_document_loss_in_a_packed_row_equals_its_loss_alone(window):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60, size=n).astype(np.int32) for n in (9, 17, 3, 20)]
    graphdef, params = lm.init(_config(window), jax.random.key(1))
    rows = [_row(docs, SEQ), _row(docs[::-1], SEQ)]  # the same documents at other offsets in a second row
    batch = {k: np.stack([r[k] for r in rows]) for k in packing.FEATURES}
    logits, _ = lm.apply(graphdef, params, jnp.asarray(batch["inputs"]), training=False,
                         positions_BS=jnp.asarray(batch["positions"]), segment_ids_BS=jnp.asarray(batch["segment_ids"]))
    packed_nll = _nll(logits, batch["targets"])
    assert np.isfinite(packed_nll).all()
    for r, order in enumerate([range(4), range(3, -1, -1)]):
        for seg, j in enumerate(order, start=1):
            alone = _row([docs[j]], len(docs[j]) + 1)  # EOS d -> d EOS, no padding, one segment
            logits_1, _ = lm.apply(graphdef, params, jnp.asarray(alone["inputs"][None]), training=False)
            alone_nll = _nll(logits_1, alone["targets"][None])[0]
            in_row = packed_nll[r][batch["segment_ids"][r] == seg]
            assert in_row.shape == alone_nll.shape
            np.testing.assert_allclose(in_row, alone_nll, atol=1e-5, rtol=0, err_msg=f"row {r} document {j}")
            assert abs(in_row.mean() - alone_nll.mean()) < 1e-5
    # Without the segment ids the later documents of a row attend to the earlier ones: the loss changes.
    leaky, _ = lm.apply(graphdef, params, jnp.asarray(batch["inputs"]), training=False,
                        positions_BS=jnp.asarray(batch["positions"]))
    assert np.abs(_nll(leaky, batch["targets"]) - packed_nll)[batch["loss_mask"] > 0].max() > 1e-3
