"""Corpus statistics: unigram entropy and bits-per-byte conversions.

Counting convention (matches what `eval_batches` scores): a split's targets are every token of every document plus
one EOS per document; its bytes are the documents' UTF-8 bytes plus one per document (the EOS). With the byte
tokenizer tokens == bytes, so bits per token == bits per byte. `tokenizer.token_bytes[targets]` gives the same
byte count for any batch, so a token-level loss converts to bits per byte exactly.
"""
from __future__ import annotations

import math

import numpy as np

from grin_jax.data import config as _config
from grin_jax.data import pipeline as _pipeline
from grin_jax.data import sources as _sources

LN2 = math.log(2.0)


def entropy_bits(counts) -> float:
    """Plug-in entropy (bits per symbol) of a histogram."""
    c = np.asarray(counts, np.float64).reshape(-1)
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def bits_per_byte(loss_nats_sum: float, num_bytes: int) -> float:
    """Total loss in nats over some targets -> bits per byte of the text they stand for."""
    return float(loss_nats_sum) / LN2 / float(num_bytes)


def nats_per_token_to_bits_per_byte(loss_nats_per_token: float, num_tokens: int, num_bytes: int) -> float:
    """A mean token-level loss (nats) -> bits per byte, given the token and byte counts it was averaged over."""
    return bits_per_byte(loss_nats_per_token * num_tokens, num_bytes)


def batch_bytes(tokenizer, targets, loss_mask) -> int:
    """UTF-8 bytes the unmasked targets of a batch stand for (EOS counts 1)."""
    t = np.asarray(targets)
    return int((tokenizer.token_bytes[t] * (np.asarray(loss_mask) > 0)).sum())


def split_statistics(config, split: str | None = None, *, tokenizer=None, max_documents: int | None = None) -> dict:
    """Documents, bytes, tokens and the unigram entropy of one split (default data.eval_split).

    Returns a dict: documents, bytes, tokens, unigram_bits_per_token, unigram_bits_per_byte. The unigram entropy is
    the plug-in entropy of the split's own token histogram, the best loss any model that ignores context can reach
    on it; a language model's validation loss in bits per byte should be well below unigram_bits_per_byte.
    """
    _config.validate_data_config(config)
    split = split or config.eval_split
    data_dir = _sources.resolve_data_dir(config)
    tokenizer = tokenizer or _pipeline.make_tokenizer(config, data_dir=data_dir)
    docs = _sources.documents(config, split, data_dir=data_dir)
    n = len(docs) if max_documents is None else min(len(docs), max_documents)
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    num_bytes = 0
    for i in range(n):
        d = docs[i]
        counts += np.bincount(tokenizer.encode(d), minlength=tokenizer.vocab_size)
        num_bytes += len(d) + 1
    counts[tokenizer.eos_id] += n
    tokens = int(counts.sum())
    h = entropy_bits(counts)
    return {"documents": n, "bytes": num_bytes, "tokens": tokens, "unigram_bits_per_token": h,
            "unigram_bits_per_byte": h * tokens / num_bytes if num_bytes else 0.0}
