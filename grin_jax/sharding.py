"""Meshes, logical axis rules, shardings of the train state and the batch, multi-process set-up.

The mesh has four axes, ('data', 'fsdp', 'expert', 'model'), built from the config section `mesh`:

    config.mesh.data = -1     # data parallelism (-1: whatever the other axes leave of the devices)
    config.mesh.fsdp = 1      # fully sharded data parallelism: tokens sharded over it, and the parameters and
                              # optimizer state sharded along their model dimension D (gathered per layer)
    config.mesh.expert = 1    # expert parallelism: experts E sharded; tokens are sharded over it too
    config.mesh.model = 1     # tensor parallelism: heads, expert/FFN width F, vocabulary sharded

Every parameter carries logical axis names (nn/ sets them in `nnx.Param(..., out_sharding=names)`);
`LOGICAL_AXIS_RULES` maps each name to mesh axes:

    batch    -> ('data', 'fsdp', 'expert')   tokens are sharded over all three (GShard / MaxText: the expert
                                     axis is a data axis for everything outside the MoE layer)
    vocab    -> 'model'              (when the vocabulary size is divisible by it; else replicated)
    heads    -> 'model'              (must divide: checked by `validate`)
    kv_heads -> 'model'              (when divisible; GQA with fewer KV heads than model shards replicates K, V)
    mlp      -> 'model'              (expert width and dense FFN width; must divide)
    experts  -> 'expert'             (must divide)
    peer_experts -> 'expert'         (rows of PEER's expert tables; when divisible)
    embed    -> 'fsdp'               (the model dimension D of every weight, the optimizer state alike)
    kv, length -> None               (replicated)

A dimension whose size is not divisible by its mesh axes is left replicated (vocab 259 of the byte tokenizer,
2 KV heads on 8 model shards); the dimensions where that would silently waste the parallelism (heads,
experts, expert width, d_model over fsdp, batch) are rejected by `validate` before anything compiles.

FSDP (ZeRO-3): with mesh.fsdp > 1 every parameter with an 'embed' dimension, and the optimizer state that mirrors
it, is stored 1/fsdp per device; the batch is split over the fsdp axis too. Nothing in the model names the axis:
under jit, XLA's partitioner all-gathers each weight where a layer uses it (the MoE layer's shard_map takes its
expert weights whole along D, so they are gathered at its boundary) and reduce-scatters the gradients. With
scanned layers (model.scan_layers) that gather happens inside the loop, one layer group at a time.

Axis types: the mesh uses **Auto** axes (classic `jax.jit` sharding propagation), not the Explicit axes that
`jax.make_mesh` defaults to. The train / eval steps are jitted with explicit in/out shardings for the state and
the batch, and XLA's partitioner decides the layout of every intermediate of the NNX model; the only hand-written
layout is the MoE layer, which is one `jax.shard_map` (moe/parallel.py) and works under both axis types. Explicit
axes would make every einsum of the model (attention over sharded heads, the LM head over a sharded vocabulary,
norms over replicated embed) a typing decision to annotate with `out_sharding` and would reject the uneven
fall-backs above; Auto gives the same numbers with no model code changes. Switch to Explicit only together with
sharding-typed model code.

The mesh reaches the model through the context: the trainer traces its steps under `jax.set_mesh(mesh)` and the
MoE FFN kind (grin_jax/ffn/moe.py) reads `jax.sharding.get_abstract_mesh()`; on a mesh with more than one device it calls
`moe_layer_parallel` (one shard_map), otherwise the single-device `moe_layer`.

Multi-process: `initialize_distributed(config.distributed)` must run before anything touches the devices (the
train entry point calls it first). `data_process_layout` says which slice of the global batch this process loads;
`global_batch` assembles the global jax.Array with `jax.make_array_from_process_local_data`. The model's numbers do
not depend on the mesh or the number of processes; the data order does (the data pipeline gives each process a
disjoint share of the documents), so compare runs with different numbers of processes on the same global batches.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grin_jax.moe import parallel as _parallel

MESH_AXES = ("data", "fsdp", "expert", "model")
BATCH_AXES = _parallel.BATCH_AXIS_NAMES  # ('data', 'fsdp', 'expert'): the axes the tokens are sharded over

# Logical axis name -> mesh axis (str), axes (tuple) or None (replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("experts", "expert"),
    ("peer_experts", "expert"),   # rows of PEER's [N, D] expert tables
)


# ------------------------------------------------------------------------------------------------ config
def default_mesh_config() -> ml_collections.ConfigDict:
    """The `mesh` config section: sizes of the ('data', 'fsdp', 'expert', 'model') axes; one of them may be -1
    (the rest of the devices). Default: pure data parallelism over all devices."""
    c = ml_collections.ConfigDict()
    c.data = -1
    c.fsdp = 1
    c.expert = 1
    c.model = 1
    return c


def default_distributed_config() -> ml_collections.ConfigDict:
    """The `distributed` config section (multi-process runs; `initialize_distributed`).

    coordinator_address '' and num_processes 0: single process, unless the environment is a cluster JAX detects
    (SLURM with more than one task, Open MPI, Cloud TPU pods) or sets JAX_COORDINATOR_ADDRESS: then
    jax.distributed.initialize() fills in what is not given. process_id -1: detected. local_device_ids '':
    all (or what JAX picks for the launcher), else e.g. '0,1'. cpu_collectives: the cross-process collectives of
    CPU devices ('gloo'; 'mpi' needs an MPI install). enabled: 'auto' (as described), 'yes' (always call
    jax.distributed.initialize), 'no' (never). Timeouts (seconds): initialization_timeout, how long processes wait
    for each other at start-up; heartbeat_timeout, after how long without a heartbeat a dead or frozen peer fails
    every process (JAX's coordination service); shutdown_timeout, how long a process that ends waits for the
    others at exit (a failed peer otherwise holds the rest for JAX's default of 5 minutes; trainer.train first
    waits for every process at a collective, so a slow process 0 writing its summary does not hit it)."""
    c = ml_collections.ConfigDict()
    c.enabled = "auto"
    c.coordinator_address = ""
    c.num_processes = 0
    c.process_id = -1
    c.local_device_ids = ""
    c.cpu_collectives = "gloo"
    c.initialization_timeout = 300
    c.heartbeat_timeout = 30
    c.shutdown_timeout = 30
    return c


def _section(config, name: str, default_fn) -> ml_collections.ConfigDict:
    """config.<name> merged over its defaults (old configs without the section get the defaults)."""
    merged = default_fn()
    given = config.get(name) if hasattr(config, "get") else None
    if given is not None:
        for key in given.keys() if hasattr(given, "keys") else ():
            if key not in merged:
                raise ValueError(f"{name}.{key} is unknown: accepted keys are {sorted(merged.keys())}")
            merged[key] = given[key]
    return merged


def mesh_config_of(config) -> ml_collections.ConfigDict:
    return _section(config, "mesh", default_mesh_config)


def distributed_config_of(config) -> ml_collections.ConfigDict:
    """The `distributed` section merged over its defaults, its keys and values checked (ValueError naming them)."""
    c = _section(config, "distributed", default_distributed_config)
    if c.enabled not in ("auto", "yes", "no"):
        raise ValueError(f"distributed.enabled={c.enabled!r} is invalid: accepted values are 'auto', 'yes', 'no'")
    if c.cpu_collectives not in ("gloo", "mpi"):
        raise ValueError(f"distributed.cpu_collectives={c.cpu_collectives!r} is invalid: accepted values are "
                         "'gloo', 'mpi'")
    for key in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
        value = c[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 86400:
            raise ValueError(f"distributed.{key}={value!r} is invalid: accepted values are seconds in [1, 86400]")
    return c


def resolve_mesh_shape(mesh_config, num_devices: int, *, process_count: int = 1) -> tuple[int, ...]:
    """The mesh sizes in MESH_AXES order, (data, fsdp, expert, model); raises ValueError naming `mesh.<axis>` and
    its value.

    At most one axis may be -1 (filled with the rest of the devices). A mesh with fewer devices than there are
    is allowed in a single process (it uses the first ones, e.g. `mesh.data=1` for a one-device smoke run on a
    host with 8 devices); in a multi-process run it must use every device. An axis the section does not name
    has size 1."""
    sizes = {}
    for axis in MESH_AXES:
        value = mesh_config.get(axis, 1)
        if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
            raise ValueError(f"mesh.{axis}={value!r} is invalid: accepted values are integers >= 1, or -1 for "
                             "the rest of the devices")
        sizes[axis] = value
    fill = [a for a in MESH_AXES if sizes[a] == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh.{fill[1]}=-1 is invalid: only one of {' / '.join(f'mesh.{a}' for a in MESH_AXES)} "
                         f"may be -1 (got {', '.join(f'mesh.{a}=-1' for a in fill)})")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        axis = fill[0]
        if num_devices % fixed:
            others = " x ".join(f"mesh.{a}={sizes[a]}" for a in MESH_AXES if a != axis)
            raise ValueError(f"mesh.{axis}=-1 cannot be filled: {others} = {fixed} does not divide the "
                             f"{num_devices} devices; accepted: sizes whose product divides {num_devices}")
        sizes[axis] = num_devices // fixed
    total = math.prod(sizes.values())
    shape = " x ".join(f"mesh.{a}={sizes[a]}" for a in MESH_AXES)
    if total > num_devices:
        raise ValueError(f"the mesh {shape} = {total} devices is larger than the {num_devices} devices there are; "
                         f"accepted: a product of at most {num_devices}")
    if process_count > 1 and total != num_devices:
        raise ValueError(f"the mesh {shape} = {total} devices does not match the {num_devices} devices of the "
                         f"{process_count} processes: a multi-process mesh must use every device")
    return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_config=None, *, devices=None) -> jax.sharding.Mesh:
    """The ('data', 'fsdp', 'expert', 'model') mesh with Auto axes (module docstring) from a `mesh` config section
    (a mapping; missing axes have size 1). devices: default jax.devices(); AbstractMesh planning passes fakes."""
    mesh_config = default_mesh_config() if mesh_config is None else mesh_config
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_config, len(devices), process_count=jax.process_count())
    used = math.prod(shape)
    if used < len(devices):
        print(f"mesh {MESH_AXES} = {shape} uses {used} of the {len(devices)} devices", file=sys.stderr)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices[:used])


def mesh_sizes(mesh) -> dict:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def validate(config, *, num_devices: int | None = None, process_count: int | None = None,
             platform: str | None = None) -> tuple[int, int, int]:
    """Check the mesh against the model and the batch before anything compiles; returns the mesh sizes
    {'data', 'fsdp', 'expert', 'model'}.

    Raises ValueError naming the key and the value: mesh sizes (see resolve_mesh_shape), model.num_heads vs
    mesh.model, model.d_model vs mesh.fsdp, each FFN section against the mesh (its kind's `check_mesh`: e.g.
    moe.num_experts vs mesh.expert), train.batch_size vs the data shards (mesh.data x mesh.fsdp x mesh.expert)
    and the processes."""
    from grin_jax.models.config import model_config_from  # models imports nn imports moe; keep this module light

    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    platform = jax.default_backend() if platform is None else platform
    sizes = dict(zip(MESH_AXES, resolve_mesh_shape(mesh_config_of(config), num_devices,
                                                    process_count=process_count)))
    model = sizes["model"]
    m = model_config_from(config.model)
    shards = math.prod(sizes[a] for a in BATCH_AXES)
    if m.d_model % sizes["fsdp"]:
        raise ValueError(f"model.d_model={m.d_model} is not divisible by mesh.fsdp={sizes['fsdp']}: the parameters "
                         f"are sharded along d_model over the fsdp axis; accepted values of mesh.fsdp divide "
                         f"{m.d_model}")
    if m.num_heads % model:
        raise ValueError(f"model.num_heads={m.num_heads} is not divisible by mesh.model={model}: attention heads are "
                         f"sharded over the model axis; accepted values of mesh.model divide {m.num_heads}")
    from grin_jax import ffn as _ffn
    for name in dict.fromkeys(m.layout):
        _ffn.get_ffn(m.kind_of(name)).check_mesh(m.section(name), {**sizes, "platform": platform})
    batch_size = config.train.batch_size
    from grin_jax.train.config import grad_accum_steps  # the train package imports this module
    accum = grad_accum_steps(config.train)
    if accum > 1 and batch_size % (accum * shards):
        layout = " x ".join(f"mesh.{a}={sizes[a]}" for a in BATCH_AXES)
        raise ValueError(f"train.batch_size={batch_size} is not divisible by train.grad_accum_steps={accum} x the "
                         f"{shards} data shards ({layout}): each micro-batch is split over the data shards; "
                         f"accepted values are multiples of {accum * shards}")
    if batch_size % shards:
        layout = " x ".join(f"mesh.{a}={sizes[a]}" for a in BATCH_AXES)
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the {shards} data shards "
                         f"({layout}): accepted values are multiples of {shards}")
    if batch_size % process_count:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the {process_count} processes: "
                         f"train.batch_size is global; accepted values are multiples of {process_count}")
    return sizes


# ------------------------------------------------------------------------------------------------ rules
def logical_to_spec(names, shape, mesh, rules=LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec of an array with logical axis `names` and `shape` on `mesh`. A dimension not divisible by
    its mesh axes, or whose mesh axis an earlier dimension already uses, stays replicated; axes of size 1 are left
    out of the spec (P('expert', 'model') rather than P('expert', 'model', 'fsdp') when mesh.fsdp = 1)."""
    table = dict(rules)
    sizes = mesh_sizes(mesh)
    used, spec = set(), []
    for name, dim in zip(names, shape):
        target = table.get(name) if name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if sizes.get(a, 1) > 1)  # an axis of size 1 shards nothing: left out
        if not axes or used & set(axes) or dim % math.prod(sizes[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def fsdp_gathered(x, names):
    """A weight with logical axis `names`, constrained (inside jit, under the mesh in context) to its layout without
    the fsdp split: the explicit all-gather of FSDP where XLA would otherwise pick a worse layout (the embedding
    lookup: a table split along D gives rows split along D, which the partitioner can only bring to the batch
    layout by replicating them). Unchanged without a mesh or with mesh.fsdp = 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh_sizes(mesh).get("fsdp", 1) == 1:
        return x
    rules = tuple((name, None if name == "embed" else target) for name, target in LOGICAL_AXIS_RULES)
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def _is_variable(x) -> bool:
    from flax import nnx
    return isinstance(x, nnx.Variable)


def _names(variable):
    return variable.get_metadata().get("out_sharding")


def partition_specs(tree, mesh, rules=LOGICAL_AXIS_RULES):
    """PartitionSpecs for a pytree holding nnx.Variables (params, or optax states that mirror them) and plain
    arrays. Variables with logical names get `logical_to_spec`; everything else (step counters, keys) P()."""

    def spec(x):
        if _is_variable(x):
            names = _names(x)
            return x.replace(P() if names is None else logical_to_spec(names, x.get_value().shape, mesh, rules))
        return P()

    return jax.tree.map(spec, tree, is_leaf=_is_variable)


def named_shardings(tree, mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings with the layout of `partition_specs` (use as jit in/out_shardings, device_put targets)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), partition_specs(tree, mesh, rules),
                        is_leaf=lambda s: isinstance(s, P))


def state_shardings(abstract_state, mesh, rules=LOGICAL_AXIS_RULES):
    """Shardings of a train state {'params', 'opt_state', 'step', 'rng'} (+ 'model_state', running statistics:
    nnx.BatchStat with logical names, laid out alike): parameters by their logical names, the optimizer state the
    same (optax's mu / nu are copies of the params tree, nnx.Param metadata included), scalars (Adam's count, the
    step, the key) replicated."""
    return named_shardings(abstract_state, mesh, rules)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
    """[B, ...] arrays: B over the data axes ('data', 'fsdp', 'expert'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying `shardings` (an Orbax restore target on any mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


# ------------------------------------------------------------------------------------------------ processes
def data_process_layout(mesh, global_batch: int) -> tuple[int, int]:
    """(index, count): this process loads slice `index` of `count` equal slices of the global batch.

    count is the number of distinct batch slices the processes hold: process_count for data parallelism across
    hosts, fewer when processes share batch rows (e.g. a model axis spanning hosts: those processes load the same
    rows). Raises ValueError if a process's devices hold a non-contiguous part of the batch."""
    sharding = batch_sharding(mesh)
    ranges: dict[int, set] = {}
    for device, index in sharding.devices_indices_map((global_batch,)).items():
        rows = index[0]
        start, stop, _ = rows.indices(global_batch)
        ranges.setdefault(device.process_index, set()).add((start, stop))
    spans = {}
    for process, parts in ranges.items():
        (start, stop), *rest = sorted(parts)
        for a, b in rest:
            if a > stop:
                raise ValueError(f"process {process} holds non-contiguous batch rows {sorted(parts)}: order the "
                                 "mesh devices so that each process's devices hold one block of the batch")
            stop = max(stop, b)
        spans[process] = (start, stop)
    distinct = sorted(set(spans.values()))
    sizes = {stop - start for start, stop in distinct}
    if len(sizes) != 1 or distinct[0][0] != 0 or distinct[-1][1] != global_batch or any(
            a[1] != b[0] for a, b in zip(distinct, distinct[1:])):
        raise ValueError(f"the processes' batch slices {distinct} do not tile the global batch of {global_batch}")
    return distinct.index(spans[jax.process_index()]), len(distinct)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh, global_size: int) -> dict:
    """The global jax.Arrays of a batch from this process's rows ([local B, ...] each), sharded over the data axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_size,) + np.shape(v)[1:])
            for k, v in local_batch.items()}


# ------------------------------------------------------------------------------------------------ distributed
_CLUSTER_ENV = (
    ("SLURM_NTASKS", lambda v: v.isdigit() and int(v) > 1),           # srun with more than one task
    ("OMPI_COMM_WORLD_SIZE", lambda v: v.isdigit() and int(v) > 1),   # mpirun
    ("TPU_WORKER_HOSTNAMES", lambda v: "," in v),                     # Cloud TPU pod slice (several hosts)
    ("MEGASCALE_COORDINATOR_ADDRESS", bool),                          # multi-slice TPU
    ("JAX_COORDINATOR_ADDRESS", bool),                                # set by hand / a launcher
)


def detected_cluster(environ=None) -> str | None:
    """The environment variable that marks a multi-process launch JAX can auto-configure, or None."""
    environ = os.environ if environ is None else environ
    for name, test in _CLUSTER_ENV:
        value = environ.get(name, "")
        if value and test(value):
            return name
    return None


def initialize_distributed(config=None, *, environ=None) -> bool:
    """`jax.distributed.initialize` from the experiment config's `distributed` section or the environment; call it
    before anything touches the devices. Returns whether it initialised (False: a single-process run).

    enabled='auto': initialise when coordinator_address / num_processes are given, or `detected_cluster()` finds
    a cluster launch (SLURM srun with several tasks, Open MPI, a Cloud TPU pod, JAX_COORDINATOR_ADDRESS); JAX
    detects what is not given. 'yes': always; 'no': never."""
    c = distributed_config_of(config) if config is not None else default_distributed_config()
    explicit = bool(c.coordinator_address) or c.num_processes > 0
    if c.enabled == "no" or (c.enabled == "auto" and not explicit and detected_cluster(environ) is None):
        return False
    jax.config.update("jax_cpu_collectives_implementation", c.cpu_collectives)
    kwargs = {"initialization_timeout": int(c.initialization_timeout),
              "heartbeat_timeout_seconds": int(c.heartbeat_timeout),
              "shutdown_timeout_seconds": int(c.shutdown_timeout)}
    if c.coordinator_address:
        kwargs["coordinator_address"] = c.coordinator_address
    if c.num_processes > 0:
        kwargs["num_processes"] = int(c.num_processes)
    if c.process_id >= 0:
        kwargs["process_id"] = int(c.process_id)
    if c.local_device_ids:
        kwargs["local_device_ids"] = [int(i) for i in str(c.local_device_ids).split(",")]
    jax.distributed.initialize(**kwargs)
    return True
