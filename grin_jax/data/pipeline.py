"""The entry points the trainer calls: `make_dataset` (infinite, shuffled, checkpointable) and `eval_batches`
(finite, deterministic, identical batch count on every process).

Training pipeline (grain, no worker processes, no TensorFlow):

    MapDataset.source(documents)[process_index::process_count]   # each process: a disjoint set of documents
      .seed(seed).shuffle().repeat()                              # a new document order every epoch (*)
      .map(tokenize).to_iter_dataset()
    -> PackIterDataset(seq_len)                                   # rows, layout in packing.py
    -> WindowShuffleIterDataset(shuffle_windows)                  # mixes rows of long documents
    -> .batch(batch_size, drop_remainder=True)

Each batch is a dict of [batch_size, seq_len] arrays: inputs, targets, segment_ids, positions (int32) and loss_mask
(float32). The iterator has get_state() / set_state(state) (a JSON-able dict): save it with the model checkpoint
and training resumes on exactly the next batch. `batch_size` is per process.

(*) grain's `shuffle` (index_shuffle) cycle-walks a domain of at least ~2**16 indices: about 60 ms per epoch
whatever the number of documents, i.e. 2 ms per document for 32 documents, which makes small corpora and mock
data crawl. Shards with fewer than 2**16 documents therefore use `PermutationShuffleMapDataset` (same contract:
a fresh order each epoch from (seed, epoch), no state beyond the element index); larger ones use grain's.
"""
from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from grin_jax.data import config as _config
from grin_jax.data import packing as _packing
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


def make_tokenizer(config, *, data_dir: str | None = None) -> _tokenizers.Tokenizer:
    """The config's tokenizer; SentencePiece is trained on the train split on first use and cached in data_dir."""
    _config.validate_data_config(config)
    if config.tokenizer == "byte":
        return _tokenizers.ByteTokenizer()
    data_dir = data_dir or _sources.resolve_data_dir(config)
    docs = _sources.documents(config, config.train_split, data_dir=data_dir)
    return _tokenizers.sentencepiece_tokenizer(
        docs, cache_dir=data_dir, dataset_id=f"{docs.dataset_id}-{config.train_split}-{config.text_key}",
        vocab_size=config.vocab_size or _config.DEFAULT_SP_VOCAB_SIZE, model_type=config.sp_model_type,
        train_bytes=config.sp_train_bytes)


def _tokenize_fn(tokenizer):
    def tokenize(doc: bytes) -> np.ndarray:
        return tokenizer.encode(doc)
    return tokenize


def make_dataset(config, split: str | None = None, *, batch_size: int, seed: int = 0, seq_len: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 tokenizer: _tokenizers.Tokenizer | None = None):
    """(iterator over training batches, tokenizer). See the module docstring.

    split: defaults to data.train_split; seq_len: defaults to data.seq_len; process_index / process_count default to
    jax.process_index() / jax.process_count().
    """
    _config.validate_data_config(config)
    split = split or config.train_split
    seq_len = config.seq_len if seq_len is None else seq_len
    _check_positive("seq_len", seq_len)
    _check_positive("batch_size", batch_size)
    pi, pc = _process(process_index, process_count)
    data_dir = _sources.resolve_data_dir(config)
    tokenizer = tokenizer or make_tokenizer(config, data_dir=data_dir)
    docs = _sources.documents(config, split, data_dir=data_dir)
    if len(docs) < pc:
        raise ValueError(f"split {split!r} of data.name={config.name!r} has {len(docs)} documents, fewer than "
                         f"process_count={pc}")
    ds = (_shuffle(grain.MapDataset.source(docs)[pi::pc], seed).repeat()
          .map(_tokenize_fn(tokenizer))
          .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    ds = _packing.PackIterDataset(ds, seq_len=seq_len, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    if config.shuffle_windows > 0:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=config.shuffle_windows,
                                                         seed=seed + 1_000_003)
    ds = ds.batch(batch_size, drop_remainder=True)
    return iter(ds), tokenizer


def eval_batches(config, split: str | None = None, *, batch_size: int, seq_len: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 max_batches: int | None = None,
                 tokenizer: _tokenizers.Tokenizer | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Finite, deterministic evaluation batches over `split` (default data.eval_split), same layout as training.

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
                                         pad_final=True))
    empty = _packing.window_features(np.zeros(0, np.int32), np.zeros(0, np.int64), seq_len, tokenizer.pad_id)
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
        yield {k: np.stack([r[k] for r in mine]) for k in _packing.FEATURES}
        done += 1
        if len(group) < batch_size * pc:
            return
