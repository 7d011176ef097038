"""The training loop: config -> model -> data -> jitted step -> checkpoints, metrics, plots, summary.

    python -m grin_jax.train --config=configs/grin_tiny.py --workdir=workdirs/grin_tiny

Workdir layout:
    checkpoints/<step>/   Orbax checkpoints (params, optimizer state, step, RNG, running statistics if any; data
                          iterator state and the loss as JSON), sealed with checksums.json (train/checkpoint.py)
    damaged_checkpoints/, diverged_checkpoints/   checkpoints set aside (failed verification; after a divergence)
    metrics.jsonl         one JSON record per logged step (train/*, eval/*)
    tb/                   TensorBoard event files
    config.json           the resolved experiment config
    loss.png, expert_load.png   plots written at the end
    summary.json          final losses, the final validation loss over the whole split with its standard error
                          over documents, bits per byte, the FFN kinds' evaluation metrics of that final evaluation
                          as validation_<section>/<metric> (a PEER model: validation_peer/usage, .../unevenness),
                          tokens seen, wall time, parameter counts, the git commit and dirty flag of the code, and
                          the scaling law's columns (grin_jax.scaling.summary), written atomically
Restarting with the same workdir resumes from the newest intact checkpoint (damaged ones are reported and set
aside); the data order, the RNG and therefore the losses continue exactly as in an uninterrupted run. After a
non-finite loss the checkpoints saved since the last healthy one (DIVERGENCE_FACTOR) are set aside, so that a
rerun resumes from before the divergence.

`train` in parts: `_setup` (mesh, optimizer, data, state, checkpointer) -> `_restore` (the latest checkpoint) ->
`_compile` (the steps, ahead of time) -> `_loop` (the steps, evals and checkpoints) -> `_summarise`. The jitted
steps are in grin_jax.train.step (re-exported here). Packed rows are fed as documents (segment mask and
per-document positions) unless data.document_attention is False (step.py).

Evaluation (train.eval_every, train.eval_batches; train.final_eval_batches): the eval step returns each target's
NLL, the host sums it per document (grin_jax.data.DocumentLosses, by the batches' doc_ids); with several data
slices each process scores its slice and the per-slice sums are all-gathered and merged. The eval step also
returns the FFN kinds' sums (PEER: the router score mass per expert), added up over the evaluation batches into
their metrics (eval/peer/usage, eval/peer/unevenness, ...; grin_jax.train.evaluate). The final evaluation (whole
split by default) gives summary.json's validation_loss, its standard error over documents and those metrics.

The host reads each step's metrics one step late (`_StepLog`: step N+1 is dispatched before step N's metrics are
pulled), so the device never waits for the host; a non-finite loss stops the run one step late, and every
checkpoint is written only after its step's loss was checked finite.

The state: {'params', 'opt_state', 'step', 'rng'}, plus 'model_state' for a model with running statistics
(nnx.BatchStat: PEER's query BatchNorm; models/lm.py): updated by each train step's forward, never by the optimizer,
checkpointed with the rest, and joined to the parameters (models.join_variables) for evaluation, for the eval step
and in `load_trained`. A model without running statistics has no 'model_state' key (its checkpoints are as before).

Sharding (grin_jax.sharding): the state is created directly sharded on the ('data', 'expert', 'model') mesh of
`config.mesh` (a jit of the initialiser with out_shardings), the train and eval steps are compiled with explicit
in/out shardings under `jax.set_mesh(mesh)` (the MoE block reads the mesh from there). train.batch_size is GLOBAL:
each process loads its slice of it (sharding.data_process_layout) and the global batch is assembled with
jax.make_array_from_process_local_data. In a multi-process run process 0 writes the metrics, plots and summary;
every process takes part in the steps and the (Orbax, multi-host) checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from grin_jax import data as _data
from grin_jax import models as _models
from grin_jax import sharding as _sharding
from grin_jax.scaling import summary as _scaling_summary
from grin_jax.train import checkpoint as _checkpoint
from grin_jax.train import lock as _lock
from grin_jax.train.evaluate import _allgather_json, _device_batch, evaluate  # noqa: F401  (evaluate: re-exported)
from grin_jax.train import config as _train_config
from grin_jax.train import metrics as _metrics
from grin_jax.train import optim as _optim
from grin_jax.train import plots as _plots
from grin_jax.train import provenance as _provenance
from grin_jax.train import sparse_rows as _sparse_rows
from grin_jax.train.step import (  # noqa: F401  (re-exported: grin_jax.bench, tests, notebooks use trainer.*)
    all_finite,
    batch_features,
    batch_spec,
    check_grad_accum,
    compile_eval_step,
    compile_train_step,
    compiled_flops,
    document_attention,
    make_eval_step,
    make_loss_fn,
    make_train_step,
)


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything resolved and validated from a config, before anything is compiled."""

    config: ml_collections.ConfigDict
    model: _models.ModelConfig
    name: str


def resolve(config: ml_collections.ConfigDict, *, check_mesh: bool = True) -> Experiment:
    """Validate every section (errors name the key) and build the model config. check_mesh: also check the mesh
    against this machine's devices, the model and the batch (sharding.validate; initialises the JAX backend)."""
    for section in ("model", "data", "train"):
        if section not in config:
            raise ValueError(f"config has no '{section}' section: an experiment config needs model, data and train")
    _train_config.validate_train_config(config.train)
    _data.validate_data_config(config.data)
    document_attention(config.data)
    model_config = _models.model_config_from(config.model)
    if config.data.seq_len > model_config.max_seq_len:
        raise ValueError(f"data.seq_len={config.data.seq_len} is invalid: accepted values are <= "
                         f"model.max_seq_len={model_config.max_seq_len}")
    _sharding.distributed_config_of(config)  # unknown keys
    check_grad_accum(_train_config.grad_accum_steps(config.train), model=model_config)
    _check_host_memory(config, model_config)
    if check_mesh:
        _sharding.validate(config)  # the mesh against the devices, the model and the batch
    return Experiment(config=config, model=model_config, name=config.get("name", "experiment"))


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_host_memory(config, model_config, memory_bytes: int | None = None) -> None:
    """Refuse, before anything is allocated, sizes whose host buffers alone would exceed half of this machine's
    memory (rather than take memory until the machine runs out): the global batch's activations (a lower bound:
    the residual stream of every layer, float32) and the windowed stream's shuffle buffer."""
    memory = _host_memory_bytes() if memory_bytes is None else memory_bytes
    accum = _train_config.grad_accum_steps(config.train)
    tokens = config.train.batch_size * config.data.seq_len // accum
    per_sequence = config.data.seq_len * model_config.d_model * model_config.num_layers * 4
    activations = tokens * model_config.d_model * model_config.num_layers * 4
    if activations > memory // 2:
        raise ValueError(f"train.batch_size={config.train.batch_size} is too large for this machine: "
                         f"{tokens:,} tokens per micro-batch need at least {activations / 2**30:.1f} GiB of "
                         f"activations "
                         f"(the residual stream alone), over half of its {memory / 2**30:.0f} GiB; accepted values are "
                         f"up to {max(1, (memory // 2) // per_sequence) * accum:,} (with train.grad_accum_steps="
                         f"{accum}: more micro-batches per step take a larger batch)")
    if config.data.get("shuffle") == "windows":
        buffer = config.data.shuffle_windows * config.data.seq_len * 4 * 5  # five int32/float32 fields per row
        if buffer > memory // 2:
            raise ValueError(f"data.shuffle_windows={config.data.shuffle_windows} is too large for this machine: "
                             f"the shuffle buffer needs {buffer / 2**30:.1f} GiB, over half of its "
                             f"{memory / 2**30:.0f} GiB")


def make_optimizer(tc, model):
    """(optimizer, learning-rate schedule) of a `train` config section for `model` (a ModelConfig): optax AdamW +
    warm-up/cosine + clipping (train/optim.py), or, when the model has row-sparse tables (PEER with
    table_update='sparse'), a sparse_rows.RowSparseAdamW with the same settings."""
    settings = dict(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
                    weight_decay=tc.weight_decay, b1=tc.b1, b2=tc.b2, final_lr_fraction=tc.final_lr_fraction)
    graphdef, variables = _models.abstract_init(model)
    tables = tuple(_models.row_sink_shapes(graphdef, variables, 1))
    if not tables:
        return _optim.make_optimizer(**settings, clip_norm=tc.clip_norm)
    dense, schedule = _optim.make_optimizer(**settings, clip_norm=0.0)
    return _sparse_rows.RowSparseAdamW(tables=tables, dense=dense, schedule=schedule, b1=tc.b1, b2=tc.b2,
                                       eps=_optim.ADAM_EPS, weight_decay=tc.weight_decay,
                                       clip_norm=tc.clip_norm), schedule


# A checkpoint is healthy when the mean training loss of the steps since the previous checkpoint is at most this
# factor times the best such mean of the run so far: the newest healthy checkpoint is pinned (never rotated out)
# and is where a run that diverged resumes.
DIVERGENCE_FACTOR = 1.5


def _non_finite(what: str, run: "_Run") -> NonFiniteLossError:
    """The error for a non-finite loss or gradient: checkpoints after the newest healthy one are set aside
    (<workdir>/diverged_checkpoints/), so that rerunning the command resumes from the healthy one."""
    checkpointer = run.checkpointer
    checkpointer.wait()
    good = run.healthy_step
    newer = [s for s in checkpointer.all_steps() if good is None or s > good]
    for step in newer:
        checkpointer.set_aside(step, "diverged")
    if good is None:
        where = "no healthy checkpoint yet: rerunning starts over"
    else:
        best = "" if run.best_loss is None else f" (loss {run.best_loss:.4f})"
        where = (f"rerunning resumes from the last healthy checkpoint, step {good}{best}"
                 + (f"; the later ones (steps {newer}) were diverging and are set aside in "
                    f"{os.path.join(run.workdir, 'diverged_checkpoints')}" if newer else ""))
    return NonFiniteLossError(f"{what}; the run stopped: {where}. Try a lower train.learning_rate, a larger "
                              "train.warmup_steps or train.clip_norm > 0.")


def enable_compilation_cache(setting: str) -> None:
    """Turn on JAX's persistent compilation cache (see train.compilation_cache_dir)."""
    if setting == "none":
        return
    path = setting or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser("~/.cache/grin_jax/jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)


# ------------------------------------------------------------------------------------------------ the state
def _train_state(variables, tx, step, rng) -> dict:
    """The train state of the model's variables: 'model_state' only when it has running statistics."""
    params, model_state = _models.split_variables(variables)
    state = {"params": params, "opt_state": tx.init(params), "step": step, "rng": rng}
    if model_state:
        state["model_state"] = model_state
    return state


def inference_variables(state):
    """The model's variables of a train state (params, and the running statistics when it has some): what
    models.apply, the eval step and generation take."""
    return _models.join_variables(state["params"], state.get("model_state"))


def abstract_state(experiment: Experiment, tx):
    """(graphdef, the train state as ShapeDtypeStructs): nothing allocated."""
    graphdef, variables = _models.abstract_init(experiment.model)
    state = jax.eval_shape(lambda v: _train_state(v, tx, jnp.int32(0), jax.random.key(0)), variables)
    return graphdef, state


def init_state(experiment: Experiment, tx, mesh=None):
    """(graphdef, state). With a mesh of more than one device the state is created sharded: the initialiser is
    jitted with out_shardings (sharding.state_shardings), nothing is materialised whole on one device. Without
    one (or on one device) it runs eagerly as before: initialisers compiled once per shape and cached."""
    seed = experiment.config.train.seed

    def make(variables):
        return _train_state(variables, tx, jnp.int32(0), jax.random.key(seed + 1))

    if mesh is None or mesh.size == 1:
        graphdef, variables = _models.init(experiment.model, rng=jax.random.key(seed))
        state = make(variables)
        if mesh is not None:
            state = jax.device_put(state, state_shardings(experiment, tx, mesh))
        return graphdef, state
    graphdef, _ = _models.abstract_init(experiment.model)
    init = jax.jit(lambda: make(_models.init(experiment.model, rng=jax.random.key(seed))[1]),
                   out_shardings=state_shardings(experiment, tx, mesh))
    return graphdef, init()


def state_shardings(experiment: Experiment, tx, mesh):
    """NamedShardings of the train state on `mesh` (parameters and running statistics by logical names, optimizer
    state alike)."""
    return _sharding.state_shardings(abstract_state(experiment, tx)[1], mesh)


# ------------------------------------------------------------------------------------------------ the run's parts
@dataclasses.dataclass
class _Run:
    """The fixed parts of one training run, built by `_setup`; `_restore` sets start_step and prior_wall."""

    experiment: Experiment
    workdir: str
    mesh: Any
    data_index: int
    data_count: int
    tx: Any
    schedule: Any
    train_iter: Any
    tokenizer: Any
    graphdef: Any
    checkpointer: _checkpoint.Checkpointer
    wall_start: float
    provenance: dict  # git_commit, git_dirty of the code this process runs
    start_step: int = 0
    prior_wall: float = 0.0  # wall seconds of the runs this one resumes
    best_loss: float | None = None  # the best mean train loss between two checkpoints so far (DIVERGENCE_FACTOR)
    healthy_step: int | None = None  # the newest healthy checkpoint (pinned)

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.experiment.config

    @property
    def tc(self) -> ml_collections.ConfigDict:
        return self.experiment.config.train

    @property
    def primary(self) -> bool:
        return jax.process_index() == 0

    @property
    def document_attention(self) -> bool:
        return document_attention(self.config.data)

    @property
    def tokens_per_step(self) -> int:
        return self.tc.batch_size * self.config.data.seq_len

    def wall_seconds(self) -> float:
        return self.prior_wall + time.time() - self.wall_start


def _check_eval_split(data_config, tokenizer) -> None:
    """Open the validation split and read one document now, so a bad data.eval_split / data.text_key or an empty
    split stops the run at start-up, not at the first evaluation after training steps."""
    if _data.split_statistics(data_config, tokenizer=tokenizer, max_documents=1)["documents"] == 0:
        raise ValueError(f"data.eval_split={data_config.eval_split!r} has no documents: accepted are non-empty "
                         "splits (for the embedded corpus and data.name='text', data.validation_fraction > 0 selects "
                         "them)")


def _setup(experiment: Experiment, workdir: str):
    """(_Run, the freshly initialised state): writes config.json, builds the mesh, optimizer, data, checkpointer."""
    config, tc = experiment.config, experiment.config.train
    os.makedirs(workdir, exist_ok=True)
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.exists(checkpoints) and not os.path.isdir(checkpoints):
        raise ValueError(f"{checkpoints} exists and is not a directory: remove it or use another --workdir")
    resolved = resolved_config(config)
    check_resumable(workdir, resolved)  # before anything is written: a refused run leaves the record intact
    if jax.process_index() == 0:
        _metrics.write_json_atomic(os.path.join(workdir, "config.json"), resolved)
    wall_start = time.time()
    mesh = _sharding.make_mesh(_sharding.mesh_config_of(config))
    data_index, data_count = _sharding.data_process_layout(mesh, tc.batch_size)
    tx, schedule = make_optimizer(tc, experiment.model)
    train_iter, tokenizer = _data.make_dataset(config.data, batch_size=tc.batch_size // data_count, seed=tc.seed,
                                               process_index=data_index, process_count=data_count)
    if tokenizer.vocab_size > experiment.model.vocab_size:
        raise ValueError(f"model.vocab_size={experiment.model.vocab_size} is invalid: the tokenizer has "
                         f"{tokenizer.vocab_size} ids; accepted values are >= {tokenizer.vocab_size}")
    _check_eval_split(config.data, tokenizer)
    graphdef, state = init_state(experiment, tx, mesh)
    checkpointer = _checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tc.keep_checkpoints,
                                            async_save=tc.async_checkpoint)
    run = _Run(experiment=experiment, workdir=workdir, mesh=mesh, data_index=data_index, data_count=data_count,
               tx=tx, schedule=schedule, train_iter=train_iter, tokenizer=tokenizer, graphdef=graphdef,
               checkpointer=checkpointer, wall_start=wall_start, provenance=_provenance.git_provenance())
    return run, state


# What may change when a workdir is reused (resumed): how long and how visibly the run goes on, and the peak learning
# rate (to resume a diverged run from its last healthy checkpoint more gently). Everything else (model, data,
# batch, the optimizer's other settings, seed, mesh) must equal the stored config.json.
RESUMABLE_CHANGES = ("name", "train.steps", "train.learning_rate", "train.log_every", "train.eval_every",
                     "train.eval_batches", "train.final_eval_batches", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.progress", "train.async_checkpoint", "train.compilation_cache_dir")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def resolved_config(config: ml_collections.ConfigDict) -> dict:
    """The config as written to config.json (document_attention explicit: load_trained reads it back)."""
    resolved = json.loads(config.to_json_best_effort())
    resolved["data"]["document_attention"] = document_attention(config.data)
    return resolved


def check_resumable(workdir: str, resolved: dict) -> None:
    """A workdir is one run: when it holds a config.json, the new config may differ from it only in
    RESUMABLE_CHANGES; otherwise ValueError listing the differing keys (stored -> new)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        stored = _flat(json.load(f))
    new = _flat(resolved)
    differing = sorted(k for k in set(stored) | set(new)
                       if stored.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if differing:
        shown = "; ".join(f"{k}: {stored.get(k)!r} -> {new.get(k)!r}" for k in differing[:8])
        more = f" (and {len(differing) - 8} more)" if len(differing) > 8 else ""
        raise ValueError(f"{workdir} holds a run with another config ({shown}{more}): a workdir is one run; use a new "
                         f"--workdir, or change only {', '.join(RESUMABLE_CHANGES)} to resume")


def _restore(run: _Run, state):
    """The state of the newest checkpoint that verifies and restores (and the data iterator's position), or `state`
    when there is none. Damaged newer checkpoints are reported in one line each and set aside
    (<workdir>/damaged_checkpoints/); when every checkpoint is damaged the run stops rather than start over."""
    checkpointer = run.checkpointer
    if not checkpointer.all_steps():
        return state
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    latest, restored, meta, damaged = checkpointer.restore_newest(_checkpoint.abstract_like(state), log=say)
    if latest is None:
        raise ValueError(f"no checkpoint in {checkpointer.directory} can be restored ("
                         + "; ".join(reason for _, reason in damaged) + "): nothing was moved; use a new --workdir "
                         "to start over, or restore the files")
    for step, _ in damaged:
        say(f"  set aside in {checkpointer.set_aside(step)}; resuming from step {latest}")
    state = restored
    data_states = meta.get("data_states", [meta["data_state"]])
    if len(data_states) != run.data_count:
        raise ValueError(f"{checkpointer.directory}/{latest} was written with the batch loaded in "
                         f"{len(data_states)} slices, this run loads it in {run.data_count}: the data order cannot "
                         "be resumed exactly; resume with the same mesh and number of processes")
    run.train_iter.set_state(data_states[run.data_index])
    run.start_step, run.prior_wall = int(state["step"]), float(meta.get("wall_seconds", 0.0))
    run.best_loss = meta.get("best_loss")
    healthy = [s for s in checkpointer.all_steps() if checkpointer.meta(s).get("healthy", True)]
    run.healthy_step = max(healthy) if healthy else None
    checkpointer.pin(run.healthy_step)
    say(f"resuming from {checkpointer.directory}/{latest} (step {run.start_step})")
    return state


@dataclasses.dataclass(frozen=True)
class _Compiled:
    """The run's executables and what compiling them measured."""

    train_step: Any
    eval_step: Any
    all_finite: Any
    compile_seconds: float
    xla_flops_per_token: float | None


def _compile(run: _Run, state) -> _Compiled:
    """The train and eval steps compiled ahead of time for the run's mesh and batch (see compile_train_step)."""
    enable_compilation_cache(run.tc.compilation_cache_dir)
    shardings = state_shardings(run.experiment, run.tx, run.mesh)
    compile_start = time.perf_counter()
    spec = batch_spec(run.tc.batch_size, run.config.data.seq_len, document_attention=run.document_attention)
    train_step = compile_train_step(run.graphdef, run.tx, state, shardings, run.mesh, spec,
                                    grad_accum_steps=_train_config.grad_accum_steps(run.tc))
    compile_seconds = time.perf_counter() - compile_start
    eval_step = compile_eval_step(run.graphdef, inference_variables(state), inference_variables(shardings), run.mesh,
                                  spec)
    return _Compiled(train_step=train_step, eval_step=eval_step,
                     all_finite=jax.jit(all_finite, out_shardings=_sharding.replicated(run.mesh)),
                     compile_seconds=compile_seconds,
                     xla_flops_per_token=_xla_flops_per_token(train_step, run))


def _xla_flops_per_token(train_step, run: _Run) -> float | None:
    """XLA's FLOP count of the train step per token: the partitioned (per-device) program's count times the devices
    of the mesh. None when the step loops over the layers (model.scan_layers) or the micro-batches
    (train.grad_accum_steps > 1): XLA's cost analysis counts a loop's body once (`python -m grin_jax.plan` counts
    the matmuls with their trip counts)."""
    if run.experiment.model.scan_layers or _train_config.grad_accum_steps(run.tc) > 1:
        return None
    return compiled_flops(train_step) * run.mesh.size / run.tokens_per_step


def _evaluate(run: _Run, compiled: _Compiled, params, *, final: bool = False) -> dict:
    """A periodic evaluation (train.eval_batches) or the final one (train.final_eval_batches; 0: the whole split)."""
    batches = run.tc.final_eval_batches if final else run.tc.eval_batches
    result = evaluate(compiled.eval_step, params, run.config, run.tokenizer, max_batches=batches or None,
                      mesh=run.mesh, data_index=run.data_index, data_count=run.data_count)
    return {**result, "final": final}


def _save(run: _Run, compiled: _Compiled, state, step: int, loss: float | None) -> None:
    """Checkpoint the state after `step`. The caller has checked the step's loss finite; `loss` is the mean train
    loss since the previous checkpoint (healthy or diverging: DIVERGENCE_FACTOR). The parameters are checked here."""
    if not bool(compiled.all_finite(inference_variables(state))):
        raise _non_finite(f"non-finite parameters after step {step}", run)
    healthy = loss is None or run.best_loss is None or loss <= DIVERGENCE_FACTOR * run.best_loss
    if healthy and loss is not None:
        run.best_loss = loss if run.best_loss is None else min(run.best_loss, loss)
    data_state = run.train_iter.get_state()
    meta = {"data_state": data_state, "config_name": run.experiment.name, "wall_seconds": run.wall_seconds(),
            "loss": loss, "best_loss": run.best_loss, "healthy": healthy}
    if jax.process_count() > 1:  # every data slice's iterator state (processes of one slice agree)
        by_slice = dict((i, st) for i, st in _allgather_json([run.data_index, data_state]))
        meta["data_states"] = [by_slice[i] for i in range(run.data_count)]
    if healthy:
        run.healthy_step = step
        run.checkpointer.pin(step)
    run.checkpointer.save(step, state, meta)


# ------------------------------------------------------------------------------------------------ logging
class _NullWriter:
    """Stands in for MetricWriter on processes other than 0: keeps the records in memory, writes nothing."""

    def __init__(self):
        self.records = []

    def write(self, step, metrics, *, prefix=""):
        record = {"step": int(step), **{prefix + k: _metrics._to_python(v) for k, v in metrics.items()}}
        self.records.append(record)
        return record

    def close(self):
        pass


def _host_metrics(metrics) -> dict:
    """A step's metrics on the host (one transfer): scalars as floats, per-layer vectors [L] as their mean over the
    layers, expert loads ('<section>/expert_load' [L, E]) as nested lists (the plot reads them); others dropped."""
    out = {}
    for key, value in jax.device_get(metrics).items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[key] = float(value)
        elif key.endswith("expert_load"):
            out[key] = value.tolist()
        elif value.ndim == 1:
            out[key] = float(value.mean()) if value.size else 0.0
    return out


def _progress_bar(run: _Run):
    if not (run.tc.progress and run.start_step < run.tc.steps):
        return None
    from tqdm import tqdm
    return tqdm(total=run.tc.steps, initial=run.start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                desc=run.experiment.name)


class _StepLog:
    """The host side of the step metrics, one step behind the device (as in nanodo): `push` queues the step just
    dispatched and reads the previous one, which the device has finished (or is finishing, with the new step
    queued behind it), so the host never leaves the device idle. Reading a step checks its loss and gradient norm
    are finite (NonFiniteLossError otherwise), writes its record every train.log_every steps and at the last step
    (train/* and where the data stream was after the step's batch: data/epoch, data/corpus_fraction, from
    DataIterator.position()), and moves the progress bar. `flush` reads the queued step now (it waits for the
    device): the loop calls it before an eval, before a checkpoint (no state is saved whose loss was not checked)
    and at the end."""

    CHECKED = ("loss", "total_loss", "grad_norm")

    def __init__(self, run: _Run, writer):
        self.run, self.writer = run, writer
        self.step_times: list[float] = []  # seconds per step, as the host sees the device finish them
        self.last_eval: dict = {}
        self._pending = None  # (step, device metrics, dispatch time, data position) of the step not read yet
        self._interval_losses: list[float] = []  # every step's loss since the last record (-> train/loss_mean)
        self._losses_since_save: list[float] = []  # every step's loss since the last checkpoint
        self._last_read = 0.0
        self._bar = _progress_bar(run)

    def push(self, step: int, metrics: dict, dispatched_at: float, position: dict) -> None:
        previous, self._pending = self._pending, (step, metrics, dispatched_at, position)
        if previous is not None:
            self._read(*previous)

    def flush(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._read(*pending)

    def loss_since_save(self) -> float | None:
        """The mean loss of the steps read since the last call (None: none), for the next checkpoint."""
        losses, self._losses_since_save = self._losses_since_save, []
        return float(np.mean(losses)) if losses else None

    def _read(self, step: int, metrics: dict, dispatched_at: float, position: dict) -> None:
        tc = self.run.tc
        due = step % tc.log_every == 0 or step == tc.steps
        host = _host_metrics(metrics if due else {k: metrics[k] for k in self.CHECKED})
        now = time.perf_counter()
        # The device ran this step from its dispatch or the previous step's end (as read here), whichever is later.
        self.step_times.append(now - max(dispatched_at, self._last_read))
        self._last_read = now
        if not all(math.isfinite(host[k]) for k in self.CHECKED):
            raise _non_finite(f"non-finite training loss or gradient (loss {host['loss']}) at step {step}",
                              self.run)
        self._interval_losses.append(host["loss"])
        self._losses_since_save.append(host["loss"])
        if due:
            host["loss_mean"] = float(np.mean(self._interval_losses))  # every step since the last record
            self._interval_losses = []
            self._write(step, host, position)
        self._show(host["loss"])

    def _write(self, step: int, host: dict, position: dict) -> None:
        tokens_per_step = self.run.tokens_per_step
        host["learning_rate"] = float(self.run.schedule(step - 1))
        host["tokens_per_second"] = tokens_per_step / float(np.median(self.step_times[-self.run.tc.log_every:]))
        host["tokens"] = step * tokens_per_step
        record = {f"train/{k}": v for k, v in host.items()}
        record["data/epoch"] = int(position["epoch"])
        record["data/corpus_fraction"] = float(position["corpus_fraction"])
        self.writer.write(step, record)

    def write_eval(self, step: int, result: dict) -> None:
        self.last_eval = result
        self.writer.write(step, result, prefix="eval/")

    def _show(self, loss: float) -> None:
        if self._bar is None:
            return
        postfix = {"loss": f"{loss:.3f}", "tok/s": f"{self.run.tokens_per_step / self.step_times[-1]:.0f}"}
        if self.last_eval:
            postfix["val"] = f"{self.last_eval['loss']:.3f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ------------------------------------------------------------------------------------------------ the loop
def _due(every: int, step: int, last: int) -> bool:
    """Every `every` steps (0: never) and at the last step."""
    return bool(every and step % every == 0) or step == last


def _loop(run: _Run, compiled: _Compiled, state, log: _StepLog):
    """Steps from run.start_step to train.steps, with evals and checkpoints; returns (state, the last step)."""
    tc = run.tc
    step = run.start_step
    while step < tc.steps:
        state = _advance(run, compiled, state, log, step)
        step += 1
        if _due(tc.eval_every, step, tc.steps):  # the last step's is the final evaluation (train.final_eval_batches)
            log.flush()
            log.write_eval(step, _evaluate(run, compiled, inference_variables(state), final=step == tc.steps))
        if _due(tc.checkpoint_every, step, tc.steps):
            log.flush()  # this step's loss is checked finite before its state is saved
            _save(run, compiled, state, step, log.loss_since_save())
    log.flush()
    return state, step


def _advance(run: _Run, compiled: _Compiled, state, log: _StepLog, step: int):
    """Step `step` + 1 of the loop: the next batch, the step dispatched, then step `step`'s metrics read (they are
    ready or nearly: the host never waits for the step it has just queued). Returns the new state."""
    host = _device_batch(next(run.train_iter), run.document_attention)
    position = run.train_iter.position()  # after this step's batch
    batch = _sharding.global_batch(host, run.mesh, run.tc.batch_size)
    dispatched_at = time.perf_counter()
    state, metrics = compiled.train_step(state, batch)
    log.push(step + 1, metrics, dispatched_at, position)
    return state


class LoopSteps:
    """The main job's loop, for timing it (grin_jax.bench): `config` set up in `workdir` and compiled as `train`
    does (data pipeline, optimizer, metrics.jsonl), then each call trains `steps` more steps exactly as the loop
    does (the next batch, the step dispatched, the previous step's metrics read and checked, a record every
    train.log_every steps) and reads the last one, without evaluations or checkpoints. The harness's shape:
    `lower().compile()` returns the callable itself."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, steps: int):
        config = ml_collections.ConfigDict(config.to_dict())
        config.train.steps, config.train.progress = 2 ** 62, False  # never the last step: no final record or eval
        self.steps = steps
        self.run, self.state = _setup(resolve(config), workdir)
        self.compiled = _compile(self.run, self.state)
        self.writer = _metrics.MetricWriter(workdir) if self.run.primary else _NullWriter()
        self.log = _StepLog(self.run, self.writer)
        self.step = 0

    def lower(self, *args):
        return self

    def compile(self, *args):
        return self

    def __call__(self, *args) -> None:
        for _ in range(self.steps):
            self.state = _advance(self.run, self.compiled, self.state, self.log, self.step)
            self.step += 1
        self.log.flush()

    def close(self) -> None:
        self.writer.close()
        self.run.checkpointer.close()


def _param_counts(model_config) -> dict:
    from grin_jax import params as _params
    return dict(_params.count_params(model_config))


def _finite(value):
    """A float for summary.json: None when NaN or infinite (JSON has neither)."""
    return float(value) if value is not None and math.isfinite(value) else None


def _summarise(run: _Run, compiled: _Compiled, log: _StepLog, step: int, final_eval: dict, records: list) -> dict:
    """The run's summary (summary.json on process 0) and plots, from the logged records and the final evaluation."""
    train_losses = [r["train/loss"] for r in records if r.get("train/loss") is not None]
    # Smoothed: the last 10 % of the records' train/loss_mean, i.e. the mean over every step of the last ~10 % of
    # the run (not only the logged steps' single batches).
    interval_means = [r.get("train/loss_mean", r["train/loss"]) for r in records
                      if r.get("train/loss") is not None]
    tail = interval_means[-max(1, len(interval_means) // 10):]
    plots = _plots.write_plots(run.workdir, records, title=run.experiment.name) if run.primary else []
    counts = _param_counts(run.experiment.model)
    tokens_seen = int(step * run.tokens_per_step)
    smoothed = float(np.mean(tail)) if tail else None
    summary = {
        "config_name": run.experiment.name,
        "steps": int(step),
        "tokens_seen": tokens_seen,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "smoothed_train_loss": smoothed,
        "validation_loss": _finite(final_eval["loss"]),
        "validation_loss_stderr": _finite(final_eval["stderr"]),  # over documents (DocumentLosses)
        "validation_documents": int(final_eval["documents"]),
        "validation_bits_per_byte": _finite(final_eval["bits_per_byte"]),
        # The FFN kinds' evaluation metrics ('<section>/<metric>', e.g. PEER's peer/usage; none for most models).
        **{f"validation_{key}": _finite(value) if isinstance(value, float) else value
           for key, value in final_eval.items() if "/" in key},
        "corpus_fraction": float(run.train_iter.position()["corpus_fraction"]),  # passes over the train split
        "wall_seconds": run.wall_seconds(),
        "params": counts,
        "plots": [os.path.basename(p) for p in plots],
        "compile_seconds": compiled.compile_seconds,
        "tokens_per_second": float(run.tokens_per_step / np.median(log.step_times)) if log.step_times else None,
        "xla_flops_per_token": compiled.xla_flops_per_token,
        **run.provenance,  # git_commit, git_dirty
    }
    # The scaling law's columns (N, D, G, loss, flops, paper_flops_per_token; grin_jax.scaling.fit reads them).
    summary.update(_scaling_summary.summary_columns(run.config.model, counts, tokens_seen, loss=smoothed))
    if run.primary:
        _metrics.write_json_atomic(os.path.join(run.workdir, "summary.json"), summary)
    return summary


MALLOC_ENV = "GRIN_JAX_MALLOC"  # 0 / off / false / no: leave glibc's allocator settings alone


def keep_freed_buffers() -> bool:
    """On Linux with glibc, before JAX starts its backend: make freed memory reusable instead of returned to the kernel
    (mallopt: one malloc arena for all threads, buffers up to 1 GiB from it rather than fresh mmaps, no trimming).
    XLA:CPU allocates every step's temporaries anew, from its worker threads; by default each thread's arena hands
    freed pages back and the next step's buffers are page-faulted and zero-filled again (1.7 M page faults in 25
    grin_tiny steps; with this 0.27 M, at ~15 % more resident memory). Process-wide; it
    must run before the backend's threads exist (the CLIs call it first): True when applied, False when turned off
    ($GRIN_JAX_MALLOC=0), not on glibc, or too late (the backend already up: nothing is changed)."""
    if os.environ.get(MALLOC_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        from jax._src import xla_bridge
        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):
        pass
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's malloc.h
    return all(libc.mallopt(option, value) == 1 for option, value in
               ((m_arena_max, 1), (m_mmap_threshold, 1 << 30), (m_trim_threshold, 1 << 31)))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) the experiment in `workdir`; returns the summary written to summary.json. The workdir is
    locked while the run goes on (train/lock.py)."""
    experiment = resolve(config)
    with _lock.workdir_lock(workdir, enabled=jax.process_index() == 0):
        summary = _train(experiment, workdir)
    if jax.process_count() > 1:
        # Process 0 ends later (it writes the summary and the plots): the others wait for it here, where a dead peer
        # is caught by the heartbeat, not at JAX's exit barrier, whose distributed.shutdown_timeout would fail a
        # run whose process 0 is merely slow (a loaded machine).
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("grin_jax: run ended")
    return summary


def _train(experiment: Experiment, workdir: str) -> dict:
    run, state = _setup(experiment, workdir)
    writer = None
    try:
        state = _restore(run, state)
        writer = _metrics.MetricWriter(workdir, resume_step=run.start_step) if run.primary else _NullWriter()
        compiled = _compile(run, state)
        log = _StepLog(run, writer)
        try:
            state, step = _loop(run, compiled, state, log)
        finally:
            log.close()
        if not log.last_eval.get("final"):  # resumed after the final step (its evaluation, run before the final
            # checkpoint, is logged already)
            log.last_eval = _evaluate(run, compiled, inference_variables(state), final=True)
    finally:
        run.checkpointer.close()
        if writer is not None:
            writer.close()
    records = _metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if run.primary else writer.records
    return _summarise(run, compiled, log, step, log.last_eval, records)


# ------------------------------------------------------------------------------------------------ reloading
# Data settings added since older runs were configured, with the value those runs trained with.
_EARLIER_DATA = {"shuffle": "windows", "document_attention": False}


def _with_later_keys(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A run's saved config.json completed with the keys added since it was written: train keys at their
    defaults, data keys at the value the run actually used (_EARLIER_DATA)."""
    for key, value in _train_config.default_train_config().items():
        if key not in config.train:
            config.train[key] = value
    for key, value in _EARLIER_DATA.items():
        if key not in config.data:
            config.data[key] = value
    return config


def load_trained(workdir: str, step: int | None = None, *, with_step: bool = False):
    """(config, graphdef, params, tokenizer) of a run's checkpoint `step` (default: the newest intact one; a
    damaged one is reported and skipped). ValueError for a step that is not there or is damaged. with_step: also
    return the step loaded (a fifth element). params: the model's variables, i.e. the parameters joined with the
    checkpoint's running statistics (state['model_state']) when the model has some: ready for models.apply (eval
    mode reads them), the eval step and models.generate; models.split_variables separates them."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = _with_later_keys(ml_collections.ConfigDict(json.load(f)))
    experiment = resolve(config, check_mesh=False)  # restored onto one device, whatever mesh trained it
    tx, _ = make_optimizer(config.train, experiment.model)
    graphdef, abstract = abstract_state(experiment, tx)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    checkpointer = _checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}: train first "
                                    f"(python -m grin_jax.train --workdir={workdir})")
        if step is None:  # the newest intact one (damaged ones are reported, left in place)
            say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
            step, state, _, damaged = checkpointer.restore_newest(target, log=say)
            if step is None:
                raise ValueError(f"no checkpoint in {checkpointer.directory} can be restored: "
                                 + "; ".join(reason for _, reason in damaged))
        elif step not in steps:
            raise ValueError(f"step={step} is invalid: {checkpointer.directory} holds steps {steps}")
        else:
            try:
                state, _ = checkpointer.restore(step, target)
            except _checkpoint.DamagedCheckpointError as error:
                raise ValueError(f"checkpoint {error}; intact steps are chosen by leaving the step out") from None
    finally:
        checkpointer.close()
    tokenizer = _data.make_tokenizer(config.data)
    variables = inference_variables(state)
    if with_step:
        return config, graphdef, variables, tokenizer, step
    return config, graphdef, variables, tokenizer
