"""The training loop: config -> model -> data -> jitted step -> checkpoints, metrics, plots, summary.

    python -m grin_jax.train --config=configs/grin_tiny.py --workdir=workdirs/grin_tiny

Workdir layout:
    checkpoints/<step>/   Orbax checkpoints (params, optimizer state, step, RNG; data iterator state as JSON)
    metrics.jsonl         one JSON record per logged step (train/*, eval/*)
    tb/                   TensorBoard event files
    config.json           the resolved experiment config
    loss.png, expert_load.png   plots written at the end
    summary.json          final losses, bits per byte, tokens seen, wall time, parameter counts (written atomically)
Restarting with the same workdir resumes from the latest checkpoint; the data order, the RNG and therefore the
losses continue exactly as in an uninterrupted run.

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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from grin_jax import data as _data
from grin_jax import models as _models
from grin_jax import sharding as _sharding
from grin_jax.train import checkpoint as _checkpoint
from grin_jax.train import config as _train_config
from grin_jax.train import metrics as _metrics
from grin_jax.train import optim as _optim
from grin_jax.train import plots as _plots


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
    model_config = _models.model_config_from(config.model)
    if config.data.seq_len > model_config.max_seq_len:
        raise ValueError(f"data.seq_len={config.data.seq_len} is invalid: accepted values are <= "
                         f"model.max_seq_len={model_config.max_seq_len}")
    _sharding.distributed_config_of(config)  # unknown keys
    if check_mesh:
        _sharding.validate(config)  # the mesh against the devices, the model and the batch
    return Experiment(config=config, model=model_config, name=config.get("name", "experiment"))


# ------------------------------------------------------------------------------------------------ the step
def make_loss_fn(graphdef):
    """(params, batch, rng) -> (cross-entropy + aux loss, (cross-entropy, aux)): the training objective."""

    def loss_fn(params, batch, rng):
        logits_BSV, aux = _models.apply(graphdef, params, batch["inputs"], training=True, rng=rng)
        ce = _models.cross_entropy(logits_BSV, batch["targets"], batch["loss_mask"])
        return ce + aux["aux_loss"], (ce, aux)

    return loss_fn


def make_train_step(graphdef, tx):
    """state, batch -> (state, metrics). The per-step key is fold_in(state['rng'], step): resumable."""
    loss_fn = make_loss_fn(graphdef)

    def train_step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        (total, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        metrics = {
            "loss": ce,
            "total_loss": total,
            "aux_loss": aux["aux_loss"],
            "grad_norm": _global_norm(grads),
            "load_balance_loss": jnp.mean(aux["load_balance_loss"]) if aux["load_balance_loss"].size else 0.0,
            "z_loss": jnp.mean(aux["z_loss"]) if aux["z_loss"].size else 0.0,
        }
        for key, value in aux["metrics"].items():
            metrics[f"moe/{key}"] = value  # per MoE layer: [L] or [L, E]
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    return train_step


def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _non_finite(what: str, checkpointer) -> NonFiniteLossError:
    checkpointer.wait()
    good = checkpointer.latest_step()
    return NonFiniteLossError(
        f"{what}; the run stopped and the last good checkpoint "
        f"({'step ' + str(good) if good is not None else 'none yet'}) in {checkpointer.directory} is kept. "
        "Try a lower train.learning_rate, a larger train.warmup_steps or train.clip_norm > 0.")


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_eval_step(graphdef):
    def eval_step(params, batch):
        logits_BSV, _ = _models.apply(graphdef, params, batch["inputs"], training=False)
        logp = jax.nn.log_softmax(logits_BSV, axis=-1)
        nll_BS = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        mask_BS = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(nll_BS * mask_BS), jnp.sum(mask_BS)
    return eval_step


def evaluate(eval_step, params, config, tokenizer, *, max_batches, mesh=None, data_index: int = 0,
             data_count: int = 1) -> dict:
    """Validation loss (nats per token) and bits per byte over `max_batches` global batches (None: the whole
    split). With a mesh, this process loads slice data_index of data_count of every global batch."""
    total_nll, total_tokens, total_bytes = 0.0, 0.0, 0
    global_size = config.train.batch_size
    for batch in _data.eval_batches(config.data, batch_size=global_size // data_count, tokenizer=tokenizer,
                                    max_batches=max_batches, process_index=data_index, process_count=data_count):
        host = _device_batch(batch)
        nll, tokens = eval_step(params, host if mesh is None else _sharding.global_batch(host, mesh, global_size))
        total_nll += float(nll)
        total_tokens += float(tokens)
        total_bytes += _data.batch_bytes(tokenizer, batch["targets"], batch["loss_mask"])
    if data_count > 1:  # bytes are counted on the host, per slice of the global batch: add the other slices'
        total_bytes = sum(dict(_allgather_json([data_index, total_bytes])).values())
    loss = total_nll / max(total_tokens, 1.0)
    return {"loss": loss, "bits_per_byte": _data.bits_per_byte(total_nll, max(total_bytes, 1)),
            "tokens": total_tokens}


def enable_compilation_cache(setting: str) -> None:
    """Turn on JAX's persistent compilation cache (see train.compilation_cache_dir)."""
    if setting == "none":
        return
    path = setting or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser("~/.cache/grin_jax/jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)


def batch_spec(batch_size: int, seq_len: int) -> dict:
    """Shapes and dtypes of a device batch (for ahead-of-time compilation)."""
    return {"inputs": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32),
            "targets": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32)}


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled executable as XLA counts them (0.0 when the backend does not say)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def paper_flops_per_token(model_config, counts: dict) -> float:
    """Krajewski et al.'s training FLOPs per token: c_f = 6 per active non-embedding parameter (router excluded)
    plus c_r = 14 per router parameter (REFERENCE §2); attention scores and the LM head are not counted."""
    router = counts.get("router", 0)
    return 6.0 * (counts["active_non_embedding"] - router) + 14.0 * router


def _device_batch(batch) -> dict:
    """The model's inputs from a host batch (this process's rows, numpy; see sharding.global_batch)."""
    return {k: np.asarray(batch[k]) for k in ("inputs", "targets", "loss_mask")}


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


# ------------------------------------------------------------------------------------------------ the loop
def abstract_state(experiment: Experiment, tx):
    """(graphdef, the train state as ShapeDtypeStructs): nothing allocated."""
    graphdef, params = _models.abstract_init(experiment.model)
    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
             "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(lambda: jax.random.key(0))}
    return graphdef, state


def init_state(experiment: Experiment, tx, mesh=None):
    """(graphdef, state). With a mesh of more than one device the state is created sharded: the initialiser is
    jitted with out_shardings (sharding.state_shardings), nothing is materialised whole on one device. Without
    one (or on one device) it runs eagerly as before: initialisers compiled once per shape and cached."""
    seed = experiment.config.train.seed

    def make(params):
        return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
                "rng": jax.random.key(seed + 1)}

    if mesh is None or mesh.size == 1:
        graphdef, params = _models.init(experiment.model, rng=jax.random.key(seed))
        state = make(params)
        if mesh is not None:
            state = jax.device_put(state, state_shardings(experiment, tx, mesh))
        return graphdef, state
    graphdef, _ = _models.abstract_init(experiment.model)
    init = jax.jit(lambda: make(_models.init(experiment.model, rng=jax.random.key(seed))[1]),
                   out_shardings=state_shardings(experiment, tx, mesh))
    return graphdef, init()


def state_shardings(experiment: Experiment, tx, mesh):
    """NamedShardings of the train state on `mesh` (parameters by logical names, optimizer state alike)."""
    return _sharding.state_shardings(abstract_state(experiment, tx)[1], mesh)


def compile_train_step(graphdef, tx, state, shardings, mesh, batch, *, compiler_options: dict | None = None):
    """The train step compiled ahead of time with explicit in/out shardings: the state as `shardings` (donated),
    the batch over the data axes, metrics replicated. Traced under jax.set_mesh(mesh), which is where the MoE block
    finds the mesh. `state` and `batch` may be abstract (ShapeDtypeStructs). compiler_options: XLA options for
    this compile (tests: {'xla_backend_optimization_level': 0} halves CPU compile time)."""
    with jax.set_mesh(mesh):
        return jax.jit(make_train_step(graphdef, tx), in_shardings=(shardings, _sharding.batch_sharding(mesh)),
                       out_shardings=(shardings, _sharding.replicated(mesh)),
                       donate_argnums=(0,)).lower(state, batch).compile(compiler_options)


def compile_eval_step(graphdef, params, param_shardings, mesh, batch, *, compiler_options: dict | None = None):
    """The eval step compiled ahead of time: params as `param_shardings`, the batch over the data axes."""
    with jax.set_mesh(mesh):
        return jax.jit(make_eval_step(graphdef), in_shardings=(param_shardings, _sharding.batch_sharding(mesh)),
                       out_shardings=_sharding.replicated(mesh)).lower(params, batch).compile(compiler_options)


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


def _param_counts(model_config) -> dict:
    from grin_jax import params as _params
    return dict(_params.count_params(model_config))


def _host_metrics(metrics) -> dict:
    """Scalars as floats; per-layer vectors summarised (mean over layers) plus the last layer's expert load."""
    out = {}
    for key, value in jax.device_get(metrics).items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[key] = float(value)
        elif key == "moe/expert_load":
            out[key] = value.tolist()
        elif value.ndim == 1:
            out[key] = float(value.mean()) if value.size else 0.0
    return out


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) the experiment in `workdir`; returns the summary written to summary.json."""
    experiment = resolve(config)
    tc = config.train
    primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if primary:
        _metrics.write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
    wall_start = time.time()
    mesh = _sharding.make_mesh(_sharding.mesh_config_of(config))
    data_index, data_count = _sharding.data_process_layout(mesh, tc.batch_size)

    tx, schedule = _optim.make_optimizer(
        learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
        weight_decay=tc.weight_decay, b1=tc.b1, b2=tc.b2, clip_norm=tc.clip_norm,
        final_lr_fraction=tc.final_lr_fraction)
    train_iter, tokenizer = _data.make_dataset(config.data, batch_size=tc.batch_size // data_count, seed=tc.seed,
                                               process_index=data_index, process_count=data_count)
    if tokenizer.vocab_size > experiment.model.vocab_size:
        raise ValueError(f"model.vocab_size={experiment.model.vocab_size} is invalid: the tokenizer has "
                         f"{tokenizer.vocab_size} ids; accepted values are >= {tokenizer.vocab_size}")
    graphdef, state = init_state(experiment, tx, mesh)
    shardings = state_shardings(experiment, tx, mesh)

    checkpointer = _checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tc.keep_checkpoints,
                                            async_save=tc.async_checkpoint)
    start_step, prior_wall = 0, 0.0
    latest = checkpointer.latest_step()
    if latest is not None:
        state, meta = checkpointer.restore(latest, _checkpoint.abstract_like(state))
        data_states = meta.get("data_states", [meta["data_state"]])
        if len(data_states) != data_count:
            raise ValueError(f"{checkpointer.directory}/{latest} was written with the batch loaded in "
                             f"{len(data_states)} slices, this run loads it in {data_count}: the data order cannot "
                             "be resumed exactly; resume with the same mesh and number of processes")
        train_iter.set_state(data_states[data_index])
        start_step, prior_wall = int(state["step"]), float(meta.get("wall_seconds", 0.0))
        print(f"resuming from {checkpointer.directory}/{latest} (step {start_step})", file=sys.stderr, flush=True)
    writer = _metrics.MetricWriter(workdir, resume_step=start_step) if primary else _NullWriter()

    tokens_per_step = tc.batch_size * config.data.seq_len
    enable_compilation_cache(tc.compilation_cache_dir)
    compile_start = time.perf_counter()
    spec = batch_spec(tc.batch_size, config.data.seq_len)
    train_step = compile_train_step(graphdef, tx, state, shardings, mesh, spec)
    compile_seconds = time.perf_counter() - compile_start
    eval_step = compile_eval_step(graphdef, state["params"], shardings["params"], mesh, spec)
    all_finite = jax.jit(_all_finite, out_shardings=_sharding.replicated(mesh))
    xla_flops_per_token = compiled_flops(train_step) / tokens_per_step
    eval_max = tc.eval_batches or None
    eval_kw = dict(max_batches=eval_max, mesh=mesh, data_index=data_index, data_count=data_count)

    def save(step):
        data_state = train_iter.get_state()
        meta = {"data_state": data_state, "config_name": experiment.name,
                "wall_seconds": prior_wall + time.time() - wall_start}
        if jax.process_count() > 1:  # every data slice's iterator state (processes of one slice agree)
            by_slice = dict((i, st) for i, st in _allgather_json([data_index, data_state]))
            meta["data_states"] = [by_slice[i] for i in range(data_count)]
        checkpointer.save(step, state, meta)

    bar = None
    if tc.progress and start_step < tc.steps:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   desc=experiment.name)
    last_train, last_eval = {}, {}
    step = start_step
    step_times = []
    try:
        while step < tc.steps:
            batch = next(train_iter)
            t0 = time.perf_counter()
            state, metrics = train_step(state, _sharding.global_batch(_device_batch(batch), mesh, tc.batch_size))
            loss = float(metrics["loss"])
            step_times.append(time.perf_counter() - t0)
            step += 1
            if not all(math.isfinite(float(metrics[k])) for k in ("loss", "total_loss", "grad_norm")):
                raise _non_finite(f"non-finite training loss or gradient (loss {loss}) at step {step}",
                                  checkpointer)
            if step % tc.log_every == 0 or step == tc.steps:
                last_train = _host_metrics(metrics)
                last_train["learning_rate"] = float(schedule(step - 1))
                last_train["tokens_per_second"] = tokens_per_step / float(np.median(step_times[-tc.log_every:]))
                last_train["tokens"] = step * tokens_per_step
                writer.write(step, last_train, prefix="train/")
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                last_eval = evaluate(eval_step, state["params"], config, tokenizer, **eval_kw)
                writer.write(step, last_eval, prefix="eval/")
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == tc.steps:
                if not bool(all_finite(state["params"])):
                    raise _non_finite(f"non-finite parameters after step {step}", checkpointer)
                save(step)
            if bar is not None:
                postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_step / step_times[-1]:.0f}"}
                if last_eval:
                    postfix["val"] = f"{last_eval['loss']:.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        checkpointer.close()
        writer.close()

    if not last_eval:  # resumed after the final step: evaluate once more for the summary
        last_eval = evaluate(eval_step, state["params"], config, tokenizer, **eval_kw)
    records = _metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if primary else writer.records
    train_losses = [r["train/loss"] for r in records if r.get("train/loss") is not None]
    tail = train_losses[-max(1, len(train_losses) // 10):]
    load_LE = next((r["train/moe/expert_load"] for r in reversed(records) if r.get("train/moe/expert_load")), None)
    plots = _plots.write_plots(workdir, records, load_LE, title=experiment.name) if primary else []
    counts = _param_counts(experiment.model)
    summary = {
        "config_name": experiment.name,
        "steps": int(step),
        "tokens_seen": int(step * tokens_per_step),
        "final_train_loss": train_losses[-1] if train_losses else None,
        "smoothed_train_loss": float(np.mean(tail)) if tail else None,
        "validation_loss": last_eval["loss"],
        "validation_bits_per_byte": last_eval["bits_per_byte"],
        "wall_seconds": prior_wall + time.time() - wall_start,
        "params": counts,
        "plots": [os.path.basename(p) for p in plots],
        "compile_seconds": compile_seconds,
        "tokens_per_second": float(tokens_per_step / np.median(step_times)) if step_times else None,
        "xla_flops_per_token": xla_flops_per_token,
        "paper_flops_per_token": paper_flops_per_token(experiment.model, counts) if counts else None,
        # The scaling-law columns (python -m grin_jax.scaling.fit reads N, D, G, loss):
        # N as in Krajewski et al.: non-embedding parameters without routers and norms (d²(8E+4) per block).
        "N": counts["non_embedding"] - counts.get("router", 0) - counts.get("norms", 0),
        "D": int(step * tokens_per_step),
        "G": int(config.model.get("granularity", 1) or 1),
        "loss": float(np.mean(tail)) if tail else None,
        "flops": (paper_flops_per_token(experiment.model, counts) * step * tokens_per_step) if counts else None,
    }
    if primary:
        _metrics.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    return summary


# ------------------------------------------------------------------------------------------------ reloading
def load_trained(workdir: str, step: int | None = None):
    """(config, graphdef, params, tokenizer) of a run's checkpoint (default: the latest)."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    experiment = resolve(config, check_mesh=False)  # restored onto one device, whatever mesh trained it
    tc = config.train
    tx, _ = _optim.make_optimizer(
        learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
        weight_decay=tc.weight_decay, b1=tc.b1, b2=tc.b2, clip_norm=tc.clip_norm,
        final_lr_fraction=tc.final_lr_fraction)
    graphdef, abstract = abstract_state(experiment, tx)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    checkpointer = _checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}: train first "
                                    f"(python -m grin_jax.train --workdir={workdir})")
        state, _ = checkpointer.restore(step, target)
    finally:
        checkpointer.close()
    tokenizer = _data.make_tokenizer(config.data)
    return config, graphdef, state["params"], tokenizer
