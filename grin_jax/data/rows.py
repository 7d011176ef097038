"""The packed corpus: a split tokenized once into one token stream, cut into fixed-length rows with random access.

Stream and row layout are those of packing.py (`EOS d1 EOS d2 EOS ...`, row k = window stream[kS : kS+S+1]), so a
row read here is identical to the k-th row `PackIterDataset` emits when it packs the same documents in the same
order (tested). The difference is access: `PackedRows[k]` reads row k directly, which lets a grain `MapDataset`
shuffle all rows of the corpus globally (pipeline.py).

    corpus = packed_corpus(docs, tokenizer, cache_dir=data_dir)   # tokenizes on first use, then memory-maps
    rows = PackedRows(corpus, seq_len=256, pad_id=tokenizer.pad_id)
    len(rows)   # (len(stream) - 1) // seq_len full rows; the last < seq_len tokens are never a training target
    rows[k]     # dict of FEATURES

Documents are packed in the source's own order (deterministic, independent of any seed): which documents share a
row is fixed, the order in which rows are read is what the seed shuffles. Every document is cut into consecutive
rows with no token duplicated, so reading each row once (one epoch) reads each document once.

Cache: `{cache_dir}/packed/{dataset_id}-{tokenizer}-{digest}/` holds tokens.npy (uint16 when the vocabulary fits,
else int32) and bounds.npy (int64 [n_docs + 1]: document j's tokens and its EOS are stream[bounds[j]:bounds[j+1]],
bounds[0] = 1 after the leading EOS). The digest covers the dataset id, the number of documents, a sample of
documents' contents (so mock data or a changed source never reuses a stale stream), the tokenizer (its model's
hash) and this format's version. Built once under a file lock (concurrent processes wait), written atomically,
read with np.load(mmap_mode='r'): a corpus larger than memory still works, but it is tokenized once in full. For
a corpus too large to tokenize ahead, use the streaming mode (`data.shuffle='windows'`, pipeline.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil

import numpy as np

from grin_jax.data import corpus as _corpus
from grin_jax.data import packing as _packing

FORMAT_VERSION = "packed-v1"
_SAMPLE_DOCS = 64  # documents hashed into the cache key


@dataclasses.dataclass(frozen=True)
class PackedCorpus:
    """tokens: [N] stream `EOS d0 EOS d1 EOS ...`; bounds: [n_docs + 1] (document j = tokens[bounds[j]:bounds[j+1]],
    its EOS included)."""
    tokens: np.ndarray
    bounds: np.ndarray
    path: str | None = None

    @property
    def num_documents(self) -> int:
        return len(self.bounds) - 1

    def document_of(self, stream_index: np.ndarray) -> np.ndarray:
        """Document index of stream tokens (-1 for the leading EOS)."""
        return np.searchsorted(self.bounds, stream_index, side="right") - 1


def tokenizer_fingerprint(tokenizer) -> str:
    proto = getattr(tokenizer, "model_proto", None)
    if proto is not None:
        return f"{tokenizer.name}{tokenizer.vocab_size}_{hashlib.sha256(proto).hexdigest()[:12]}"
    return f"{tokenizer.name}{tokenizer.vocab_size}"


def _cache_key(docs, dataset_id: str, tokenizer) -> str:
    n = len(docs)
    h = hashlib.sha256(f"{FORMAT_VERSION}|{dataset_id}|{n}|{tokenizer_fingerprint(tokenizer)}".encode())
    for i in sorted({int(i) for i in np.linspace(0, n - 1, min(n, _SAMPLE_DOCS))} if n else ()):
        d = docs[i]
        h.update(b"%d:%d:" % (i, len(d)) + hashlib.sha256(d).digest())
    return h.hexdigest()[:16]


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in s)


def tokenize_corpus(docs, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, bounds) of the stream `EOS d0 EOS d1 EOS ...` (see PackedCorpus)."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    eos = np.array([tokenizer.eos_id], dtype)
    pieces = [eos]
    bounds = np.empty(len(docs) + 1, np.int64)
    bounds[0] = 1
    for i in range(len(docs)):
        ids = np.asarray(tokenizer.encode(docs[i])).astype(dtype, copy=False)
        pieces += [ids, eos]
        bounds[i + 1] = bounds[i] + len(ids) + 1
    return np.concatenate(pieces), bounds


def packed_corpus(docs, tokenizer, *, cache_dir: str | None, dataset_id: str | None = None) -> PackedCorpus:
    """The packed stream of `docs` (a random-access sequence of bytes), cached in cache_dir (None: not cached)."""
    dataset_id = dataset_id or getattr(docs, "dataset_id", "documents")
    if cache_dir is None:
        tokens, bounds = tokenize_corpus(docs, tokenizer)
        return PackedCorpus(tokens, bounds)
    key = _cache_key(docs, dataset_id, tokenizer)
    name = f"{_safe(dataset_id)[:80]}-{_safe(tokenizer_fingerprint(tokenizer))}-{key}"
    path = os.path.join(cache_dir, "packed", name)
    done = os.path.join(path, "bounds.npy")
    if not os.path.exists(done):
        with _corpus.file_lock(path + ".lock"):
            if not os.path.exists(done):
                tokens, bounds = tokenize_corpus(docs, tokenizer)
                tmp = f"{path}.tmp{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                np.save(os.path.join(tmp, "tokens.npy"), tokens)
                np.save(os.path.join(tmp, "bounds.npy"), bounds)
                shutil.rmtree(path, ignore_errors=True)
                os.replace(tmp, path)
    return PackedCorpus(np.load(os.path.join(path, "tokens.npy"), mmap_mode="r"), np.load(done), path)


class PackedRows:
    """Random access to the rows of a PackedCorpus (layout: packing.py); `with_doc_ids` adds 'doc_ids' (the
    document index in the split of each target, -1 for padding)."""

    def __init__(self, corpus: PackedCorpus, *, seq_len: int, pad_id: int, with_doc_ids: bool = False):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r} is invalid: accepted values are ints >= 1")
        self.corpus = corpus
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.with_doc_ids = with_doc_ids
        self._len = max(len(corpus.tokens) - 1, 0) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        k = int(k)
        if not 0 <= k < self._len:
            raise IndexError(f"row {k} out of range [0, {self._len})")
        S = self.seq_len
        start = k * S
        tokens = np.asarray(self.corpus.tokens[start:start + S + 1]).astype(np.int32)
        doc_ids = self.corpus.document_of(np.arange(start, start + S + 1))
        return _packing.window_features(tokens, doc_ids, S, self.pad_id, with_doc_ids=self.with_doc_ids)

    def __repr__(self) -> str:
        return f"PackedRows(rows={self._len}, seq_len={self.seq_len}, documents={self.corpus.num_documents})"
