"""Packing tokenized documents into fixed-length rows, as a checkpointable grain IterDataset.

Layout (S = seq_len). The token stream is

    EOS d1 EOS d2 EOS d3 EOS ...

(every document followed by EOS, plus one EOS in front of the first). Row k is the window stream[kS : kS+S+1]:

    inputs      [S] int32    window[:-1]
    targets     [S] int32    window[1:]
    segment_ids [S] int32    1, 2, ... numbering, within the row, the document each *target* belongs to (an EOS
                             belongs to the document it ends). An input EOS therefore opens the next document's
                             segment: with attention masked to equal segment ids, every document is modelled as
                             `EOS d -> d EOS`, exactly as if it were alone.
    positions   [S] int32    index within the segment in this row (0 at each segment start and at the row start).
    loss_mask   [S] float32  1 for real targets, 0 for padding.
    doc_ids     [S] int32    (evaluation only, `with_doc_ids=True`) the index, among the packed documents, of the
                             document each target belongs to; -1 for padding. Lets a caller sum the loss per
                             document (stats.validation_stats).

Feeding a model: attention masked to equal `segment_ids` (causal on the index in the row) with RoPE at
`positions` models every document of a row exactly as if it were alone in a row of its own (the first rows
of a long document included: its continuation rows start a fresh context at position 0).

Consecutive rows share one token (the last target of row k is the first input of row k+1), so every token of the
stream after the leading EOS is a target exactly once. Documents are cut across rows; no token is dropped and
none is padded, except in a finite stream's last row (evaluation), whose tail has inputs = targets = PAD,
segment_ids = 0, positions = 0, loss_mask = 0.

Checkpointing: the iterator's state is (state of the document iterator just before the document holding the next
row's first token, offset of that token in the document); restoring re-reads that one document and resumes
exactly (tested). Cost per row is O(S), independent of document length.
"""
from __future__ import annotations

import collections
from typing import Any

import grain
import numpy as np

FEATURES = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
EVAL_FEATURES = FEATURES + ("doc_ids",)


def window_features(tokens: np.ndarray, doc_ids: np.ndarray, seq_len: int, pad_id: int, *,
                    with_doc_ids: bool = False) -> dict[str, np.ndarray]:
    """Row features from a window of n <= S+1 stream tokens and the document index of each token (consecutive
    documents: consecutive indices)."""
    n = len(tokens)
    m = max(n - 1, 0)  # real (input, target) pairs
    seg = doc_ids[1:] - doc_ids[1] + 1 if m > 0 else np.zeros(0, np.int64)
    idx = np.arange(m)
    starts = np.ones(m, bool)
    starts[1:] = seg[1:] != seg[:-1]
    pos = idx - np.maximum.accumulate(np.where(starts, idx, 0)) if m > 0 else idx
    out = {
        "inputs": np.full(seq_len, pad_id, np.int32),
        "targets": np.full(seq_len, pad_id, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "loss_mask": np.zeros(seq_len, np.float32),
    }
    out["inputs"][:m] = tokens[:-1]
    out["targets"][:m] = tokens[1:]
    out["segment_ids"][:m] = seg
    out["positions"][:m] = pos
    out["loss_mask"][:m] = 1.0
    if with_doc_ids:
        out["doc_ids"] = np.full(seq_len, -1, np.int32)
        out["doc_ids"][:m] = doc_ids[1:]
    return out


class _PackIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, eos_id: int, pad_id: int, pad_final: bool,
                 with_doc_ids: bool = False):
        super().__init__(parent)
        self._with_doc_ids = with_doc_ids
        self._seq_len = seq_len
        self._eos = np.array([eos_id], np.int32)
        self._pad_id = pad_id
        self._pad_final = pad_final
        # (parent state just before this document, its tokens + EOS, its index among the documents read, -1 for
        # the leading EOS); docs[0] holds the next row's first token.
        self._docs: collections.deque[tuple[Any, np.ndarray, int]] = collections.deque()
        self._offset = 0
        self._started = False
        self._next_doc = 0  # index of the next document read from the parent

    def _buffered(self) -> int:
        return sum(len(d) for _, d, _ in self._docs) - self._offset

    def __next__(self) -> dict[str, np.ndarray]:
        S = self._seq_len
        if not self._started:
            self._started = True
            self._docs.append((None, self._eos, -1))  # the leading EOS; consumed by the first row
        have = self._buffered()
        while have < S + 1:
            state = self._parent.get_state()
            try:
                doc = next(self._parent)
            except StopIteration:
                break
            toks = np.concatenate([np.asarray(doc, np.int32).reshape(-1), self._eos])
            self._docs.append((state, toks, self._next_doc))
            self._next_doc += 1
            have += len(toks)
        if have < S + 1 and (not self._pad_final or have <= 1):
            self._docs.clear()
            self._offset = 0
            raise StopIteration
        tokens, doc_ids = [], []
        need, off = S + 1, self._offset
        for _, d, j in self._docs:
            piece = d[off:off + need]
            tokens.append(piece)
            doc_ids.append(np.full(len(piece), j))
            need -= len(piece)
            off = 0
            if need == 0:
                break
        row = window_features(np.concatenate(tokens), np.concatenate(doc_ids), S, self._pad_id,
                              with_doc_ids=self._with_doc_ids)
        if have < S + 1:  # the padded last row of a finite stream
            self._docs.clear()
            self._offset = 0
        else:
            self._offset += S
            while self._offset >= len(self._docs[0][1]):
                self._offset -= len(self._docs.popleft()[1])
        return row

    def get_state(self) -> dict[str, Any]:
        if self._docs:
            parent_state, doc_index = self._docs[0][0], self._docs[0][2]
        else:
            parent_state, doc_index = self._parent.get_state(), self._next_doc
        return {"parent": parent_state, "offset": self._offset, "started": self._started, "doc_index": doc_index}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._docs.clear()
        self._offset = int(state["offset"])
        self._started = bool(state["started"])
        self._next_doc = int(state.get("doc_index", 0))  # states written before doc_index existed: 0


class PackIterDataset(grain.IterDataset):
    """Token-id documents -> rows of `FEATURES` (see the module docstring for the layout).

    pad_final: emit the last, partial row of a finite stream padded (evaluation); otherwise it is dropped.
    with_doc_ids: add the 'doc_ids' feature (EVAL_FEATURES).
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, eos_id: int, pad_id: int,
                 pad_final: bool = False, with_doc_ids: bool = False):
        super().__init__(parent)
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r} is invalid: accepted values are ints >= 1")
        self._seq_len = seq_len
        self._eos_id = eos_id
        self._pad_id = pad_id
        self._pad_final = pad_final
        self._with_doc_ids = with_doc_ids

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._eos_id, self._pad_id, self._pad_final,
                             self._with_doc_ids)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len})"
