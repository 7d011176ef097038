"""The entry points the trainer calls: `make_dataset` (infinite, shuffled, checkpointable) and `eval_batches`
(finite, deterministic, identical batch count on every process).

Training stream, data.shuffle='global' (the default): every batch a uniform sample of the whole corpus.

    rows = PackedRows(packed_corpus(split))       # rows.py: the split tokenized once (cached in data_dir) and cut
                                                  # into R = len(rows) fixed rows, layout in packing.py
    MapDataset.source(rows).shuffle()             # epoch e reads all R rows in a fresh random order, from
      .repeat()                                   #   (seed, e) only: random access, no shuffle buffer
    -> ProcessBlocksMapDataset                    # global batch t = shuffled rows [t*G, (t+1)*G), G = B * P:
                                                  #   process i takes rows [t*G + i*B, t*G + (i+1)*B)
    -> .to_iter_dataset().batch(B)                # B = batch_size, per process

  * uniform: a batch's rows are a uniformly random draw (without replacement within an epoch) from all rows;
  * no document twice within an epoch: documents are cut into consecutive rows without duplication, and an epoch
    reads every row once; the last (len(stream) - 1) % seq_len tokens of the split are never a target;
  * disjoint per process: the P processes read disjoint rows of one shuffled sequence, and concatenating their
    batches t in process order gives exactly batch t of the one-process stream with batch size B * P;
  * deterministic from the seed, and checkpointable: the iterator's state is one integer (the next element),
    so set_state resumes on exactly the next batch at any point of any epoch.
  Epochs cross batch boundaries (a batch may hold the end of one epoch and the start of the next).

Training stream, data.shuffle='windows' (the stream before the global shuffle; also the streaming mode for a
corpus too large to tokenize ahead, since it needs random access to documents only):

    MapDataset.source(documents)[process_index::process_count]   # each process: a disjoint set of documents
      .seed(seed).shuffle().repeat()                              # a new document order every epoch (*)
      .map(tokenize).to_iter_dataset()
    -> PackIterDataset(seq_len)                                   # rows, layout in packing.py
    -> WindowShuffleIterDataset(shuffle_windows)                  # mixes rows of long documents
    -> .batch(batch_size, drop_remainder=True)

  Consecutive rows of a document stay within one buffer of `shuffle_windows` rows, so a batch holds rows of only
  about shuffle_windows * seq_len / (mean document tokens) documents: local when documents are long (stdlib
  files: ~16 documents per 1,024-row buffer at seq_len 256), nearly uniform when the buffer holds many
  thousands of short documents. For a huge corpus of short documents set shuffle_windows to 10**5 or more.

Each batch is a dict of [batch_size, seq_len] arrays: inputs, targets, segment_ids, positions (int32) and loss_mask
(float32). The iterator (`DataIterator`) has get_state() / set_state(state) (a JSON-able dict: save it with the
model checkpoint and training resumes on exactly the next batch) and position(): where the stream is,
{'epoch', 'corpus_fraction', 'rows_seen', 'rows_per_epoch'} (DataIterator.position).

(*) grain's `shuffle` (index_shuffle) cycle-walks a domain of at least ~2**16 indices: about 60 ms per epoch
whatever the number of documents, i.e. 2 ms per document for 32 documents, which makes small corpora and mock
data crawl. Shards with fewer than 2**16 elements therefore use `PermutationShuffleMapDataset` (same contract:
a fresh order each epoch from (seed, epoch), no state beyond the element index); larger ones use grain's.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator

import grain
import numpy as np

from grin_jax.data import config as _config
from grin_jax.data import packing as _packing
from grin_jax.data import rows as _rows
from grin_jax.data import sources as _sources
from grin_jax.data import tokenizers as _tokenizers


INDEX_SHUFFLE_MIN_DOCS = 1 << 16


class PermutationShuffleMapDataset(grain.MapDataset):
    """Like `MapDataset.shuffle()`: element i of epoch e = parent[permutation(seed, e)[i]], with an explicit numpy
    permutation per epoch (cached; O(len) memory), for small datasets where grain's index_shuffle is slow."""

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._seed = int(seed)
        self._cache: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, j = divmod(int(index), len(self._parent))
        cached_epoch, perm = self._cache
        if cached_epoch != epoch:
            perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._parent))
            self._cache = (epoch, perm)
        return self._parent[int(perm[j])]

    def __str__(self) -> str:
        return f"PermutationShuffleMapDataset(seed={self._seed})"


class ProcessBlocksMapDataset(grain.MapDataset):
    """Process `index` of `count`'s share of a (shuffled) sequence read in global batches of count * block
    elements: element j = parent[(j // block) * count * block + index * block + j % block]."""

    def __init__(self, parent: grain.MapDataset, *, block: int, index: int, count: int):
        super().__init__(parent)
        self._block, self._index, self._count = int(block), int(index), int(count)

    def __len__(self) -> int:
        return len(self._parent) // (self._block * self._count) * self._block

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        t, r = divmod(int(index), self._block)
        return self._parent[(t * self._count + self._index) * self._block + r]

    def __str__(self) -> str:
        return f"ProcessBlocksMapDataset(block={self._block}, index={self._index}, count={self._count})"


def _global_seed(seed: int) -> int:
    """The row-shuffle seed of run seed `seed`: a hash, so that run seeds s and s + 1 do not share epochs (grain's
    shuffle seeds epoch e with seed + e)."""
    return int.from_bytes(hashlib.sha256(f"grin_jax.data.global:{int(seed)}".encode()).digest()[:4], "big")


class DataIterator:
    """The training iterator make_dataset returns: next() gives a batch; get_state() / set_state(state) (JSON-able)
    checkpoint it; position() says where the stream is."""

    def __init__(self, it, *, shuffle: str, global_batch_rows: int, rows_per_epoch: int | Callable[[], int]):
        self._it = it
        self._shuffle = shuffle
        self._global_batch_rows = global_batch_rows
        self._rows_per_epoch = rows_per_epoch
        self._batches = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._batches += 1
        return batch

    @property
    def rows_per_epoch(self) -> int:
        if callable(self._rows_per_epoch):
            self._rows_per_epoch = int(self._rows_per_epoch())
        return self._rows_per_epoch

    def position(self) -> dict[str, Any]:
        """Where the stream is, counted over all processes (every process returns the same numbers):
          rows_seen        rows read by all processes so far (batches * batch_size * process_count)
          rows_per_epoch   rows in one pass over the split (R)
          epoch            rows_seen // R: the epoch the next row comes from (0 = the first pass)
          corpus_fraction  rows_seen / R: passes over the corpus so far; below 1.0 no document has been seen twice
        With shuffle='windows' R is that of the packed split (the 'global' rows), so the numbers are approximate
        (each process packs its own documents) and rows_seen restarts at 0 after restoring a state saved before
        DataIterator existed."""
        rows, per_epoch = self._batches * self._global_batch_rows, self.rows_per_epoch
        return {"epoch": rows // per_epoch, "corpus_fraction": rows / per_epoch, "rows_seen": rows,
                "rows_per_epoch": per_epoch}

    def get_state(self) -> dict[str, Any]:
        state = {"shuffle": self._shuffle, "batches": self._batches, "grain": self._it.get_state()}
        if self._shuffle == "global":
            state["rows_per_epoch"] = self.rows_per_epoch
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        if "grain" not in state:  # the bare grain state of the windows stream, as checkpoints held it before
            if self._shuffle != "windows":
                raise ValueError("this data state was saved by a data.shuffle='windows' stream; this one is "
                                 f"data.shuffle={self._shuffle!r}: resume with the same data config")
            self._it.set_state(state)
            self._batches = 0
            return
        if state["shuffle"] != self._shuffle:
            raise ValueError(f"this data state was saved by a data.shuffle={state['shuffle']!r} stream; this one is "
                             f"data.shuffle={self._shuffle!r}: resume with the same data config")
        if self._shuffle == "global" and int(state["rows_per_epoch"]) != self.rows_per_epoch:
            raise ValueError(f"this data state was saved over {state['rows_per_epoch']} rows per epoch; this stream "
                             f"has {self.rows_per_epoch} (a different corpus, split, tokenizer or seq_len): resume "
                             "with the same data config")
        self._it.set_state(state["grain"])
        self._batches = int(state["batches"])


def _shuffle(ds: grain.MapDataset, seed: int) -> grain.MapDataset:
    if len(ds) < INDEX_SHUFFLE_MIN_DOCS:
        return PermutationShuffleMapDataset(ds, seed=seed)
    return ds.seed(seed).shuffle()


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when the caller did not say
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not (isinstance(process_count, int) and process_count >= 1):
        raise ValueError(f"process_count={process_count!r} is invalid; accepted: an int >= 1")
    if not (isinstance(process_index, int) and 0 <= process_index < process_count):
        raise ValueError(f"process_index={process_index!r} is invalid; accepted: an int in [0, {process_count})")
    return process_index, process_count


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; accepted: an int >= 1")


def _split_name(config, split: str) -> str:
    """How an error names the split: by its config key (data.train_split / data.eval_split) and source."""
    key = ("data.train_split" if split == config.train_split else
           "data.eval_split" if split == config.eval_split else "split")
    source = f"data.paths={config.paths!r}" if config.name == _config.TEXT_NAME else f"data.name={config.name!r}"
    return f"{key}={split!r} of {source}"


def _empty_split_error(config, split: str, documents: int) -> ValueError:
    """A split with no text: training would read nothing but end-of-document tokens and report a meaningless loss."""
    return ValueError(f"{_split_name(config, split)} has no text: its {documents:,} document"
                      f"{'s are' if documents != 1 else ' is'} empty (data.text_key={config.text_key!r}); accepted "
                      "are splits with non-empty documents")


def _check_has_text(config, split: str, docs) -> None:
    """Refuse a split whose documents are all empty (reads documents up to the first non-empty one)."""
    if not any(len(docs[i]) for i in range(len(docs))):
        raise _empty_split_error(config, split, len(docs))


def make_tokenizer(config, *, data_dir: str | None = None) -> _tokenizers.Tokenizer:
    """The config's tokenizer; SentencePiece is trained on the train split on first use and cached in data_dir."""
    _config.validate_data_config(config)
    if config.tokenizer == "byte":
        return _tokenizers.ByteTokenizer()
    data_dir = data_dir or _sources.resolve_data_dir(config)
    docs = _sources.documents(config, config.train_split, data_dir=data_dir)
    _check_has_text(config, config.train_split, docs)  # before SentencePiece trains on nothing
    return _tokenizers.sentencepiece_tokenizer(
        docs, cache_dir=data_dir, dataset_id=f"{docs.dataset_id}-{config.train_split}-{config.text_key}",
        vocab_size=config.vocab_size or _config.DEFAULT_SP_VOCAB_SIZE, model_type=config.sp_model_type,
        train_bytes=config.sp_train_bytes)


def _tokenize_fn(tokenizer):
    def tokenize(doc: bytes) -> np.ndarray:
        return tokenizer.encode(doc)
    return tokenize


def packed_rows(config, split: str | None = None, *, seq_len: int | None = None,
                tokenizer: _tokenizers.Tokenizer | None = None, with_doc_ids: bool = False) -> _rows.PackedRows:
    """The split (default data.train_split) packed into rows with random access (rows.py), cached in data_dir."""
    _config.validate_data_config(config)
    split = split or config.train_split
    seq_len = config.seq_len if seq_len is None else seq_len
    _check_positive("seq_len", seq_len)
    data_dir = _sources.resolve_data_dir(config)
    tokenizer = tokenizer or make_tokenizer(config, data_dir=data_dir)
    docs = _sources.documents(config, split, data_dir=data_dir)
    corpus = _rows.packed_corpus(docs, tokenizer, cache_dir=data_dir,
                                 dataset_id=f"{docs.dataset_id}-{split}-{config.text_key}")
    return _rows.PackedRows(corpus, seq_len=seq_len, pad_id=tokenizer.pad_id, with_doc_ids=with_doc_ids)


def make_dataset(config, split: str | None = None, *, batch_size: int, seed: int = 0, seq_len: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 tokenizer: _tokenizers.Tokenizer | None = None):
    """(DataIterator over training batches, tokenizer). See the module docstring; data.shuffle picks the stream.

    split: defaults to data.train_split; seq_len: defaults to data.seq_len; process_index / process_count default to
    jax.process_index() / jax.process_count(); batch_size is per process.
    """
    _config.validate_data_config(config)
    split = split or config.train_split
    seq_len = config.seq_len if seq_len is None else seq_len
    _check_positive("seq_len", seq_len)
    _check_positive("batch_size", batch_size)
    pi, pc = _process(process_index, process_count)
    data_dir = _sources.resolve_data_dir(config)
    tokenizer = tokenizer or make_tokenizer(config, data_dir=data_dir)
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    if config.shuffle == "global":
        rows = packed_rows(config, split, seq_len=seq_len, tokenizer=tokenizer)
        if len(rows.corpus.tokens) - 1 <= rows.corpus.num_documents:  # only the EOS of each document
            raise _empty_split_error(config, split, rows.corpus.num_documents)
        if len(rows) < batch_size * pc:
            raise ValueError(f"split {split!r} of data.name={config.name!r} packs into {len(rows)} rows of "
                             f"seq_len={seq_len}, fewer than one global batch of {batch_size * pc} rows")
        ds = _shuffle(grain.MapDataset.source(rows), _global_seed(seed)).repeat()
        ds = ProcessBlocksMapDataset(ds, block=batch_size, index=pi, count=pc)
        ds = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=True)
        it = DataIterator(iter(ds), shuffle="global", global_batch_rows=batch_size * pc, rows_per_epoch=len(rows))
        return it, tokenizer
    docs = _sources.documents(config, split, data_dir=data_dir)
    _check_has_text(config, split, docs)
    if len(docs) < pc:
        raise ValueError(f"split {split!r} of data.name={config.name!r} has {len(docs)} documents, fewer than "
                         f"process_count={pc}")
    ds = (_shuffle(grain.MapDataset.source(docs)[pi::pc], seed).repeat()
          .map(_tokenize_fn(tokenizer))
          .to_iter_dataset(read))
    ds = _packing.PackIterDataset(ds, seq_len=seq_len, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    if config.shuffle_windows > 0:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=config.shuffle_windows,
                                                         seed=seed + 1_000_003)
    ds = ds.batch(batch_size, drop_remainder=True)
    it = DataIterator(iter(ds), shuffle="windows", global_batch_rows=batch_size * pc,
                      rows_per_epoch=lambda: max(len(packed_rows(config, split, seq_len=seq_len,
                                                                 tokenizer=tokenizer)), 1))
    return it, tokenizer


def eval_batches(config, split: str | None = None, *, batch_size: int, seq_len: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 max_batches: int | None = None,
                 tokenizer: _tokenizers.Tokenizer | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Finite, deterministic evaluation batches over `split` (default data.eval_split), same layout as training
    plus 'doc_ids' (packing.EVAL_FEATURES): per token, the index in the split of the document the target belongs
    to (-1 for padding), to sum the loss per document (stats.DocumentLosses, stats.validation_stats).

    The split's documents are read in order and packed into one stream of rows (packing.py; the last row padded
    with loss_mask 0), so over a full pass every token of the split, and each document's EOS, is a target exactly
    once. Rows are dealt in global batches of process_count * batch_size: process i takes rows
    [i*batch_size, (i+1)*batch_size) of each; the last global batch is padded with empty rows (loss_mask 0). Every
    process therefore yields the same number of batches, ceil(rows / (process_count * batch_size)), or
    `max_batches` if smaller. (Every process reads the whole split; validation splits are small.)
    """
    _config.validate_data_config(config)
    split = split or config.eval_split
    seq_len = config.seq_len if seq_len is None else seq_len
    _check_positive("seq_len", seq_len)
    _check_positive("batch_size", batch_size)
    if max_batches is not None:
        _check_positive("max_batches", max_batches)
    pi, pc = _process(process_index, process_count)
    data_dir = _sources.resolve_data_dir(config)
    tokenizer = tokenizer or make_tokenizer(config, data_dir=data_dir)
    docs = _sources.documents(config, split, data_dir=data_dir)
    ds = (grain.MapDataset.source(docs).map(_tokenize_fn(tokenizer))
          .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    rows = iter(_packing.PackIterDataset(ds, seq_len=seq_len, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                         pad_final=True, with_doc_ids=True))
    empty = _packing.window_features(np.zeros(0, np.int32), np.zeros(0, np.int64), seq_len, tokenizer.pad_id,
                                     with_doc_ids=True)
    return _deal(rows, empty, batch_size, pi, pc, max_batches)


def _deal(rows, empty, batch_size, pi, pc, max_batches):
    done = 0
    while max_batches is None or done < max_batches:
        group = []
        for row in rows:
            group.append(row)
            if len(group) == batch_size * pc:
                break
        if not group:
            return
        mine = group[pi * batch_size:(pi + 1) * batch_size]
        mine += [empty] * (batch_size - len(mine))
        yield {k: np.stack([r[k] for r in mine]) for k in _packing.EVAL_FEATURES}
        done += 1
        if len(group) < batch_size * pc:
            return
