"""Evaluation on the validation split: per-token NLL from the eval step, aggregated per document on the host
(grin_jax.data.DocumentLosses) into the loss, its standard error over documents and bits per byte; with several
data slices (processes) the per-slice accumulators are gathered and merged once per slice. The eval step's sums
(the FFN kinds' per-batch totals over the real tokens, e.g. PEER's router score mass per expert; none for most
models) are added up over the batches on the host in float64 and turned into the kinds' metrics
('<section>/<metric>', section_metrics); they are over the global batch already, the same on every process.

A finished or running run's checkpoint, on one device:

    python -m grin_jax.train.evaluate --workdir=workdirs/grin_tiny [--step=N] [--max_batches=0] [--out=FILE.json]

prints the validation loss with its standard error over documents (default: the newest intact checkpoint, the
whole validation split), and the FFN kinds' metrics accumulated over the same batches (a PEER model: peer/usage and
peer/unevenness, the paper's, from the router score mass per expert summed over the evaluation set; docs/peer.md).
A damaged or missing step is refused in one line (grin_jax.cli)."""

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
             data_count: int = 1, keep_sums: bool = False) -> dict:
    """The validation loss over `max_batches` global batches (None: the whole split) with its standard error over
    documents: {'loss' (nats per token), 'stderr', 'documents', 'tokens', 'bits_per_byte'} (validation_stats),
    plus the FFN kinds' evaluation metrics accumulated over those batches, '<section>/<metric>' (section_metrics;
    e.g. PEER's 'peer/usage', 'peer/unevenness', and per layer; none for a model whose kinds have no sums).
    eval_step: (params, batch) -> (per-token NLL [B, S], sums) (make_eval_step). With a mesh, this process loads slice data_index of data_count of every global batch;
    the sums are over the global batch already (the eval step's SPMD reduction), so every process returns the same
    numbers. keep_sums: also return the sums themselves, {'<section>/<name>': float64 numpy [L, ...]}, under 'sums'
    (e.g. the router score mass per expert, for a histogram)."""
    documents, total_bytes, sums = _score_documents(eval_step, params, config, tokenizer, max_batches=max_batches,
                                                    mesh=mesh, data_index=data_index, data_count=data_count)
    if data_count > 1:  # each slice scored its own rows: merge one accumulator per slice (processes may share one)
        by_slice = {i: (acc, b) for i, acc, b in _allgather_json([data_index, documents.to_json(), total_bytes])}
        documents = _data.DocumentLosses.merged(acc for acc, _ in by_slice.values())
        total_bytes = sum(b for _, b in by_slice.values())
    stats = documents.stats()
    result = {"loss": stats["loss"], "stderr": stats["stderr"], "documents": stats["documents"],
              "tokens": stats["tokens"], "bits_per_byte": _data.bits_per_byte(float(documents.nll.sum()),
                                                                              max(total_bytes, 1))}
    result.update(section_metrics(config.model, sums))
    if keep_sums:
        result["sums"] = sums
    return result


def section_metrics(model_config, sums: dict) -> dict:
    """{'<section>/<metric>': value} from the evaluation sums {'<section>/<name>': [L, ...]}: each FFN section with
    sums asks its kind (`Kind.eval_metrics(sums of the section)`, grin_jax.ffn); the attention experts ('moa')
    are summarised as the ds_moe kind's. model_config: the experiment's
    model section (or a ModelConfig)."""
    if not sums:
        return {}
    from grin_jax import ffn as _ffn
    from grin_jax import models as _models

    model = model_config if isinstance(model_config, _models.ModelConfig) else _models.model_config_from(model_config)
    out = {}
    for name, _ in model.sections + ((("moa", model.moa),) if model.moa is not None else ()):
        own = {key.split("/", 1)[1]: value for key, value in sums.items() if key.split("/", 1)[0] == name}
        if not own:
            continue
        if name == "moa":  # the attention experts (nn/moa.py): the ds_moe kind's sums and metrics
            kind = "ds_moe"
        else:
            kind = model.kind_of(name)
        summarise = getattr(_ffn.get_ffn(kind), "eval_metrics", None)
        if summarise is None:
            raise ValueError(f"FFN section {name!r} (kind {kind!r}) returns sums {sorted(own)} but its kind has no "
                             "eval_metrics(sums) to turn them into metrics (grin_jax.ffn)")
        out.update({f"{name}/{metric}": value for metric, value in summarise(own).items()})
    return out


def _add_sums(totals: dict, sums) -> None:
    """totals += this batch's sums (float64 numpy, on the host)."""
    for key, value in sums.items():
        value = np.asarray(value, np.float64)
        totals[key] = totals[key] + value if key in totals else value


def _score_documents(eval_step, params, config, tokenizer, *, max_batches, mesh, data_index, data_count):
    """(DocumentLosses, UTF-8 bytes of the targets) of this process's slice of the evaluation batches, and the eval
    step's sums over the global batches (float64). Batch t + 1 is dispatched before batch t's outputs are read, so
    the device does not wait for the host."""
    global_size = config.train.batch_size
    local = global_size // data_count
    with_documents = document_attention(config.data)
    rows = slice(data_index * local, (data_index + 1) * local) if mesh is not None else slice(None)
    documents, total_bytes, sums, pending = _data.DocumentLosses(), 0, {}, None

    def read(batch, out):
        nll, batch_sums = out
        documents.add(batch["doc_ids"], np.asarray(nll)[rows], batch["loss_mask"])
        _add_sums(sums, batch_sums)

    for batch in _data.eval_batches(config.data, batch_size=local, tokenizer=tokenizer, max_batches=max_batches,
                                    process_index=data_index, process_count=data_count):
        host = _device_batch(batch, with_documents)
        out = eval_step(params, host if mesh is None else _sharding.global_batch(host, mesh, global_size))
        if pending is not None:
            read(*pending)
        pending = (batch, out)
        total_bytes += _data.batch_bytes(tokenizer, batch["targets"], batch["loss_mask"])
    if pending is not None:
        read(*pending)
    return documents, total_bytes, sums


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


def evaluate_checkpoint(workdir: str, *, step: int | None = None, max_batches: int | None = None,
                        keep_sums: bool = False) -> dict:
    """evaluate() of a run's checkpoint `step` (None: the newest intact one) on one device, plus 'step' (keep_sums:
    as evaluate)."""
    from grin_jax.train.step import make_eval_step
    from grin_jax.train.trainer import load_trained

    config, graphdef, params, tokenizer, step = load_trained(workdir, step, with_step=True)
    result = evaluate(jax.jit(make_eval_step(graphdef)), params, config, tokenizer, max_batches=max_batches,
                      keep_sums=keep_sums)
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
    for key, value in result.items():  # the FFN kinds' evaluation metrics (e.g. PEER's peer/usage, peer/unevenness)
        if "/" in key and isinstance(value, float):
            print(f"  {key} {value:.4f}")
    if args.out:
        from grin_jax.train.metrics import write_json_atomic
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
