"""Document sources: random-access sequences of document bytes for a (config, split).

  'python_stdlib'  the embedded corpus (corpus.py), built into data_dir on first use.
  'text'           local .txt files (one document each) and .jsonl files (one document per line, field
                   `text_key`), matched by the comma-separated globs in `paths`, held in memory. The split is a
                   hash of each document's key (path relative to the files' common directory, plus ':<line>' for
                   jsonl) against `validation_fraction`: 'train' and 'validation'.
  anything else    a TFDS dataset already prepared in data_dir with file_format='array_record', read with
                   `tfds.data_source(name, split=..., data_dir=..., download=False)`; a missing one raises
                   FileNotFoundError saying how to prepare it.

Every source returns `bytes` (TFDS mock data and some sources give `str`: encoded as UTF-8).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any, Sequence

import tensorflow_datasets as tfds

from grin_jax.data import config as _config
from grin_jax.data import corpus as _corpus

ENV_DATA_DIR = "GRIN_JAX_DATA_DIR"


def resolve_data_dir(config) -> str:
    """data.data_dir, else $GRIN_JAX_DATA_DIR, else ~/.cache/grin_jax/tfds (created)."""
    d = config.data_dir or os.environ.get(ENV_DATA_DIR) or os.path.join("~", ".cache", "grin_jax", "tfds")
    d = os.path.abspath(os.path.expanduser(d))
    os.makedirs(d, exist_ok=True)
    return d


def _to_bytes(x: Any) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    if hasattr(x, "item"):  # a 0-d numpy array
        return _to_bytes(x.item())
    raise TypeError(f"expected document text as bytes or str, got {type(x).__name__}")


class Documents(Sequence[bytes]):
    """`source[i][key]` as bytes, for any random-access source of feature dicts."""

    def __init__(self, source, key: str, dataset_id: str):
        self._source = source
        self._key = key
        self.dataset_id = dataset_id

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> bytes:
        if not isinstance(i, int):
            i = int(i)
        record = self._source[i]
        try:
            return _to_bytes(record[self._key])
        except KeyError:
            raise KeyError(f"data.text_key={self._key!r} is not a feature of {self.dataset_id!r}; its features are "
                           f"{sorted(record)}") from None

    def __repr__(self):
        return f"Documents({self.dataset_id!r}, n={len(self)})"


def _text_file_documents(config, split: str) -> Documents:
    files = sorted({f for p in _config._split_patterns(config.paths) for f in glob.glob(os.path.expanduser(p),
                                                                                          recursive=True)})
    if not files:
        raise FileNotFoundError(f"data.paths={config.paths!r} matches no file")
    base = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    keyed: list[tuple[str, bytes]] = []
    for f in files:
        rel = os.path.relpath(os.path.abspath(f), base).replace(os.sep, "/")
        with open(f, "rb") as fh:
            data = fh.read()
        if f.endswith(".jsonl"):
            for lineno, line in enumerate(data.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    text = rec[config.text_key]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{f}:{lineno}: expected a JSON object with a string field "
                                     f"data.text_key={config.text_key!r} ({type(e).__name__}: {e})") from None
                keyed.append((f"{rel}:{lineno}", _to_bytes(text)))
        else:
            keyed.append((rel, data))
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r} is invalid for data.name='text'; accepted: ['train', 'validation']")
    want_val = split == "validation"
    docs = [d for k, d in keyed if _corpus.is_validation(k, config.validation_fraction, salt="text:") == want_val]
    if not docs:
        raise ValueError(f"the {split!r} split of data.paths={config.paths!r} is empty ({len(keyed)} documents, "
                         f"data.validation_fraction={config.validation_fraction!r}); add documents or change the "
                         "fraction")
    h = hashlib.sha256(repr([(k, len(d)) for k, d in keyed]).encode()).hexdigest()[:12]
    return Documents([{"text": d} for d in docs], "text", f"text_{h}_vf{config.validation_fraction}")


def _tfds_documents(config, split: str, data_dir: str) -> Documents:
    name = config.name
    try:
        src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types (DatasetNotFoundError, NotImplementedError, ValueError...)
        raise FileNotFoundError(
            f"data.name={name!r}: split {split!r} is not readable from data_dir={data_dir!r} as array_record "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Prepare it once where the source "
            f"can be downloaded: `tfds build {name} --data_dir={data_dir} --file_format=array_record`, or point "
            "data.data_dir at a directory where it is prepared (tfds's own default is ~/tensorflow_datasets)"
        ) from e
    return Documents(src, config.text_key, f"tfds_{name}")


def documents(config, split: str, *, data_dir: str | None = None) -> Documents:
    """The documents of `split` (bytes, random access) for a validated data config."""
    data_dir = data_dir or resolve_data_dir(config)
    if config.name == _config.EMBEDDED_NAME:
        builder = _corpus.python_stdlib_builder(data_dir, validation_fraction=config.validation_fraction)
        if split not in ("train", "validation"):
            raise ValueError(f"split={split!r} is invalid for data.name='python_stdlib'; accepted: "
                             "['train', 'validation']")
        key = config.text_key
        return Documents(builder.as_data_source(split), key, f"python_stdlib_{builder.builder_config.name}")
    if config.name == _config.TEXT_NAME:
        return _text_file_documents(config, split)
    return _tfds_documents(config, split, data_dir)
