"""Tokenizers: byte-level (default) and a SentencePiece model trained locally on the corpus.

Both expose the same small interface:
  vocab_size               number of ids the model's embedding must cover
  pad_id, bos_id, eos_id   special ids (the packer uses only eos_id, as the document separator; pad_id fills the
                           tail of the last evaluation batch; bos_id is reserved for prompts)
  encode(text) -> int32[n] text is str or bytes (bytes as read from a dataset)
  decode(ids) -> str       special ids are dropped
  token_bytes: int64[vocab_size]  UTF-8 bytes each id stands for (EOS counts 1, PAD/BOS/UNK 0). Summed over a
                           document's ids plus its EOS it gives len(document bytes) + 1, which makes
                           bits-per-byte comparable across tokenizers (stats.py).

Byte tokenizer ids: 0..255 are the byte values themselves, 256 = PAD, 257 = BOS, 258 = EOS; vocab_size 259.

SentencePiece ids: 0 = PAD, 1 = BOS, 2 = EOS, 3 = UNK, 4 = '\\n' (a user-defined piece), 5..260 the byte-fallback
pieces <0x00>..<0xFF>, then the learned pieces. Trained with identity normalisation, no dummy prefix, no
whitespace collapsing and byte fallback, so decode(encode(text)) == text for every str (tested); bytes that are
not valid UTF-8 are replaced (U+FFFD) before encoding.
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Iterator, Protocol

import numpy as np
import sentencepiece as spm

from grin_jax.data import corpus as _corpus


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    token_bytes: np.ndarray

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


def _as_bytes(text: str | bytes) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _as_str(text: str | bytes) -> str:
    return text if isinstance(text, str) else bytes(text).decode("utf-8", errors="replace")


class ByteTokenizer:
    """Bytes are their own ids (0..255); 256 PAD, 257 BOS, 258 EOS."""

    name = "byte"
    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def __init__(self):
        self.token_bytes = np.zeros(self.vocab_size, np.int64)
        self.token_bytes[:256] = 1
        self.token_bytes[self.eos_id] = 1

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.frombuffer(_as_bytes(text), np.uint8).astype(np.int32)

    def decode_bytes(self, ids) -> bytes:
        ids = np.asarray(ids).reshape(-1)
        return ids[ids < 256].astype(np.uint8).tobytes()

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self):
        return "ByteTokenizer(vocab_size=259)"


class SentencePieceTokenizer:
    """A SentencePiece model (see module docstring for ids and round-trip guarantees)."""

    name = "sentencepiece"

    def __init__(self, model_proto: bytes, path: str | None = None):
        self.path = path
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = int(self._sp.get_piece_size())
        self.pad_id = int(self._sp.pad_id())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        self.unk_id = int(self._sp.unk_id())
        tb = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if self._sp.is_byte(i):
                tb[i] = 1
            elif self._sp.is_control(i) or self._sp.is_unknown(i):
                tb[i] = 0
            else:
                tb[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        tb[self.eos_id] = 1
        self.token_bytes = tb

    @classmethod
    def load(cls, path: str) -> "SentencePieceTokenizer":
        with open(path, "rb") as f:
            return cls(f.read(), path)

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self._sp.encode(_as_str(text)), np.int32)

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)
               if int(i) not in (self.pad_id, self.bos_id, self.eos_id)]
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __repr__(self):
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def _sentences(docs: Iterable[str], max_chars: int = 2048) -> Iterator[str]:
    """Cut documents into trainer 'sentences' of at most ~max_chars characters on line boundaries."""
    for doc in docs:
        buf: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            while len(line) > max_chars:  # a very long line: cut it
                if buf:
                    yield "".join(buf)
                    buf, size = [], 0
                yield line[:max_chars]
                line = line[max_chars:]
            if size + len(line) > max_chars and buf:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
        if buf:
            yield "".join(buf)


def train_sentencepiece(docs: Iterable[str | bytes], *, vocab_size: int, model_type: str = "unigram") -> bytes:
    """Train a SentencePiece model on `docs` (single-threaded: deterministic); returns the serialized model."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(_as_str(d) for d in docs),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        max_sentence_length=1 << 14,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def sample_documents(source, max_bytes: int, seed: int = 0) -> list[bytes]:
    """Up to `max_bytes` of documents from a random-access `source` of bytes, in a seeded random order."""
    order = np.random.default_rng(seed).permutation(len(source))
    out, total = [], 0
    for i in order:
        doc = source[int(i)]
        out.append(doc[: max_bytes - total])
        total += len(out[-1])
        if total >= max_bytes:
            break
    return out


def sentencepiece_tokenizer(source, *, cache_dir: str, dataset_id: str, vocab_size: int,
                            model_type: str = "unigram", train_bytes: int = 4_000_000) -> SentencePieceTokenizer:
    """Load the cached model for (dataset, vocab, type, sample size) or train it on a sample of `source`.

    The model file lives at `{cache_dir}/tokenizers/{dataset_id}-{model_type}{vocab_size}-{hash}.model`; the hash
    covers the training settings. Training takes a file lock so concurrent processes train it once.
    """
    key = f"{dataset_id}|{model_type}|{vocab_size}|{train_bytes}|v1"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    safe_id = "".join(c if c.isalnum() or c in "._-" else "_" for c in dataset_id)
    path = os.path.join(cache_dir, "tokenizers", f"{safe_id}-{model_type}{vocab_size}-{digest}.model")
    if not os.path.exists(path):
        with _corpus.file_lock(path + ".lock"):
            if not os.path.exists(path):
                proto = train_sentencepiece(sample_documents(source, train_bytes), vocab_size=vocab_size,
                                            model_type=model_type)
                tmp = f"{path}.tmp{os.getpid()}"
                with open(tmp, "wb") as f:
                    f.write(proto)
                os.replace(tmp, path)
    return SentencePieceTokenizer.load(path)
