"""Data: the embedded Python-stdlib corpus (TFDS, array_record), named TFDS datasets and local text files;
byte and SentencePiece tokenizers; packing into fixed-length rows; checkpointable grain pipelines. No TensorFlow.

    from grin_jax.data import default_data_config, make_dataset, eval_batches
    it, tok = make_dataset(cfg.data, batch_size=8, seed=0)      # infinite; it.get_state() / it.set_state(s)
    batch = next(it)   # inputs, targets, segment_ids, positions: int32 [8, seq_len]; loss_mask: float32
    it.position()      # {'epoch', 'corpus_fraction', 'rows_seen', 'rows_per_epoch'}
    acc = DocumentLosses()
    for b in eval_batches(cfg.data, batch_size=8, tokenizer=tok):      # finite, deterministic; + doc_ids
        acc.add(b["doc_ids"], nll_of(b), b["loss_mask"])
    acc.stats()        # validation_stats: {'loss', 'stderr' (over documents), 'documents', 'tokens'}
"""
from grin_jax.data.config import default_data_config, validate_data_config
from grin_jax.data.corpus import PythonStdlib, list_corpus_files, python_stdlib_builder, stdlib_root
from grin_jax.data.packing import EVAL_FEATURES, FEATURES, PackIterDataset
from grin_jax.data.pipeline import DataIterator, eval_batches, make_dataset, make_tokenizer, packed_rows
from grin_jax.data.rows import PackedCorpus, PackedRows, packed_corpus
from grin_jax.data.sources import documents, resolve_data_dir
from grin_jax.data.stats import (DocumentLosses, batch_bytes, bits_per_byte, entropy_bits,
                                 nats_per_token_to_bits_per_byte, split_statistics, validation_stats)
from grin_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece

__all__ = [
    "EVAL_FEATURES", "FEATURES", "ByteTokenizer", "DataIterator", "DocumentLosses", "PackIterDataset",
    "PackedCorpus", "PackedRows", "PythonStdlib", "SentencePieceTokenizer", "batch_bytes", "bits_per_byte",
    "default_data_config", "documents", "entropy_bits", "eval_batches", "list_corpus_files", "make_dataset",
    "make_tokenizer", "nats_per_token_to_bits_per_byte", "packed_corpus", "packed_rows", "python_stdlib_builder",
    "resolve_data_dir", "split_statistics", "stdlib_root", "train_sentencepiece", "validate_data_config",
    "validation_stats",
]
