"""Corpus statistics: unigram entropy and bits-per-byte conversions; the validation loss with its standard error
over documents (validation_stats, DocumentLosses).

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


def validation_stats(nll_sum_per_doc, tokens_per_doc) -> dict:
    """The token-weighted mean loss over documents and its standard error, treating documents as the sampled units.

    With y_i the summed NLL and n_i the scored tokens of document i (documents with n_i = 0 are left out; m remain,
    N = sum n_i), the loss is the ratio estimator L = sum y_i / N (= the mean loss per token). Its standard error
    is the delta-method (linearisation) estimator of a ratio of means over m independently drawn documents:

        se(L) = sqrt( m / (m - 1) * sum_i (y_i - L n_i)**2 ) / N

    which is consistent when documents are the independent units (tokens within a document are not independent,
    so a per-token standard error would be far too small) and agrees with a bootstrap over documents (tested).
    It is the spread of L over re-draws of the validation documents. For the difference of two models on the same
    documents pass nll_a - nll_b: the same formula gives the paired standard error, usually much smaller.

    Returns {'loss', 'stderr' (nan with fewer than 2 documents), 'documents' (m), 'tokens' (N)}.
    """
    y = np.asarray(nll_sum_per_doc, np.float64).reshape(-1)
    n = np.asarray(tokens_per_doc, np.float64).reshape(-1)
    if y.shape != n.shape:
        raise ValueError(f"nll_sum_per_doc has shape {y.shape}, tokens_per_doc {n.shape}: they must match")
    keep = n > 0
    y, n = y[keep], n[keep]
    m, total = int(n.size), float(n.sum())
    if m == 0:
        return {"loss": float("nan"), "stderr": float("nan"), "documents": 0, "tokens": 0.0}
    loss = float(y.sum() / total)
    stderr = float(np.sqrt(m / (m - 1) * np.sum((y - loss * n) ** 2)) / total) if m > 1 else float("nan")
    return {"loss": loss, "stderr": stderr, "documents": m, "tokens": total}


class DocumentLosses:
    """Accumulates summed NLL and scored tokens per document over evaluation batches (their 'doc_ids').

        acc = DocumentLosses()
        for batch in eval_batches(...):
            nll_BS = ...                                   # per-token NLL of the targets, [B, S]
            acc.add(batch["doc_ids"], nll_BS, batch["loss_mask"])
        acc.stats()                                        # validation_stats: loss, stderr, documents, tokens

    With several processes (each scoring its own rows), merge the per-process sums: acc.to_json() on every
    process, all-gather, then DocumentLosses.merged(list_of_json).stats().
    """

    def __init__(self, nll=None, tokens=None):
        self.nll = np.zeros(0, np.float64) if nll is None else np.asarray(nll, np.float64).copy()
        self.tokens = np.zeros(0, np.float64) if tokens is None else np.asarray(tokens, np.float64).copy()

    def _grow(self, n: int) -> None:
        if n > self.nll.size:
            self.nll = np.concatenate([self.nll, np.zeros(n - self.nll.size)])
            self.tokens = np.concatenate([self.tokens, np.zeros(n - self.tokens.size)])

    def add(self, doc_ids, nll, loss_mask) -> None:
        ids = np.asarray(doc_ids).reshape(-1)
        w = np.asarray(loss_mask, np.float64).reshape(-1)
        x = np.asarray(nll, np.float64).reshape(-1)
        keep = (ids >= 0) & (w > 0)
        ids, w, x = ids[keep], w[keep], x[keep]
        if ids.size == 0:
            return
        n = int(ids.max()) + 1
        self._grow(n)
        self.nll[:n] += np.bincount(ids, weights=x * w, minlength=n)
        self.tokens[:n] += np.bincount(ids, weights=w, minlength=n)

    def to_json(self) -> dict:
        return {"nll": self.nll.tolist(), "tokens": self.tokens.tolist()}

    @classmethod
    def merged(cls, parts) -> "DocumentLosses":
        """The sum of several accumulators (DocumentLosses or their to_json() dicts)."""
        out = cls()
        for p in parts:
            nll, tokens = (p["nll"], p["tokens"]) if isinstance(p, dict) else (p.nll, p.tokens)
            nll, tokens = np.asarray(nll, np.float64), np.asarray(tokens, np.float64)
            out._grow(nll.size)
            out.nll[:nll.size] += nll
            out.tokens[:tokens.size] += tokens
        return out

    def stats(self) -> dict:
        return validation_stats(self.nll, self.tokens)
