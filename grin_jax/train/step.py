"""The jitted steps: the training objective, the train step (metrics from the model's aux, generically), the eval
step, and their ahead-of-time compilation with explicit shardings.

Packed rows are fed as documents when the batch carries 'positions' and 'segment_ids' (`batch_features` /
`batch_spec` with document_attention=True, data.document_attention's default): the segment ids mask attention to
the query's own document and the per-document positions feed RoPE, so every document of a row is modelled as if it
were alone (tests/test_packing.py). A batch without them (data.document_attention=False, synthetic batches):
positions 0..S-1 and no mask, rows attend across document boundaries (the behaviour before issue 12).

Running statistics (models/lm.py): a model with nnx.BatchStat variables (PEER's query BatchNorm) has them in
state['model_state'] (the key is absent otherwise). The train step's forward (`models.apply_train`) computes batch
statistics over the tokens whose loss_mask is non-zero (padding excluded; packing.py sets loss_mask 0 exactly on
padding) and returns the updated running statistics, which become the new state['model_state']; the optimizer sees
state['params'] only. Under jit with the batch sharded over the mesh's data axes those statistics are over the
global batch (SPMD reductions are global; tests/test_peer.py checks the step equals one device's). The eval step
takes the model's variables (models.join_variables(params, model_state)) and reads the running statistics.

The eval step returns the per-token NLL and the model's aux['sums'] (per-batch totals over the real tokens, e.g.
PEER's router score mass per expert; {} for most models), which evaluation adds up over the evaluation set.

Gradient accumulation (train.grad_accum_steps = M > 1, `_make_accumulating_train_step`): M micro-batches, one
optimizer update, the whole batch's objective; the aux losses that need statistics of the whole batch (the FFN
kinds with `takes_batch_stats`) get them from a forward-only first pass, as `batch_stats` (docs/scale_out.md).

The train step's metrics: 'loss' (cross-entropy), 'total_loss' (+ aux loss), 'aux_loss', 'grad_norm', then every
entry of the model's aux['losses'] (scalars, unweighted) and aux['metrics'] (per layer, stacked) under its own name,
e.g. 'moe/load_balance_loss', 'moe/expert_load' [L, E]. The step knows no FFN kind: the names come from the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from grin_jax import models as _models
from grin_jax import sharding as _sharding
from grin_jax.train import sparse_rows as _sparse_rows


DOCUMENT_FEATURES = ("positions", "segment_ids")  # what document attention adds to the device batch


def document_attention(data_config) -> bool:
    """data.document_attention: feed packed rows as documents (default True; see the module docstring)."""
    return data_config.get("document_attention", True)  # validated with the data section (data/config.py)


def batch_features(document_attention: bool = True) -> tuple[str, ...]:
    """The keys of a device batch."""
    return ("inputs", "targets", "loss_mask") + (DOCUMENT_FEATURES if document_attention else ())


def _documents(batch) -> dict:
    return {f"{k}_BS": batch[k] for k in DOCUMENT_FEATURES if k in batch}


def make_loss_fn(graphdef):
    """(params, batch, rng, model_state=None, row_sinks=None, batch_stats=None) -> (cross-entropy + aux loss,
    (cross-entropy, aux, model_state)): the training objective; model_state: the running statistics
    (state['model_state'], None for a model without), returned updated from this batch's non-padding tokens
    (loss_mask); row_sinks: the row-sparse update's sinks (train/sparse_rows.py; aux['row_ids'] then holds their
    rows' ids); batch_stats: the whole step's statistics of an accumulated step (module docstring)."""

    def loss_fn(params, batch, rng, model_state=None, row_sinks=None, batch_stats=None):
        logits_BSV, aux, model_state = _models.apply_train(graphdef, params, model_state, batch["inputs"], rng=rng,
                                                           token_mask_BS=batch["loss_mask"], row_sinks=row_sinks,
                                                           batch_stats=batch_stats, **_documents(batch))
        ce = _models.cross_entropy(logits_BSV, batch["targets"], batch["loss_mask"])
        return ce + aux["aux_loss"], (ce, aux, model_state)

    return loss_fn


def make_train_step(graphdef, tx, grad_accum_steps: int = 1):
    """state, batch -> (state, metrics). The per-step key is fold_in(state['rng'], step): resumable. A state with
    'model_state' (running statistics) gets it back updated by the step's forward; the optimizer never sees it.
    tx: an optax transformation, or a sparse_rows.RowSparseAdamW for a model with row-sparse tables (PEER's
    table_update='sparse'): the step then differentiates the tables' gathered rows instead of the tables.
    grad_accum_steps M > 1: the batch is split into M micro-batches whose gradients are summed
    (`_make_accumulating_train_step`)."""
    check_grad_accum(grad_accum_steps, row_sparse=isinstance(tx, _sparse_rows.RowSparseAdamW))
    if isinstance(tx, _sparse_rows.RowSparseAdamW):
        return _make_row_sparse_train_step(graphdef, tx)
    if grad_accum_steps > 1:
        return _make_accumulating_train_step(graphdef, tx, grad_accum_steps)
    loss_fn = make_loss_fn(graphdef)

    def train_step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        (total, (ce, aux, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, rng, state.get("model_state"))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        return (_next_state(state, params, opt_state, model_state),
                _step_metrics(ce, total, aux, global_norm(grads)))

    return train_step


def check_grad_accum(grad_accum_steps: int, *, row_sparse: bool = False, model=None) -> None:
    """train.grad_accum_steps against the optimizer and the model (the batch: train/config.py and
    sharding.validate); raises ValueError naming the key."""
    if not isinstance(grad_accum_steps, int) or isinstance(grad_accum_steps, bool) or grad_accum_steps < 1:
        raise ValueError(f"train.grad_accum_steps={grad_accum_steps!r} is invalid: accepted values are integers >= 1")
    if grad_accum_steps == 1:
        return
    if row_sparse:
        raise ValueError(f"train.grad_accum_steps={grad_accum_steps} is not supported with row-sparse table updates "
                         "(PEER's table_update='sparse'): accepted value is 1, or peer.table_update='dense'")
    for name, section in () if model is None else model.sections:
        groups = getattr(section, "load_balance_groups", 1)
        if groups != 1:
            raise ValueError(f"train.grad_accum_steps={grad_accum_steps} needs global load balancing: "
                             f"model.{name}.load_balance_groups={groups} is invalid with it (accepted: 1)")


def micro_batches(batch: dict, count: int) -> dict:
    """[B, ...] arrays -> [count, B / count, ...]: micro-batch m holds rows m, m + count, m + 2 count, ... so that
    every data shard's block of rows gives each micro-batch the same number of rows, locally (no data moves)."""
    def split(x):
        rows = x.shape[0]
        return jnp.swapaxes(x.reshape((rows // count, count) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _make_accumulating_train_step(graphdef, tx, count: int):
    """The train step over `count` micro-batches (rows split by `micro_batches`), one optimizer update.

    The objective is the whole batch's: the cross-entropy of micro-batch m is weighted by its share of the batch's
    real tokens (n_m / N), the aux losses by 1 / count. Aux losses that need statistics of the whole batch (the
    kinds with `takes_batch_stats`: the MoE load balance's expert load, DS-MoE's mutual information) get them
    from a first, forward-only pass over the micro-batches (`aux['batch_stats']`, averaged), given back to every
    micro-batch's forward; the kinds' losses are built so that the mean over the micro-batches equals the whole
    batch's loss in value and gradient (moe/losses.py). That pass costs one more forward per step, and only for
    models with such kinds. Micro-batch m draws its randomness (router noise) from fold_in(step key, m): equal
    in distribution to the whole batch's draw, not in value. Running statistics (PEER's BatchNorm) are updated
    micro-batch after micro-batch. Metrics: 'loss' is the whole batch's cross-entropy; the aux losses and the
    kinds' metrics are means over the micro-batches (the expert load exactly the whole batch's)."""
    loss_fn = make_loss_fn(graphdef)

    def train_step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        micro = micro_batches(batch, count)
        tokens_M = jnp.sum(micro["loss_mask"] > 0, axis=(1, 2)).astype(jnp.float32)
        total_tokens = jnp.maximum(jnp.sum(tokens_M), 1.0)
        params, model_state = state["params"], state.get("model_state")
        batch_stats = _whole_batch_statistics(graphdef, params, model_state, micro, rng, count)

        def accumulate(carry, xs):
            grads_sum, model_state = carry
            index, micro_batch, tokens = xs

            def objective(params):
                _, (ce, aux, new_state) = loss_fn(params, micro_batch, jax.random.fold_in(rng, index), model_state,
                                                  batch_stats=batch_stats)
                return ce * tokens / total_tokens + aux["aux_loss"] / count, (ce, aux, new_state)

            (_, (ce, aux, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(params)
            aux = {k: v for k, v in aux.items() if k != "batch_stats"}
            return (jax.tree.map(jnp.add, grads_sum, grads), model_state), (ce * tokens, aux)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, model_state), (ce_sums, auxes) = jax.lax.scan(
            accumulate, (zeros, model_state), (jnp.arange(count), micro, tokens_M))
        ce = jnp.sum(ce_sums) / total_tokens
        aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), auxes)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = jax.tree.map(lambda p, u: p + u, params, updates)
        return (_next_state(state, new_params, opt_state, model_state),
                _step_metrics(ce, ce + aux["aux_loss"], aux, global_norm(grads)))

    return train_step


def _whole_batch_statistics(graphdef, params, model_state, micro, rng, count: int):
    """The mean over the micro-batches of the model's aux['batch_stats'] (forward only, the training forward with
    each micro-batch's key), or None when no layer reports any (the model has no kind that needs them)."""
    loss_fn = make_loss_fn(graphdef)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda p, s: loss_fn(p, first, rng, s)[1][1]["batch_stats"], params, model_state)
    if not jax.tree.leaves(shapes):
        return None

    def forward(model_state, xs):
        index, micro_batch = xs
        _, (_, aux, model_state) = loss_fn(params, micro_batch, jax.random.fold_in(rng, index), model_state)
        return model_state, aux["batch_stats"]

    _, stats = jax.lax.scan(forward, model_state, (jnp.arange(count), micro))
    return jax.lax.stop_gradient(jax.tree.map(lambda x: jnp.mean(x, axis=0), stats))


def _make_row_sparse_train_step(graphdef, tx):
    """The train step of a model with row-sparse tables (train/sparse_rows.py): zero sinks [T, H, K, D] added to the
    tables' gathered rows are differentiated instead of the tables, and tx.apply updates only the rows retrieved."""
    loss_fn = make_loss_fn(graphdef)

    def train_step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        B, S = batch["inputs"].shape
        variables = _models.join_variables(state["params"], state.get("model_state"))
        shapes = _models.row_sink_shapes(graphdef, variables, B * S)
        if set(shapes) != set(tx.tables):
            raise ValueError(f"the optimizer updates the tables {sorted(tx.tables)} row-sparsely but the model has "
                             f"{sorted(shapes)}: build it from this model (trainer.make_optimizer)")
        rest, tables = _sparse_rows.split_tables(state["params"], tx.tables)
        sinks = {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}

        def objective(rest, sinks):
            return loss_fn(nnx.merge_state(rest, tables), batch, rng, state.get("model_state"), row_sinks=sinks)

        (total, (ce, aux, model_state)), (grads, sink_grads) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True)(rest, sinks)
        row_ids = aux.pop("row_ids")
        row_grads = {name: (row_ids[name], sink_grads[name]) for name in sinks}
        params, opt_state, grad_norm = tx.apply(state["params"], grads, row_grads, state["opt_state"], state["step"])
        return _next_state(state, params, opt_state, model_state), _step_metrics(ce, total, aux, grad_norm)

    return train_step


def _step_metrics(ce, total, aux, grad_norm) -> dict:
    """The train step's metrics (module docstring)."""
    metrics = {"loss": ce, "total_loss": total, "aux_loss": aux["aux_loss"], "grad_norm": grad_norm}
    metrics.update(aux["losses"])
    metrics.update(aux["metrics"])
    return metrics


def _next_state(state, params, opt_state, model_state) -> dict:
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
    if "model_state" in state:
        new_state["model_state"] = model_state
    return new_state


def make_eval_step(graphdef):
    """(params, batch) -> (nll [B, S], sums). nll: the per-token NLL of the targets (float32, 0 where loss_mask is
    0): the host sums it per document (grin_jax.data.DocumentLosses) for the loss and its standard error. sums: the
    model's aux['sums'] over this batch's real tokens ({'<section>/<name>': [L, ...]}, e.g. PEER's
    'peer/router_score_mass' [L, N]; {} for a model whose kinds have none): grin_jax.train.evaluate adds them up
    over the evaluation set. The model receives the batch's loss_mask as its token mask (only the kinds that take
    one see it; in eval mode it changes no output). params: the model's variables
    (models.join_variables(state['params'], state.get('model_state')): running statistics in eval mode)."""

    def eval_step(params, batch):
        logits_BSV, aux = _models.apply(graphdef, params, batch["inputs"], training=False,
                                        token_mask_BS=batch["loss_mask"], **_documents(batch))
        logp = jax.nn.log_softmax(logits_BSV.astype(jnp.float32), axis=-1)
        nll_BS = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.where(batch["loss_mask"] > 0, nll_BS, 0.0), aux["sums"]

    return eval_step


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def batch_spec(batch_size: int, seq_len: int, *, document_attention: bool = True) -> dict:
    """Shapes and dtypes of a device batch (for ahead-of-time compilation): inputs, targets, loss_mask, and with
    document_attention positions and segment_ids."""
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32)
            for k in batch_features(document_attention)}


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled executable as XLA counts them (0.0 when the backend does not say)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def compile_train_step(graphdef, tx, state, shardings, mesh, batch, *, grad_accum_steps: int = 1,
                       compiler_options: dict | None = None):
    """The train step compiled ahead of time with explicit in/out shardings: the state as `shardings` (donated),
    the batch over the data axes, metrics replicated. Traced under jax.set_mesh(mesh), which is where the MoE block
    finds the mesh. `state` and `batch` may be abstract (ShapeDtypeStructs). grad_accum_steps: micro-batches per
    step (make_train_step). compiler_options: XLA options for this compile (tests:
    {'xla_backend_optimization_level': 0} halves CPU compile time)."""
    with jax.set_mesh(mesh):
        step = make_train_step(graphdef, tx, grad_accum_steps)
        return jax.jit(step, in_shardings=(shardings, _sharding.batch_sharding(mesh)),
                       out_shardings=(shardings, _sharding.replicated(mesh)),
                       donate_argnums=(0,)).lower(state, batch).compile(compiler_options)


def compile_eval_step(graphdef, params, param_shardings, mesh, batch, *, compiler_options: dict | None = None):
    """The eval step (make_eval_step: (nll, sums)) compiled ahead of time: params (the model's variables) as
    `param_shardings`, the batch over the data axes, both outputs replicated (the sums are over the global batch)."""
    with jax.set_mesh(mesh):
        return jax.jit(make_eval_step(graphdef), in_shardings=(param_shardings, _sharding.batch_sharding(mesh)),
                       out_shardings=_sharding.replicated(mesh)).lower(params, batch).compile(compiler_options)
