"""grin_jax.data: the embedded corpus, sources, tokenizers, packing, grain pipelines, statistics. No TensorFlow."""
import json
import math
import os
import subprocess
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from grin_jax import data
from grin_jax.data import corpus, packing, pipeline, sources, stats, tokenizers
from grin_jax.data import rows as rows_mod

S = 16  # a short row keeps the tests fast


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The full stdlib corpus, built once for the session (about 0.3 s)."""
    d = str(tmp_path_factory.mktemp("tfds"))
    corpus.python_stdlib_builder(d)
    return d


def _cfg(data_dir, **kw):
    c = data.default_data_config()
    c.data_dir = data_dir
    c.seq_len = S
    c.shuffle_windows = 64
    for k, v in kw.items():
        c[k] = v
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in data.FEATURES)


# ---------------------------------------------------------------- the embedded corpus

def test_full_corpus_build_splits_and_contents(data_dir):
    b = corpus.python_stdlib_builder(data_dir)  # reused, not rebuilt
    assert b.is_prepared()
    files = corpus.list_corpus_files()
    assert len(files) > 300
    assert not any(f.startswith(("test/", "site-packages/")) or "/tests/" in f or "_sysconfigdata" in f
                   for f in files)
    train, val = b.as_data_source("train"), b.as_data_source("validation")
    assert len(train) + len(val) == len(files)
    assert 0.05 * len(files) < len(val) < 0.3 * len(files)
    val_paths = {val[i]["path"].decode() for i in range(len(val))}
    assert val_paths == {f for f in files if corpus.is_validation(f, corpus.DEFAULT_VALIDATION_FRACTION)}
    train_paths = {train[i]["path"].decode() for i in range(len(train))}
    assert not (train_paths & val_paths) and (train_paths | val_paths) == set(files)
    rec = val[0]
    assert isinstance(rec["text"], bytes)
    with open(os.path.join(corpus.stdlib_root(), rec["path"].decode()), "rb") as f:
        assert f.read() == rec["text"]
    md = b.info.metadata
    assert md["num_files"] == {"train": len(train), "validation": len(val)}


def test_split_is_a_pure_function_of_the_relative_path():
    # Pinned values: the split must not change across machines or versions of this code.
    assert corpus.hash_fraction("fractions.py") == pytest.approx(0.01464358, abs=1e-8)
    assert corpus.is_validation("fractions.py", 0.02)
    assert not corpus.is_validation("os.py", 0.02)
    fr = [corpus.hash_fraction(f"m{i}.py") for i in range(4000)]
    assert abs(np.mean(np.array(fr) < 0.02) - 0.02) < 0.01


def test_corpus_file_selection_and_fingerprint(tmp_path):
    root = tmp_path / "lib"
    for rel in ["a.py", "pkg/b.py", "pkg/c.py", "d.py", "e.py", "pkg/notes.txt", "test/t.py", "pkg/tests/t.py",
                "site-packages/x.py", "__pycache__/a.py", "_sysconfigdata__linux.py", "config-3.11-x86_64/m.py", "idlelib/idle_test/t.py"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x = 1\n")
    assert corpus.list_corpus_files(str(root)) == ["a.py", "d.py", "e.py", "pkg/b.py", "pkg/c.py"]
    b = corpus.python_stdlib_builder(str(tmp_path / "dd"), root=str(root), validation_fraction=0.5)
    assert b.info.splits["train"].num_examples + b.info.splits["validation"].num_examples == 5
    (root / "a.py").write_bytes(b"x = 2\n")  # a changed stdlib builds into its own directory
    b2 = corpus.python_stdlib_builder(str(tmp_path / "dd"), root=str(root), validation_fraction=0.5)
    assert b2.builder_config.name != b.builder_config.name and b2.is_prepared()


def test_mock_data_python_stdlib_and_named_dataset(tmp_path):
    # tfds.testing.mock_data gives str where real sources give bytes; both must work, without TensorFlow.
    with tfds.testing.mock_data(num_examples=12):
        for name in ("python_stdlib", "lm1b"):
            cfg = _cfg(str(tmp_path), name=name, eval_split="test" if name == "lm1b" else "validation")
            it, tok = data.make_dataset(cfg, batch_size=2, seed=0, process_index=0, process_count=1)
            b = next(it)
            assert b["inputs"].shape == (2, S) and b["inputs"].max() < tok.vocab_size
            ev = list(data.eval_batches(cfg, batch_size=2, process_index=0, process_count=1, tokenizer=tok))
            assert ev and all(e["targets"].shape == (2, S) for e in ev)


def test_validation_split_is_large_and_drawn_across_the_corpus(data_dir):
    # >= 1 MB of held-out text (enough documents for a standard error of the loss over documents), from many
    # packages, chosen by a hash of the relative path only.
    assert data.default_data_config().validation_fraction == corpus.DEFAULT_VALIDATION_FRACTION
    val = corpus.python_stdlib_builder(data_dir).as_data_source("validation")
    paths = [val[i]["path"].decode() for i in range(len(val))]
    assert sum(len(val[i]["text"]) for i in range(len(val))) > 1_000_000
    assert len(paths) >= 60 and len({p.split("/")[0] for p in paths}) >= 25
    files = corpus.list_corpus_files()
    ranks = np.array(sorted(files.index(p) for p in paths)) / len(files)  # spread over the sorted file list
    assert np.histogram(ranks, bins=5, range=(0, 1))[0].min() >= 5


# ---------------------------------------------------------------- other sources

class TinyCorpus(tfds.core.GeneratorBasedBuilder):
    """A registered TFDS dataset, prepared as array_record, to test reading a named dataset."""
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"body": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(40), "test": self._generate_examples(5)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"body": f"document {i} " * (i % 7 + 1)}


def test_named_tfds_dataset(tmp_path):
    TinyCorpus(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = _cfg(str(tmp_path), name="tiny_corpus", text_key="body", eval_split="test")
    it, tok = data.make_dataset(cfg, batch_size=3, seed=1, process_index=0, process_count=1)
    assert "document" in tok.decode(next(it)["inputs"])
    ev = list(data.eval_batches(cfg, batch_size=3, process_index=0, process_count=1))
    test = sources.documents(cfg, "test")  # tfds stores records in an order of its own (hash of the key)
    want = b"".join(test[i] + b"\x00" for i in range(len(test)))
    assert sorted(test[i] for i in range(5)) == sorted((f"document {i} " * (i % 7 + 1)).encode() for i in range(5))
    got = np.concatenate([e["targets"][e["loss_mask"] > 0] for e in ev])
    assert bytes(np.where(got == tok.eos_id, 0, got).astype(np.uint8)) == want
    with pytest.raises(KeyError, match="text_key='text'"):
        next(data.make_dataset(_cfg(str(tmp_path), name="tiny_corpus"), batch_size=1, process_index=0,
                               process_count=1)[0])


def test_missing_named_dataset_says_how_to_prepare_it(tmp_path):
    cfg = _cfg(str(tmp_path), name="lm1b")
    with pytest.raises(FileNotFoundError, match=r"lm1b.*tfds build lm1b"):
        data.make_dataset(cfg, batch_size=1, process_index=0, process_count=1)


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha file\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta file\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": f"line {i}", "id": i}) for i in range(60)))
    cfg = _cfg(str(tmp_path / "dd"), name="text",
               paths=f"{tmp_path}/**/*.txt,{tmp_path}/*.jsonl", validation_fraction=0.2)
    train, val = sources.documents(cfg, "train"), sources.documents(cfg, "validation")
    docs = {train[i] for i in range(len(train))} | {val[i] for i in range(len(val))}
    assert len(train) + len(val) == 62 and len(docs) == 62 and 0 < len(val) < 30
    assert b"alpha file\n" in docs and b"beta file\n" in docs and b"line 59" in docs
    it, _ = data.make_dataset(cfg, batch_size=2, process_index=0, process_count=1)
    next(it)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    bad = _cfg(str(tmp_path / "dd"), name="text", paths=f"{tmp_path}/bad.jsonl")
    with pytest.raises(ValueError, match=r"bad.jsonl:1.*text_key='text'"):
        sources.documents(bad, "train")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        sources.documents(_cfg(str(tmp_path), name="text", paths=f"{tmp_path}/none*.txt"), "train")


@pytest.mark.parametrize("shuffle,tokenizer", [("global", "byte"), ("windows", "byte"), ("global", "sentencepiece")])
def test_an_all_empty_corpus_is_refused_at_start_up(tmp_path, shuffle, tokenizer):
    """Empty .txt files and empty jsonl texts: the training stream would be nothing but end-of-document tokens (a
    run trained on them and reported a loss); refused by make_dataset, naming the split's key and the paths."""
    for i in range(20):
        (tmp_path / f"{i}.txt").write_text("")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": ""}) for _ in range(200)))
    cfg = _cfg(str(tmp_path / "dd"), name="text", paths=f"{tmp_path}/*.txt,{tmp_path}/*.jsonl",
               validation_fraction=0.1, shuffle=shuffle, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"data.train_split='train' of data.paths='.*' has no text: its \d+ "
                                         r"documents are empty"):
        data.make_dataset(cfg, batch_size=2, process_index=0, process_count=1)
    for i in range(20):  # documents with text (some in the train split): accepted
        (tmp_path / f"{i}.txt").write_text(f"document {i} has text " * 10)
    if tokenizer == "byte":
        it, _ = data.make_dataset(cfg, batch_size=2, process_index=0, process_count=1)
        assert next(it)["loss_mask"].sum() > 0


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip():
    tok = tokenizers.ByteTokenizer()
    raw = bytes(range(256)) + "héllo ✓😀\r\n".encode() + b"\xff\xfe"
    ids = tok.encode(raw)
    assert ids.dtype == np.int32 and ids.tolist() == list(raw)
    assert tok.decode_bytes(np.concatenate([[tok.eos_id], ids, [tok.pad_id, tok.bos_id]])) == raw
    assert tok.decode(tok.encode("héllo ✓😀")) == "héllo ✓😀"
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    assert tok.token_bytes[ids].sum() == len(raw) and tok.token_bytes[tok.eos_id] == 1


def test_sentencepiece_trains_caches_and_round_trips(data_dir, monkeypatch):
    cfg = _cfg(data_dir, tokenizer="sentencepiece", vocab_size=400, sp_train_bytes=60_000)
    tok = data.make_tokenizer(cfg)
    assert tok.vocab_size == 400 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert os.path.exists(tok.path) and tok.path.startswith(os.path.join(data_dir, "tokenizers"))
    val = sources.documents(cfg, "validation")
    for i in range(3):
        doc = val[i]
        ids = tok.encode(doc)
        assert tok.decode(ids) == doc.decode()
        assert tok.token_bytes[ids].sum() == len(doc)
        assert len(ids) < len(doc)  # it compresses
    weird = "tabs\t\tand  spaces \x00 ✓😀\r\n\n\n  end"
    assert tok.decode(tok.encode(weird)) == weird
    monkeypatch.setattr(tokenizers, "train_sentencepiece", lambda *a, **k: pytest.fail("retrained"))
    tok2 = data.make_tokenizer(cfg)  # loaded from the cache
    assert tok2.path == tok.path and tok2.model_proto == tok.model_proto
    it, _ = data.make_dataset(cfg, batch_size=2, seed=0, process_index=0, process_count=1, tokenizer=tok2)
    assert next(it)["inputs"].max() < 400


# ---------------------------------------------------------------- packing

def _reference_rows(docs, seq_len, eos, pad, pad_final):
    """Brute force: the stream EOS d1 EOS d2 EOS ..., windows of seq_len+1 with stride seq_len."""
    stream, doc_of = [eos], [-1]
    for j, d in enumerate(docs):
        stream += list(d) + [eos]
        doc_of += [j] * (len(d) + 1)
    rows, k = [], 0
    while True:
        w = stream[k * seq_len:k * seq_len + seq_len + 1]
        if len(w) < seq_len + 1 and (not pad_final or len(w) <= 1):
            break
        m = len(w) - 1
        tdocs = doc_of[k * seq_len + 1:k * seq_len + 1 + m]
        seg, pos = [], []
        for i in range(m):
            seg.append(tdocs[i] - tdocs[0] + 1)
            pos.append(0 if i == 0 or seg[i] != seg[i - 1] else pos[i - 1] + 1)
        padn = seq_len - m
        rows.append({"inputs": w[:-1] + [pad] * padn, "targets": w[1:] + [pad] * padn,
                     "segment_ids": seg + [0] * padn, "positions": pos + [0] * padn, "loss_mask": [1] * m + [0] * padn})
        if m < seq_len:
            break
        k += 1
    return rows


class _IdTokenizer:
    """Documents that are already token ids."""
    name, vocab_size = "ids", 100

    def __init__(self, eos_id):
        self.eos_id = eos_id

    def encode(self, doc):
        return np.asarray(doc, np.int32)


@pytest.mark.parametrize("seq_len", [1, 3, 7])
@pytest.mark.parametrize("pad_final", [False, True])
def test_packing_matches_brute_force(seq_len, pad_final):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(0, 50, size=rng.integers(0, 12)).astype(np.int32) for _ in range(15)]
    ds = packing.PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=seq_len, eos_id=99,
                                 pad_id=98, pad_final=pad_final, with_doc_ids=True)
    got = list(ds)
    want = _reference_rows(docs, seq_len, 99, 98, pad_final)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for k in data.FEATURES:
            np.testing.assert_array_equal(g[k], np.asarray(w[k]), err_msg=k)
    doc_of = np.concatenate([np.full(len(d) + 1, j) for j, d in enumerate(docs)])  # of every target
    ids = np.concatenate([g["doc_ids"][g["loss_mask"] > 0] for g in got])
    np.testing.assert_array_equal(ids, doc_of[:len(ids)])
    assert all((g["doc_ids"][g["loss_mask"] == 0] == -1).all() for g in got)
    # random access to the same rows (rows.py): identical to the sequential packer's full rows
    corpus_ = rows_mod.PackedCorpus(*rows_mod.tokenize_corpus(docs, _IdTokenizer(eos_id=99)))
    packed = rows_mod.PackedRows(corpus_, seq_len=seq_len, pad_id=98, with_doc_ids=True)
    full = [g for g in got if g["loss_mask"].min() > 0]
    assert len(packed) == len(full)
    for k, g in enumerate(full):
        for key in data.EVAL_FEATURES:
            np.testing.assert_array_equal(packed[k][key], g[key], err_msg=key)
    if pad_final:  # every token after the leading EOS is a target exactly once
        targets = np.concatenate([g["targets"][g["loss_mask"] > 0] for g in got])
        np.testing.assert_array_equal(targets, np.concatenate([np.append(d, 99) for d in docs]))


def test_packing_state_restores_mid_document():
    docs = [np.arange(i * 100, i * 100 + n, dtype=np.int32) for i, n in enumerate([40, 3, 0, 25, 9, 60])]
    ds = packing.PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=7, eos_id=-1, pad_id=-2,
                                 pad_final=True)
    full = list(ds)
    for cut in range(len(full)):
        it = iter(ds)
        _take(it, cut)
        state = json.loads(json.dumps(it.get_state()))
        fresh = iter(ds)
        fresh.set_state(state)
        assert _equal(list(fresh), full[cut:])


# ---------------------------------------------------------------- pipelines

def test_make_dataset_batches_and_determinism(data_dir):
    cfg = _cfg(data_dir)
    it, tok = data.make_dataset(cfg, batch_size=4, seed=3, process_index=0, process_count=1)
    a = _take(it, 5)
    b = a[0]
    assert set(b) == set(data.FEATURES)
    assert all(b[k].shape == (4, S) for k in b) and b["inputs"].dtype == np.int32
    assert b["loss_mask"].dtype == np.float32 and b["loss_mask"].min() == 1
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert b["segment_ids"].min() >= 1 and (np.diff(b["segment_ids"], axis=1) >= 0).all()
    again, _ = data.make_dataset(cfg, batch_size=4, seed=3, process_index=0, process_count=1)
    assert _equal(a, _take(again, 5))
    other, _ = data.make_dataset(cfg, batch_size=4, seed=4, process_index=0, process_count=1)
    assert not _equal(a, _take(other, 5))
    default_proc, _ = data.make_dataset(cfg, batch_size=4, seed=3)  # jax.process_index() / process_count()
    assert _equal(a, _take(default_proc, 5))


@pytest.mark.parametrize("stream", ["global", "windows"])
@pytest.mark.parametrize("shuffle", ["permutation", "grain_index_shuffle"])
def test_iterator_state_round_trip_resumes_exactly(tmp_path, monkeypatch, shuffle, stream):
    if shuffle == "grain_index_shuffle":
        monkeypatch.setattr(pipeline, "INDEX_SHUFFLE_MIN_DOCS", 0)
    # Small documents so that the stream crosses epochs (a new document order each) within the test.
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " + "x" * (i % 5)}) for i in range(300)))
    cfg = _cfg(str(tmp_path / "dd"), name="text", paths=f"{tmp_path}/d.jsonl", validation_fraction=0.1, seq_len=32,
               shuffle=stream)
    it, _ = data.make_dataset(cfg, batch_size=4, seed=7, process_index=0, process_count=1)
    if stream == "global":
        assert it.rows_per_epoch < 100  # the test crosses several epochs
    for steps in (0, 1, 13, 40):
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        pos = it.position()
        ahead = _take(it, 20)
        fresh, _ = data.make_dataset(cfg, batch_size=4, seed=7, process_index=0, process_count=1)
        fresh.set_state(state)
        assert fresh.position() == pos
        assert _equal(ahead, _take(fresh, 20)), steps
        assert fresh.position() == it.position()
        _take(it, steps)


def _epoch_documents(it, tok, n_docs):
    """Decode the first n_docs documents of an unshuffled-rows stream (they form the first epoch)."""
    rows = [next(it)["inputs"][0]]
    while (np.concatenate(rows) == tok.eos_id).sum() < n_docs + 1:
        rows.append(next(it)["inputs"][0])
    stream = np.concatenate(rows)
    return tok.decode_bytes(np.where(stream == tok.eos_id, 0, stream)).split(b"\x00")[1:n_docs + 1]


def test_windows_process_sharding_is_disjoint_and_covering(tmp_path):
    n = 50
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"<{i}>"}) for i in range(n)))
    cfg = _cfg(str(tmp_path / "dd"), name="text", paths=f"{tmp_path}/d.jsonl", validation_fraction=0.1,
               shuffle="windows", shuffle_windows=0)
    train = sources.documents(cfg, "train")
    everything = {train[i] for i in range(len(train))}
    seen = []
    for pi in range(3):
        it, tok = data.make_dataset(cfg, batch_size=1, seed=0, process_index=pi, process_count=3)
        shard_size = len(range(pi, len(train), 3))
        docs = _epoch_documents(it, tok, shard_size)
        assert len(set(docs)) == shard_size
        seen.append(set(docs))
    assert set.union(*seen) == everything and sum(map(len, seen)) == len(everything)
    with pytest.raises(ValueError, match="process_index=3"):
        data.make_dataset(cfg, batch_size=1, process_index=3, process_count=3)


def test_eval_batches_cover_split_once_on_every_process_count(data_dir):
    cfg = _cfg(data_dir, seq_len=128)
    tok = tokenizers.ByteTokenizer()
    val = sources.documents(cfg, "validation")
    want = np.concatenate([np.append(tok.encode(val[i]), tok.eos_id) for i in range(len(val))])
    single = list(data.eval_batches(cfg, batch_size=4, process_index=0, process_count=1))
    assert all(set(b) == set(data.EVAL_FEATURES) for b in single)
    rows1 = [r for b in single for r in zip(*(b[k] for k in data.FEATURES))]
    np.testing.assert_array_equal(np.concatenate([r[1][r[4] > 0] for r in rows1]), want)
    # doc_ids: the targets of document j are exactly document j's tokens and its EOS; padding is -1
    ids = np.concatenate([b["doc_ids"].reshape(-1) for b in single])
    tg = np.concatenate([b["targets"].reshape(-1) for b in single])
    mask = np.concatenate([b["loss_mask"].reshape(-1) for b in single])
    assert (ids[mask == 0] == -1).all() and (ids[mask > 0] >= 0).all()
    for j in range(len(val)):
        np.testing.assert_array_equal(tg[ids == j], np.append(tok.encode(val[j]), tok.eos_id))
    per_proc = [list(data.eval_batches(cfg, batch_size=4, process_index=p, process_count=3)) for p in range(3)]
    assert len({len(x) for x in per_proc}) == 1  # same number of batches everywhere
    dealt = []
    for g in range(len(per_proc[0])):
        for p in range(3):
            dealt += [r for r in zip(*(per_proc[p][g][k] for k in data.FEATURES)) if r[4].sum() > 0]
            assert (per_proc[p][g]["doc_ids"][per_proc[p][g]["loss_mask"] == 0] == -1).all()
    assert len(dealt) == len([r for r in rows1 if r[4].sum() > 0])
    for r, s in zip(dealt, rows1):
        for x, y in zip(r, s):
            np.testing.assert_array_equal(x, y)
    assert len(list(data.eval_batches(cfg, batch_size=4, process_index=0, process_count=1, max_batches=3))) == 3
    total = sum(stats.batch_bytes(tok, b["targets"], b["loss_mask"]) for b in single)
    assert total == sum(len(val[i]) + 1 for i in range(len(val)))


# ---------------------------------------------------------------- the globally shuffled stream

def _small_text_cfg(tmp_path, n=300, **kw):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"<doc {i}>" + "y" * (i % 11)})
                                                for i in range(n)))
    return _cfg(str(tmp_path / "dd"), name="text", paths=f"{tmp_path}/d.jsonl", validation_fraction=0.1, **kw)


def _row_index(rows):
    """Row contents -> index in the packed split (rows of these tests are unique)."""
    index = {}
    for k in range(len(rows)):
        r = rows[k]
        index[r["inputs"].tobytes() + r["targets"].tobytes()] = k
    assert len(index) == len(rows)
    return index


def _indices(batches, index):
    return [index[b["inputs"][i].tobytes() + b["targets"][i].tobytes()] for b in batches
            for i in range(len(b["inputs"]))]


def test_global_stream_epochs_are_permutations_of_all_rows(tmp_path):
    cfg = _small_text_cfg(tmp_path)
    rows = data.packed_rows(cfg)
    R = len(rows)
    assert 150 < R < 400
    index = _row_index(rows)
    it, _ = data.make_dataset(cfg, batch_size=4, seed=0, process_index=0, process_count=1)
    assert it.rows_per_epoch == R and it.position() == {"epoch": 0, "corpus_fraction": 0.0, "rows_seen": 0,
                                                        "rows_per_epoch": R}
    batches = _take(it, (3 * R) // 4 + 1)
    seen = _indices(batches, index)
    epochs = [seen[e * R:(e + 1) * R] for e in range(3)]
    for e in epochs:  # every row exactly once per epoch: no document twice
        assert sorted(e) == list(range(R))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(R))  # a fresh order each epoch
    pos = it.position()
    assert pos["rows_seen"] == 4 * len(batches) and pos["epoch"] == 4 * len(batches) // R == 3
    assert pos["corpus_fraction"] == pytest.approx(4 * len(batches) / R)
    # every token of the packed split is a target exactly once per epoch (but the last < seq_len ones)
    corpus_ = rows.corpus
    assert sum(rows[k]["loss_mask"].sum() for k in range(R)) == len(corpus_.tokens) - 1 - (len(corpus_.tokens) - 1) % S


def test_global_stream_is_deterministic_from_the_seed(tmp_path):
    cfg = _small_text_cfg(tmp_path)
    a = _take(data.make_dataset(cfg, batch_size=4, seed=3, process_index=0, process_count=1)[0], 10)
    assert _equal(a, _take(data.make_dataset(cfg, batch_size=4, seed=3, process_index=0, process_count=1)[0], 10))
    assert not _equal(a, _take(data.make_dataset(cfg, batch_size=4, seed=4, process_index=0, process_count=1)[0],
                               10))
    # run seeds s and s + 1 do not share epochs (grain seeds epoch e with seed + e; we hash the run seed)
    index = _row_index(data.packed_rows(cfg))
    R = len(index)
    s0 = _indices(_take(data.make_dataset(cfg, batch_size=1, seed=0, process_index=0, process_count=1)[0], 2 * R),
                  index)
    s1 = _indices(_take(data.make_dataset(cfg, batch_size=1, seed=1, process_index=0, process_count=1)[0], R), index)
    assert s1 != s0[R:]


@pytest.mark.parametrize("count", [2, 3])
def test_global_stream_processes_read_disjoint_rows_that_make_the_one_process_stream(tmp_path, count):
    cfg = _small_text_cfg(tmp_path)
    index = _row_index(data.packed_rows(cfg))
    R, B = len(index), 2
    steps = R // (B * count) + 5  # global batches: across the first epoch boundary
    one = _take(data.make_dataset(cfg, batch_size=B * count, seed=5, process_index=0, process_count=1)[0], steps)
    per = [data.make_dataset(cfg, batch_size=B, seed=5, process_index=i, process_count=count)[0]
           for i in range(count)]
    many = [_take(it, steps) for it in per]
    for t in range(steps):  # concatenating the processes' batches t gives the one-process batch t
        for k in data.FEATURES:
            np.testing.assert_array_equal(np.concatenate([m[t][k] for m in many]), one[t][k])
    first_epoch = [_indices(m, index) for m in many]
    n = R // (B * count) * B  # whole global batches within the first epoch
    parts = [set(f[:n]) for f in first_epoch]
    assert sum(map(len, parts)) == len(set.union(*parts)) == n * count  # disjoint
    assert all(it.position() == per[0].position() for it in per)
    assert per[0].position()["rows_seen"] == steps * B * count


def test_global_stream_batches_sample_the_whole_corpus(data_dir):
    """The first batches of a run come from all over the corpus; the windows stream's from a few files."""
    S_ = 64
    cfg = _cfg(data_dir, seq_len=S_, shuffle_windows=1024)
    rows = data.packed_rows(cfg)
    tok = tokenizers.ByteTokenizer()
    stream = np.asarray(rows.corpus.tokens)
    text = np.where(stream == tok.eos_id, 0, stream).astype(np.uint8).tobytes()

    def source_positions(it, n_batches):
        """Where in the packed split each row's text is (fraction of the split), found by the bytes of its
        longest document piece (the windows stream packs documents in another order)."""
        out = []
        for b in _take(it, n_batches):
            for x, seg in zip(b["targets"], b["segment_ids"]):
                piece = x[seg == np.bincount(seg).argmax()]
                at = text.find(np.where(piece == tok.eos_id, 0, piece).astype(np.uint8).tobytes())
                assert at >= 0
                out.append(at)
        return np.array(out)

    spread = {}
    for mode in ("global", "windows"):
        cfg.shuffle = mode
        it, _ = data.make_dataset(cfg, batch_size=8, seed=0, process_index=0, process_count=1)
        at = source_positions(it, 4)  # 32 rows
        p = at / len(text)
        spread[mode] = {"files": len(np.unique(rows.corpus.document_of(at))),
                        "slices": len(np.unique(np.floor(p * 100))), "std": round(float(np.std(p)), 3)}
    print(f"the first 32 rows come from: {spread} (distinct files, distinct 1% slices of the corpus, std of their "
          "positions in it)")
    g, w = spread["global"], spread["windows"]
    assert g["files"] >= 25 and g["slices"] >= 20 and 0.2 < g["std"] < 0.4  # uniform: std 1/sqrt(12) = 0.29
    assert w["files"] <= 10  # ~1,000 rows of 64 tokens in the shuffle buffer: a handful of files


def test_global_stream_state_checks(tmp_path):
    cfg = _small_text_cfg(tmp_path)
    it, _ = data.make_dataset(cfg, batch_size=4, seed=0, process_index=0, process_count=1)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    assert state["shuffle"] == "global" and state["grain"] == {"next_index": 12}
    win_cfg = _small_text_cfg(tmp_path, shuffle="windows")
    win, _ = data.make_dataset(win_cfg, batch_size=4, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="data.shuffle='global'"):
        win.set_state(state)
    with pytest.raises(ValueError, match="data.shuffle='windows'"):
        it.set_state(win.get_state())
    other_len = _small_text_cfg(tmp_path, seq_len=8)
    with pytest.raises(ValueError, match="rows per epoch"):
        data.make_dataset(other_len, batch_size=4, seed=0, process_index=0, process_count=1)[0].set_state(state)
    # a bare grain state of the windows stream (checkpoints written before DataIterator) still resumes
    legacy = json.loads(json.dumps(win.get_state()))
    ahead = _take(win, 5)
    fresh, _ = data.make_dataset(win_cfg, batch_size=4, seed=0, process_index=0, process_count=1)
    fresh.set_state(legacy["grain"])
    assert _equal(ahead, _take(fresh, 5))


def test_packed_corpus_is_cached(tmp_path, monkeypatch):
    cfg = _small_text_cfg(tmp_path)
    rows = data.packed_rows(cfg)
    assert rows.corpus.path and rows.corpus.path.startswith(str(tmp_path / "dd"))
    first = [rows[k] for k in range(len(rows))]
    monkeypatch.setattr(rows_mod, "tokenize_corpus", lambda *a: pytest.fail("re-tokenized"))
    again = data.packed_rows(cfg)
    assert again.corpus.path == rows.corpus.path and _equal(first, [again[k] for k in range(len(again))])
    # another split or other contents get their own stream
    monkeypatch.undo()
    val = data.packed_rows(cfg, "validation")
    assert val.corpus.path != rows.corpus.path
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"[doc {i}]"}) for i in range(300)))
    assert data.packed_rows(cfg).corpus.path != rows.corpus.path


# ---------------------------------------------------------------- the validation loss and its standard error

def test_validation_stats_known_cases():
    # equal lengths: the ratio estimator is the mean of the per-document means, its stderr the usual one
    means = np.array([1.0, 2.0, 4.0, 5.0])
    st = data.validation_stats(means * 10, np.full(4, 10))
    assert st["loss"] == pytest.approx(3.0) and st["documents"] == 4 and st["tokens"] == 40
    assert st["stderr"] == pytest.approx(np.std(means, ddof=1) / 2.0)
    # every document with the same per-token loss: no spread, whatever the lengths; empty documents ignored
    st = data.validation_stats([2.0, 20.0, 0.0, 7.0], [1, 10, 0, 3.5])
    assert st["loss"] == pytest.approx(2.0) and st["stderr"] == pytest.approx(0.0) and st["documents"] == 3
    assert math.isnan(data.validation_stats([3.0], [2])["stderr"])
    assert data.validation_stats([], [])["documents"] == 0


def test_validation_stats_matches_a_bootstrap_over_documents():
    rng = np.random.default_rng(0)
    m = 150
    n = rng.integers(20, 3000, size=m).astype(float)  # very unequal lengths
    per_token = rng.gamma(4.0, 0.5, size=m) + 0.3 * np.log(n) / 8  # loss correlated with length
    y = n * per_token
    st = data.validation_stats(y, n)
    assert st["loss"] == pytest.approx(y.sum() / n.sum())
    picks = rng.integers(0, m, size=(20000, m))
    boot = y[picks].sum(1) / n[picks].sum(1)
    print(f"delta-method stderr {st['stderr']:.5f}, bootstrap {boot.std():.5f}")
    assert st["stderr"] == pytest.approx(boot.std(), rel=0.06)
    # the naive per-token stderr would be far smaller than the truth
    assert np.std(np.repeat(per_token, n.astype(int)), ddof=1) / np.sqrt(n.sum()) < 0.3 * st["stderr"]


def test_document_losses_accumulate_over_batches_and_processes(data_dir):
    cfg = _cfg(data_dir, seq_len=128)
    val = sources.documents(cfg, "validation")
    rng = np.random.default_rng(1)
    acc, per_proc = data.DocumentLosses(), [data.DocumentLosses() for _ in range(2)]
    fake = {}  # a deterministic fake per-token loss: a function of the target

    def nll(b):
        return np.vectorize(lambda t: fake.setdefault(int(t), float(rng.gamma(2.0))))(b["targets"])

    for b in data.eval_batches(cfg, batch_size=8, process_index=0, process_count=1):
        acc.add(b["doc_ids"], nll(b), b["loss_mask"])
    for p in range(2):
        for b in data.eval_batches(cfg, batch_size=4, process_index=p, process_count=2):
            per_proc[p].add(b["doc_ids"], nll(b), b["loss_mask"])
    tok = tokenizers.ByteTokenizer()
    want_tokens = np.array([len(val[j]) + 1 for j in range(len(val))])
    np.testing.assert_array_equal(acc.tokens, want_tokens)
    want_nll = np.array([sum(fake[int(t)] for t in np.append(tok.encode(val[j]), tok.eos_id))
                         for j in range(len(val))])
    np.testing.assert_allclose(acc.nll, want_nll, rtol=1e-9)
    merged = data.DocumentLosses.merged([json.loads(json.dumps(a.to_json())) for a in per_proc])
    np.testing.assert_allclose(merged.nll, acc.nll, rtol=1e-9)
    np.testing.assert_array_equal(merged.tokens, acc.tokens)
    st = merged.stats()
    assert st["documents"] == len(val) and st["tokens"] == want_tokens.sum()
    assert st["loss"] == pytest.approx(want_nll.sum() / want_tokens.sum()) and st["stderr"] > 0


# ---------------------------------------------------------------- statistics

def test_entropy_and_bits_per_byte(data_dir, tmp_path):
    assert stats.entropy_bits([5, 5, 5, 5]) == pytest.approx(2.0)
    assert stats.entropy_bits([3, 0, 0]) == 0.0
    assert stats.bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)
    assert stats.nats_per_token_to_bits_per_byte(math.log(2), 100, 50) == pytest.approx(2.0)
    (tmp_path / "a.txt").write_bytes(b"aab")
    (tmp_path / "b.txt").write_bytes(b"ab\n")
    cfg = _cfg(str(tmp_path / "dd"), name="text", paths=f"{tmp_path}/*.txt", validation_fraction=0.01)
    train = sources.documents(cfg, "train")
    st = data.split_statistics(cfg, "train")
    counts = {}
    for i in range(len(train)):
        for c in list(train[i]) + ["eos"]:
            counts[c] = counts.get(c, 0) + 1
    assert st["tokens"] == st["bytes"] == sum(counts.values())
    assert st["unigram_bits_per_byte"] == pytest.approx(stats.entropy_bits(list(counts.values())))
    real = data.split_statistics(_cfg(data_dir))
    assert 4.0 < real["unigram_bits_per_byte"] < 5.5 and real["documents"] > 3


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("key,value,accepted", [
    ("tokenizer", "bpe", "byte"),
    ("vocab_size", 1000, "259"),
    ("seq_len", 0, ">= 1"),
    ("validation_fraction", 1.0, "between 0 and 1"),
    ("shuffle_windows", -1, ">= 0"),
    ("shuffle", "local", "global"),
    ("sp_model_type", "char", "unigram"),
    ("name", "", "non-empty"),
    ("paths", "", "glob"),
])
def test_bad_config_names_key_value_and_accepted(key, value, accepted):
    cfg = data.default_data_config()
    if key == "paths":
        cfg.name = "text"
    cfg[key] = value
    with pytest.raises(ValueError) as e:
        data.validate_data_config(cfg)
    msg = str(e.value)
    assert f"data.{key}={value!r}" in msg and accepted in msg


def test_bad_config_sentencepiece_vocab_and_missing_key():
    cfg = data.default_data_config()
    cfg.tokenizer = "sentencepiece"
    cfg.vocab_size = 100
    with pytest.raises(ValueError, match=r"data.vocab_size=100.*>= 300"):
        data.validate_data_config(cfg)
    cfg = data.default_data_config()
    del cfg["seq_len"]
    with pytest.raises(ValueError, match="data.seq_len is missing"):
        data.validate_data_config(cfg)
    data.validate_data_config(data.default_data_config())


def test_no_tensorflow_imported(tmp_path):
    # In a fresh interpreter: other test modules of this session may import what they like.
    code = f"""
import sys
from grin_jax import data
cfg = data.default_data_config()
cfg.data_dir = {str(tmp_path)!r}
cfg.seq_len = 32
it, tok = data.make_dataset(cfg, batch_size=2, process_index=0, process_count=1)
next(it)
next(iter(data.eval_batches(cfg, batch_size=2, process_index=0, process_count=1, max_batches=1)))
import tensorflow_datasets as tfds
with tfds.testing.mock_data(num_examples=4):
    next(data.make_dataset(cfg, batch_size=2, process_index=0, process_count=1)[0])
assert "tensorflow" not in sys.modules, sorted(m for m in sys.modules if m.startswith("tensorflow"))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
