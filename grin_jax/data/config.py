"""Data configuration: defaults and validation.

`default_data_config()` is the `config.data` block of an experiment's `get_config()`. Every field is validated
by `validate_data_config` before anything is read or compiled; a wrong value raises `ValueError` naming the key,
the value and what would be accepted.

Fields:
    name                 'python_stdlib' (the embedded corpus: this interpreter's standard library source),
                         'text' (local .txt / .jsonl files named by `paths`), or any other string: a TFDS dataset
                         name ('lm1b', 'c4/en:3.0.1') already prepared in `data_dir` with file_format=array_record.
    data_dir             where TFDS datasets and tokenizer models live; '' means $GRIN_JAX_DATA_DIR or
                         ~/.cache/grin_jax/tfds.
    paths                for name='text': comma-separated glob patterns of .txt files (one document per file) and
                         .jsonl files (one document per line, the string field `text_key`).
    text_key             the feature / JSON field holding the document text.
    train_split          split read by `make_dataset` ('train').
    eval_split           split read by `eval_batches` ('validation'; lm1b has only 'test').
    validation_fraction  for 'python_stdlib' and 'text': the fraction of documents (chosen by a hash of their
                         relative path, the same on every machine) that form the 'validation' split. Default 0.15:
                         on CPython 3.11's stdlib 111 files, 1.43 MB (0.02, the value before the global shuffle:
                         12 files, 199 KB, too few to resolve 0.01 nats).
    tokenizer            'byte' (ids 0..255 are the bytes, 256 PAD, 257 BOS, 258 EOS; vocabulary 259) or
                         'sentencepiece' (trained locally on a sample of the train split and cached in data_dir).
    vocab_size           0 = the tokenizer's default (byte: 259, sentencepiece: 8192); byte accepts only 0 or 259.
    sp_model_type        'unigram' or 'bpe'.
    sp_train_bytes       how many bytes of training documents the SentencePiece trainer sees.
    seq_len              tokens per training row (inputs and targets are both [B, seq_len]).
    shuffle              how the training stream is ordered (pipeline.py):
                         'global' (default): the split is packed once into rows (cached in data_dir) and every
                           epoch reads all rows in a fresh uniformly random order: each batch is a uniform sample
                           of the corpus, no document is seen twice within an epoch;
                         'windows': the earlier stream, also the streaming mode for corpora too large to
                           tokenize ahead: documents in a random order per epoch, packed on the fly, rows mixed in
                           a shuffle buffer of `shuffle_windows` rows (strongly local for long documents unless
                           the buffer holds many documents).
    shuffle_windows      shuffle='windows' only: size of the row shuffle buffer after packing (0: documents are
                         still shuffled, but consecutive rows of one long document stay adjacent).
    document_attention   feed packed rows as documents (segment mask and per-document RoPE positions) in training
                         and evaluation, so packing is invisible to the model; False: positions 0..S-1, no mask.
"""
from __future__ import annotations

import ml_collections

DEFAULT_SP_VOCAB_SIZE = 8192
BYTE_VOCAB_SIZE = 259
TOKENIZERS = ("byte", "sentencepiece")
SP_MODEL_TYPES = ("unigram", "bpe")
EMBEDDED_NAME = "python_stdlib"
TEXT_NAME = "text"
MIN_SP_VOCAB_SIZE = 300  # 256 byte pieces + 4 specials + a few learned pieces
SHUFFLES = ("global", "windows")
DEFAULT_VALIDATION_FRACTION = 0.15


def default_data_config() -> ml_collections.ConfigDict:
    """The data defaults: the embedded Python-stdlib corpus, byte tokenizer, 256-token rows."""
    c = ml_collections.ConfigDict()
    c.name = EMBEDDED_NAME
    c.data_dir = ""
    c.paths = ""
    c.text_key = "text"
    c.train_split = "train"
    c.eval_split = "validation"
    c.validation_fraction = DEFAULT_VALIDATION_FRACTION
    c.tokenizer = "byte"
    c.vocab_size = 0
    c.sp_model_type = "unigram"
    c.sp_train_bytes = 2_000_000
    c.seq_len = 256
    c.shuffle = "global"
    c.shuffle_windows = 1024
    c.document_attention = True
    return c


def _get(config, key):
    try:
        return config[key]
    except (KeyError, AttributeError):
        raise ValueError(f"data.{key} is missing from the data config; start from default_data_config()") from None


def _bad(key, value, accepted) -> ValueError:
    return ValueError(f"data.{key}={value!r} is invalid; accepted: {accepted}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_data_config(config) -> None:
    """Raise ValueError naming the key, the value and the accepted values for the first bad field."""
    for key in ("name", "text_key", "train_split", "eval_split"):
        v = _get(config, key)
        if not isinstance(v, str) or not v.strip():
            raise _bad(key, v, "a non-empty string")
    for key in ("data_dir", "paths"):
        v = _get(config, key)
        if not isinstance(v, str):
            raise _bad(key, v, "a string ('' for the default)")
    name = config.name
    if name == TEXT_NAME and not config.paths.strip():
        raise _bad("paths", config.paths, "comma-separated glob patterns of .txt/.jsonl files when data.name='text'")
    if name == TEXT_NAME:
        for pattern in _split_patterns(config.paths):
            if not (pattern.endswith(".txt") or pattern.endswith(".jsonl")):
                raise _bad("paths", config.paths, "glob patterns ending in .txt or .jsonl")
    f = _get(config, "validation_fraction")
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
        raise _bad("validation_fraction", f, "a number strictly between 0 and 1")
    if "document_attention" in config and not isinstance(config["document_attention"], bool):
        raise _bad("document_attention", config["document_attention"], "True or False")
    tok = _get(config, "tokenizer")
    if tok not in TOKENIZERS:
        raise _bad("tokenizer", tok, list(TOKENIZERS))
    v = _get(config, "vocab_size")
    if not _is_int(v) or v < 0:
        raise _bad("vocab_size", v, "an int >= 0 (0 = the tokenizer's default)")
    if tok == "byte" and v not in (0, BYTE_VOCAB_SIZE):
        raise _bad("vocab_size", v, f"0 or {BYTE_VOCAB_SIZE} with tokenizer='byte'")
    if tok == "sentencepiece" and v != 0 and v < MIN_SP_VOCAB_SIZE:
        raise _bad("vocab_size", v, f"0 (= {DEFAULT_SP_VOCAB_SIZE}) or an int >= {MIN_SP_VOCAB_SIZE} with "
                              "tokenizer='sentencepiece'")
    mt = _get(config, "sp_model_type")
    if mt not in SP_MODEL_TYPES:
        raise _bad("sp_model_type", mt, list(SP_MODEL_TYPES))
    n = _get(config, "sp_train_bytes")
    if not _is_int(n) or n < 10_000:
        raise _bad("sp_train_bytes", n, "an int >= 10000")
    s = _get(config, "seq_len")
    if not _is_int(s) or s < 1:
        raise _bad("seq_len", s, "an int >= 1")
    sh = _get(config, "shuffle")
    if sh not in SHUFFLES:
        raise _bad("shuffle", sh, list(SHUFFLES))
    w = _get(config, "shuffle_windows")
    if not _is_int(w) or w < 0:
        raise _bad("shuffle_windows", w, "an int >= 0 (0 disables the window shuffle)")


def _split_patterns(paths: str) -> list[str]:
    return [p.strip() for p in paths.split(",") if p.strip()]
