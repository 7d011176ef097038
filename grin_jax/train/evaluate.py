"""Evaluation on the validation split: per-token NLL from the eval step, aggregated per document on the host
(grin_jax.data.DocumentLosses) into the loss, its standard error over documents and bits per byte; with several
data slices (processes) the per-slice accumulators are gathered and merged once per slice.

A finished or running run's checkpoint, on one device:

    python -m grin_jax.train.evaluate --workdir=workdirs/grin_tiny [--step=N] [--max_batches=0] [--out=FILE.json]

prints the validation loss with its standard error over documents (default: the newest intact checkpoint, the
whole validation split). A damaged or missing step is refused in one line (grin_jax.cli)."""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from grin_jax import data as _data
from grin_jax import sharding as _sharding
from grin_jax.train.step import batch_features, document_attention


def evaluate(eval_step, params, config, tokenizer, *, max_batches, mesh=None, data_index: int = 0,
             data_count: int = 1) -> dict:
    """The validation loss over `max_batches` global batches (None: the whole split) with its standard error over
    documents: {'loss' (nats per token), 'stderr', 'documents', 'tokens', 'bits_per_byte'} (validation_stats).
    eval_step: (params, batch) -> per-token NLL [B, S] (make_eval_step). With a mesh, this process loads slice
    data_index of data_count of every global batch; every process returns the same numbers."""
    documents, total_bytes = _score_documents(eval_step, params, config, tokenizer, max_batches=max_batches,
                                              mesh=mesh, data_index=data_index, data_count=data_count)
    if data_count > 1:  # each slice scored its own rows: merge one accumulator per slice (processes may share one)
        by_slice = {i: (acc, b) for i, acc, b in _allgather_json([data_index, documents.to_json(), total_bytes])}
        documents = _data.DocumentLosses.merged(acc for acc, _ in by_slice.values())
        total_bytes = sum(b for _, b in by_slice.values())
    stats = documents.stats()
    return {"loss": stats["loss"], "stderr": stats["stderr"], "documents": stats["documents"],
            "tokens": stats["tokens"], "bits_per_byte": _data.bits_per_byte(float(documents.nll.sum()),
                                                                            max(total_bytes, 1))}


def _score_documents(eval_step, params, config, tokenizer, *, max_batches, mesh, data_index, data_count):
    """(DocumentLosses, UTF-8 bytes of the targets) of this process's slice of the evaluation batches. Batch t + 1
    is dispatched before batch t's NLL is read, so the device does not wait for the host."""
    global_size = config.train.batch_size
    local = global_size // data_count
    with_documents = document_attention(config.data)
    rows = slice(data_index * local, (data_index + 1) * local) if mesh is not None else slice(None)
    documents, total_bytes, pending = _data.DocumentLosses(), 0, None
    for batch in _data.eval_batches(config.data, batch_size=local, tokenizer=tokenizer, max_batches=max_batches,
                                    process_index=data_index, process_count=data_count):
        host = _device_batch(batch, with_documents)
        nll = eval_step(params, host if mesh is None else _sharding.global_batch(host, mesh, global_size))
        if pending is not None:
            documents.add(pending[0]["doc_ids"], np.asarray(pending[1])[rows], pending[0]["loss_mask"])
        pending = (batch, nll)
        total_bytes += _data.batch_bytes(tokenizer, batch["targets"], batch["loss_mask"])
    if pending is not None:
        documents.add(pending[0]["doc_ids"], np.asarray(pending[1])[rows], pending[0]["loss_mask"])
    return documents, total_bytes


def _device_batch(batch, document_attention: bool = True) -> dict:
    """The model's inputs from a host batch (this process's rows, numpy; see sharding.global_batch): inputs,
    targets, loss_mask, and with document_attention positions and segment_ids (step.batch_features)."""
    return {k: np.asarray(batch[k]) for k in batch_features(document_attention)}


def _allgather_json(obj) -> list:
    """[obj of process 0, obj of process 1, ...] (JSON-able objects; every process must call it)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    buffer = np.zeros(int(sizes.max()), np.uint8)
    buffer[:raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(buffer))
    return [json.loads(gathered[i, :sizes[i]].tobytes().decode()) for i in range(len(sizes))]


def evaluate_checkpoint(workdir: str, *, step: int | None = None, max_batches: int | None = None) -> dict:
    """evaluate() of a run's checkpoint `step` (None: the newest intact one) on one device, plus 'step'."""
    from grin_jax.train.step import make_eval_step
    from grin_jax.train.trainer import load_trained

    config, graphdef, params, tokenizer, step = load_trained(workdir, step, with_step=True)
    result = evaluate(jax.jit(make_eval_step(graphdef)), params, config, tokenizer, max_batches=max_batches)
    return {**result, "step": step}


def main(argv=None) -> int:
    from grin_jax.cli import run_main
    return run_main(_main, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m grin_jax.train.evaluate",
                                     description="validation loss of a run's checkpoint")
    parser.add_argument("--workdir", required=True, help="a training run's workdir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest intact one)")
    parser.add_argument("--max_batches", type=int, default=0, help="validation batches (0: the whole split)")
    parser.add_argument("--out", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    if args.max_batches < 0:
        raise ValueError(f"--max_batches={args.max_batches} is invalid: accepted values are integers >= 0")
    result = evaluate_checkpoint(args.workdir, step=args.step, max_batches=args.max_batches or None)
    stderr = "" if result["stderr"] is None else f" ± {result['stderr']:.4f}"
    print(f"step {result['step']}: validation loss {result['loss']:.4f}{stderr} nats/token over "
          f"{result['documents']} documents ({result['tokens']:,} tokens; {result['bits_per_byte']:.4f} bits/byte)")
    if args.out:
        from grin_jax.train.metrics import write_json_atomic
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
