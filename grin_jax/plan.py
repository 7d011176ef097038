"""Plan a training run on a mesh of N devices from this machine, allocating nothing: per-device memory, FLOPs and
collectives of the compiled train step for one or more mesh layouts.

    python -m grin_jax.plan --config=configs/grin_moe_16x3_8b.py:mixed --config.model.scan_layers=True \\
        --config.model.remat=full --devices=64 --seq_len=4096 --batch_size=1024 \\
        --mesh='fsdp=64;fsdp=16,expert=4;fsdp=8,model=8' --out=experiments/plan/grin_64.md

How: N fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set by `main` before JAX starts its
backend), the train state as ShapeDtypeStructs (trainer.abstract_state), its shardings on each mesh
(sharding.state_shardings), and the train step lowered and compiled ahead of time for an abstract batch
(step.compile_train_step): the SPMD partitioner produces the per-device program a real run would get, and nothing
is allocated. For every layout it reports, per device:

  params, opt state   EXACT: sum over the state's arrays of prod(NamedSharding.shard_shape(global shape)) x
                      itemsize (an array whose dimension is not divisible by its mesh axes is replicated,
                      as sharding.logical_to_spec does).
  argument, output,   XLA's `compiled.memory_analysis()` of the partitioned program: argument = the state shard
  temp, alias         + the batch shard, output = the new state + metrics, alias = the donated state (outputs
                      that reuse argument buffers), temp = activations, gradients, gathered weights and every
                      other temporary, as XLA:CPU's buffer assignment lays them out.
  peak                argument + output + temp - alias (the live set at the program's worst point: the state,
                      its update, and the temporaries; donated outputs counted once).
  fits <HBM>          'yes' when peak <= 90 % of the HBM size (GiB), 'tight' when <= 100 %, else 'no'. The
                      runtime needs some of the HBM itself (CUDA context, XLA's allocator; JAX preallocates 75 %
                      of a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised).
  FLOPs (XLA)         step.compiled_flops: XLA's cost analysis of the per-device program. XLA counts the body of
                      a while loop ONCE, so with model.scan_layers (a lax.scan over the layers) or MoE backends
                      that loop over tiles it undercounts by about the trip count.
  FLOPs (dots)        this module's count from the optimized HLO: 2 x prod(result) x prod(contracted dims) of
                      every `dot`, times the trip count of the while loops around it (XLA's known_trip_count),
                      so scanned layers are counted num_layers times. Matmuls only (no elementwise ops); work
                      inside custom calls (the CPU MoE kernel) is not visible and is listed.
  6·N·T               the model-FLOPs reference: 6 x active parameters (grin_jax.params) x tokens per step / N
                      devices. The dot count exceeds it by attention scores (not in N), remat's recomputed
                      forward (remat='full': ~8·N·T instead of 6), gradient accumulation's extra forward pass
                      for the whole batch's load-balance statistics (MoE models), MoE padding / routed-elsewhere
                      rows that a static-shape backend computes, and work repeated on the model axis (e.g. the
                      router); it falls short of it by the tile loops it counts once (below).
  collectives         all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute in the optimized
                      HLO: ops executed per step (loop bodies times their trip count), their operand bytes per
                      device (JSON 'bytes') and the bytes each device sends by the bandwidth-optimal ring
                      algorithms (JSON 'traffic', the table): all-gather (g-1) x its shard, reduce-scatter
                      (g-1)/g x its input, all-reduce 2 (g-1)/g x its input, for groups of g devices. Ops over
                      groups of one device (no-ops the partitioner leaves behind) are not counted.
  compile s           wall seconds to trace, lower and compile the layout here.

What the CPU-compiled numbers mean. The partitioning (which arrays are sharded, which collectives run, per-device
shapes) is the same as on GPU / TPU: it is decided by the SPMD partitioner from the shardings, before the backend.
The parameter and optimizer-state bytes are exact. Everything after partitioning is XLA:CPU's: its fusion, buffer
assignment, scheduling and layout differ from the GPU and TPU compilers (which fuse more aggressively, schedule for
memory, overlap collectives asynchronously and combine or decompose them differently: XLA:CPU leaves many
gradient reductions as all-reduce + slice where the GPU / TPU pipelines form a reduce-scatter, which moves half the
data), so temp and peak are an estimate of the activation memory, not a measurement; the collective kinds and
counts are those of the CPU program (their operand bytes are the partitioner's); and the MoE layer runs the CPU
backend that model.moe.backend='auto' picks here ('kernel' for float32, else 'tiled'; not the accelerators'
'ragged_dot', which XLA:CPU would lower to an E x dense masked matmul): pass --config.model.moe.backend=... to
compare. What is decided in JAX before XLA (which values the backward pass keeps, what the scan over layers
carries, the naive attention's [B, H, S, S] scores) is the same on every backend. FLOPs are counts of the program,
not measurements; the 'tiled' backend's tile loops have data-dependent trip counts, so the dot count sees one tile
per expert and tile level of each MoE layer: about right when an expert gets about one tile of rows, an undercount
when it gets many (expert parallelism gathers several shards' tokens per expert).

Flags: --config (a config file, with --config.a.b=value overrides; a config without data / train sections, like
configs/grin_moe_16x3_8b.py, gets their defaults, and model keys it does not name (scan_layers, remat) their
ModelConfig defaults, so they can be overridden), --devices=N, --mesh (repeatable, or ';'-separated layouts, each
'axis=size,...' over data, fsdp, expert, model: missing axes are 1 except data, which is -1 (the rest of the
devices) unless given; no --mesh: the config's mesh section), --batch_size (global sequences per optimizer step;
default train.batch_size), --seq_len (default data.seq_len), --grad_accum_steps (micro-batches per step; default
train.grad_accum_steps, else 1), --per_shard_batch=K (micro-batches of K sequences per data shard on every layout:
with --batch_size each layout accumulates batch_size / (K x its data shards) of them, else --grad_accum_steps),
--hbm (GB sizes to judge fit, default 80,95), --out (writes the table as markdown and the rows as JSON next to it,
atomically), --hlo_dir (also writes each layout's optimized HLO text), --fast_compile (XLA:CPU backend
optimisation level 0: the partitioned HLO, buffer sizes, FLOPs and collectives are unchanged, LLVM does less;
2-3x faster compiles).

The JSON rows also hold: the largest buffers the top-level computation creates (what fills temp outside the layer
loop, e.g. values saved for the backward pass of every layer), the number of the SPMD partitioner's "involuntary
full rematerialization" warnings (a value it could only reshard by replicating it), the while loops and those
with data-dependent trip counts, and custom-call targets.

User errors (a bad layout, a batch the data shards do not divide, a config key) print one line naming the flag or
key and exit with status 2 (grin_jax.cli).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import re
import sys
import time

MESH_AXES = ("data", "fsdp", "expert", "model")  # = sharding.MESH_AXES (not imported: keeps jax unimported here)
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
COLLECTIVE_ABBREV = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
                     "collective-permute": "CP"}
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
KNOWN_HBM = {16: "TPU v5e 16 GB", 32: "TPU v4 32 GB", 40: "A100 40 GB", 80: "H100 80 GB", 95: "TPU v5p 95 GB",
             141: "H200 141 GB", 192: "B200 192 GB"}
DEFAULT_HBM = "80,95"
FIT_MARGIN = 0.9  # 'yes' up to this fraction of the HBM, 'tight' up to all of it
GIB = 2 ** 30


# ------------------------------------------------------------------------------------------------ devices
def _backends_initialised() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()


def configure_fake_devices(num_devices: int) -> bool:
    """Ask for `num_devices` fake CPU devices, if JAX's backend has not started yet: XLA_FLAGS gets
    --xla_force_host_platform_device_count=N (appended to the flags there are, replacing a count already there)
    and the platform is CPU. Returns False (and changes nothing) when the backend is already running; then
    `planning_devices` uses the devices it has."""
    if _backends_initialised():
        return False
    flags = re.sub(re.escape(DEVICE_COUNT_FLAG) + r"(=\S*)?", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = " ".join(flags.split() + [f"{DEVICE_COUNT_FLAG}={num_devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported (JAX_PLATFORMS already read) but no backend yet
        sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True


def planning_devices(num_devices: int) -> list:
    """The first `num_devices` of JAX's devices; ValueError when there are fewer (JAX started before `main` could
    ask for more, e.g. in a test process with 8 fake devices)."""
    import jax
    devices = jax.devices()
    if num_devices > len(devices):
        raise ValueError(f"--devices={num_devices} is more than the {len(devices)} {jax.default_backend()} devices "
                         f"this process has (JAX started before {DEVICE_COUNT_FLAG} could be set): run "
                         f"`python -m grin_jax.plan --devices={num_devices}` in a fresh process, or ask for at most "
                         f"{len(devices)}")
    return devices[:num_devices]


# ------------------------------------------------------------------------------------------------ parsing
def parse_layouts(values) -> list[tuple[str, dict]]:
    """--mesh values (each one layout or several ';'-separated) -> [(text, {axis: size})]. Axes not named: 1,
    except data: -1 (the rest of the devices), as in sharding.default_mesh_config."""
    layouts = []
    for value in values:
        for text in str(value).split(";"):
            text = text.strip()
            if not text:
                continue
            sizes = {"data": -1, "fsdp": 1, "expert": 1, "model": 1}
            seen = set()
            for part in text.split(","):
                key, eq, number = (s.strip() for s in part.partition("="))
                if not eq:
                    raise ValueError(f"--mesh {text!r}: {part.strip()!r} is not axis=size; accepted: e.g. "
                                     "'fsdp=16,expert=4,model=2' (axes data, fsdp, expert, model)")
                if key not in sizes:
                    raise ValueError(f"--mesh {text!r}: unknown axis {key!r}; accepted axes are "
                                     f"{', '.join(MESH_AXES)}")
                if key in seen:
                    raise ValueError(f"--mesh {text!r}: axis {key!r} is given twice")
                seen.add(key)
                try:
                    size = int(number)
                except ValueError:
                    raise ValueError(f"--mesh {text!r}: {key}={number!r} is not an integer; accepted: sizes >= 1, "
                                     "or -1 for the rest of the devices") from None
                sizes[key] = size
            layouts.append((text, sizes))
    return layouts


def parse_hbm(text: str) -> list[tuple[float, str]]:
    """'80,95' -> [(80.0, 'H100 80 GB'), (95.0, 'TPU v5p 95 GB')] (sizes in GB = GiB, as HBM is sold)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            size = float(part)
        except ValueError:
            raise ValueError(f"--hbm={text!r}: {part!r} is not a number; accepted: a comma list of device memory "
                             "sizes in GB, e.g. 80,95") from None
        if not size > 0:
            raise ValueError(f"--hbm={text!r}: {part!r} is invalid; accepted: sizes > 0")
        label = KNOWN_HBM.get(int(size), f"{part} GB") if size == int(size) else f"{part} GB"
        out.append((size, label))
    if not out:
        raise ValueError(f"--hbm={text!r} names no size; accepted: e.g. 80,95")
    return out


def complete_config(config):
    """Fill in what a model-only config file (configs/grin_moe_16x3_8b.py) leaves out, in place: the data, train,
    mesh and distributed sections (missing keys at their defaults) and the ModelConfig fields with a non-None
    default that config.model does not name (scan_layers, remat, ...), so that --config.* can override them."""
    from grin_jax.data import default_data_config
    from grin_jax.models.config import ModelConfig
    from grin_jax.sharding import default_distributed_config, default_mesh_config
    from grin_jax.train.config import default_train_config

    for name, default in (("data", default_data_config), ("train", default_train_config),
                          ("mesh", default_mesh_config), ("distributed", default_distributed_config)):
        if name not in config:
            config[name] = default()
        elif name in ("data", "train"):
            for key, value in default().items():
                if key not in config[name]:
                    config[name][key] = value
    for field in dataclasses.fields(ModelConfig):
        if field.name in ("sections", "layout", "moa") or field.name in config.model:
            continue
        if field.default is not dataclasses.MISSING and field.default is not None:
            config.model[field.name] = field.default
    return config


# ------------------------------------------------------------------------------------------------ state bytes
def _itemsize(dtype) -> int:
    import numpy as np
    size = getattr(dtype, "itemsize", None)
    return int(size) if size is not None else np.dtype(dtype).itemsize


def sharded_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of `abstract_tree` (ShapeDtypeStructs) laid out as `shardings` (NamedShardings, the
    same tree): sum of prod(shard_shape) x itemsize. For an evenly sharded layout every device holds the same."""
    import jax
    leaves = jax.tree.leaves(abstract_tree)
    sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    if len(leaves) != len(sharding_leaves):
        raise AssertionError(f"{len(leaves)} arrays but {len(sharding_leaves)} shardings")
    total = 0
    for leaf, sharding in zip(leaves, sharding_leaves):
        total += math.prod(sharding.shard_shape(tuple(leaf.shape))) * _itemsize(leaf.dtype)
    return total


def state_bytes(abstract_state: dict, shardings: dict) -> dict:
    """{'params', 'opt_state', 'other'} bytes per device of a train state (other: step, rng, running stats)."""
    out = {"params": 0, "opt_state": 0, "other": 0}
    for key in abstract_state:
        bucket = key if key in ("params", "opt_state") else "other"
        out[bucket] += sharded_bytes(abstract_state[key], shardings[key])
    return out


# ------------------------------------------------------------------------------------------------ HLO analysis
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "s2": 0.25,
                "u2": 0.25, "token": 0}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return len(text)


def _dims(dims_text: str) -> list[int]:
    return [int(d.replace("<=", "")) for d in dims_text.split(",") if d.strip()]


def shape_bytes(shape_text: str) -> float:
    """Bytes of an HLO shape ('f32[8,64]{1,0}', or a tuple of them)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape_text):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
        if size is None:
            continue
        total += math.prod(_dims(dims)) * size
    return total


def _parse_instruction(rest: str):
    """'f32[8]{0} all-gather(%a), attrs' -> (shape, opcode, [operand names], attrs) or None."""
    rest = rest.strip()
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
        if end < 0:
            return None
    shape, tail = rest[:end], rest[end:].lstrip()
    match = re.match(r"([\w\-]+)\(", tail)
    if not match:
        return None
    opcode = match.group(1)
    close = _balanced(tail, match.end() - 1)
    operands = re.findall(r"%([\w.\-]+)", tail[match.end():close - 1])
    return shape, opcode, operands, tail[close:]


def _group_size(attrs: str) -> int | None:
    """Devices per replica group of a collective (None: not parsed)."""
    match = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if match:
        sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'\s*=\s*(\d+)", match.group(1))}
        names = re.findall(r"'([^']+)'", match.group(2))
        if all(n in sizes for n in names):
            return math.prod(sizes[n] for n in names)
        return None
    match = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if match:
        return _dims(match.group(1))[-1]
    match = re.search(r"replica_groups=\{", attrs)
    if match:
        body = attrs[match.end() - 1:_balanced(attrs, match.end() - 1)]
        first = re.search(r"\{([\d,\s]*)\}", body[1:])
        if first is None:
            return None  # {}: all devices
        return len([d for d in first.group(1).split(",") if d.strip()])
    return None


def _is_noop_permute(attrs: str) -> bool:
    match = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if not match:
        return False
    pairs = re.findall(r"\{(\d+),(\d+)", match.group(0))
    return bool(pairs) and all(a == b for a, b in pairs)


def _traffic(kind: str, operand_bytes: float, group: int) -> float:
    """Bytes one device sends for a collective over `group` devices with the bandwidth-optimal (ring) algorithm:
    all-gather (g-1) x its shard, reduce-scatter (g-1)/g x its input, all-reduce 2 (g-1)/g x (reduce-scatter then
    all-gather), all-to-all (g-1)/g, collective-permute its operand."""
    if kind == "collective-permute":
        return operand_bytes
    if kind == "all-gather":
        return operand_bytes * (group - 1)
    return operand_bytes * (group - 1) / group * (2 if kind == "all-reduce" else 1)


def analyse_hlo(text: str, num_devices: int | None = None) -> dict:
    """Counts from an optimized HLO module's text (compiled.as_text(): the per-device program):
      collectives: {kind: {'ops': in the text, 'executed': per step (times loop trip counts), 'bytes': operand
                   bytes per step of the executed ones, 'traffic': bytes sent per device per step by ring
                   algorithms (`_traffic`)}} for COLLECTIVES (async *-start forms included, ops over one-device
                   groups skipped; a group written as {} is all `num_devices`);
      dot_flops:   2 x prod(result) x prod(lhs contracted dims) summed over the executed dots;
      dot_flops_in_unknown_loops: the part of dot_flops inside while loops without a known trip count (counted as
                   one iteration: the true count depends on runtime values);
      loops / unknown_trip_loops: while loops, and those without a known trip count (counted once);
      custom_calls: the custom-call targets (work XLA cannot see inside);
      largest:     the largest arrays the ENTRY computation creates (`_largest_buffers`)."""
    computations: dict[str, list] = {}
    entry = None
    current = None
    for line in text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(2)
            computations[current] = []
            if match.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            parsed = _parse_instruction(match.group(2))
            if parsed is not None:
                computations[current].append((match.group(1),) + parsed)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    shapes = {name: shape for instrs in computations.values() for name, shape, *_ in instrs}
    edges: dict[str, list[tuple[str, int, bool]]] = {c: [] for c in computations}  # (callee, factor, unknown)
    loops = unknown = 0
    for comp, instrs in computations.items():
        for _, _, opcode, _, attrs in instrs:
            factor, dynamic = 1, False
            if opcode == "while":
                loops += 1
                trip = _TRIP.search(attrs)
                if trip:
                    factor = int(trip.group(1))
                else:
                    unknown += 1
                    dynamic = True
            for kind, callee in _CALLEE.findall(attrs):
                if callee in computations:
                    body = kind in ("body", "condition")
                    edges[comp].append((callee, factor if body else 1, dynamic and body))
            for group in _BRANCHES.findall(attrs):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    if callee in computations:
                        edges[comp].append((callee, 1, False))
    # Executions of each computation per run of ENTRY: propagate in topological order (the call graph is a DAG).
    indegree = {c: 0 for c in computations}
    reachable, stack = {entry}, [entry]
    while stack:
        for callee, _, _ in edges[stack.pop()]:
            if callee not in reachable:
                reachable.add(callee)
                stack.append(callee)
    for comp in reachable:
        for callee, _, _ in edges[comp]:
            indegree[callee] += 1
    runs = {c: 0 for c in computations}
    in_unknown = {c: False for c in computations}  # inside a loop of unknown trip count (at any depth)
    runs[entry] = 1
    ready = [entry]
    while ready:
        comp = ready.pop()
        for callee, factor, dynamic in edges[comp]:
            runs[callee] += runs[comp] * factor
            in_unknown[callee] = in_unknown[callee] or in_unknown[comp] or dynamic
            indegree[callee] -= 1
            if indegree[callee] == 0:
                ready.append(callee)

    collectives = {kind: {"ops": 0, "executed": 0, "bytes": 0, "traffic": 0} for kind in COLLECTIVES}
    dot_flops = uncertain_flops = 0
    custom_calls = {}
    for comp, instrs in computations.items():
        times = runs[comp]
        for name, shape, opcode, operands, attrs in instrs:
            if opcode == "dot" and operands:
                lhs = _ARRAY.search(shapes.get(operands[0], ""))
                contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
                result = _ARRAY.search(shape)
                if lhs and result:
                    lhs_dims = _dims(lhs.group(2))
                    k = math.prod(lhs_dims[d] for d in _dims(contracting.group(1))) if contracting else 1
                    flops = 2 * math.prod(_dims(result.group(2))) * k * times
                    dot_flops += flops
                    if in_unknown[comp]:
                        uncertain_flops += flops
            elif opcode == "custom-call":
                target = re.search(r'custom_call_target="([^"]*)"', attrs)
                key = target.group(1) if target else "?"
                custom_calls[key] = custom_calls.get(key, 0) + 1
            kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
            if kind not in collectives:
                continue
            group = None
            if kind == "collective-permute":
                if _is_noop_permute(attrs):
                    continue
            else:
                group = _group_size(attrs)
                if group == 1:
                    continue
            known = [shapes[o] for o in operands if o in shapes]
            size = sum(shape_bytes(s) for s in known) if len(known) == len(operands) else shape_bytes(shape)
            if group is None and kind != "collective-permute":
                result = shape_bytes(shape)
                if kind == "all-gather" and opcode == kind and size:
                    group = round(result / size)
                elif kind == "reduce-scatter" and opcode == kind and result:
                    group = round(size / result)
                else:
                    group = num_devices or 2
            entry_ = collectives[kind]
            entry_["ops"] += 1
            entry_["executed"] += times
            entry_["bytes"] += int(size * times)
            entry_["traffic"] += int(_traffic(kind, size, group or 1) * times)
    return {"collectives": collectives, "dot_flops": float(dot_flops),
            "dot_flops_in_unknown_loops": float(uncertain_flops), "loops": loops, "unknown_trip_loops": unknown,
            "custom_calls": custom_calls, "largest": _largest_buffers(computations[entry])}


_NOT_BUFFERS = ("parameter", "get-tuple-element", "tuple", "bitcast", "while", "constant", "copy-start",
                "copy-done", "optimization-barrier")


def _largest_buffers(instructions, count: int = 6) -> list[dict]:
    """The largest distinct array values the top-level (ENTRY) computation creates (not parameters or views):
    what fills 'temp' outside the layer loops, e.g. values kept for the backward pass of every layer."""
    seen, out = set(), []
    for name, shape, opcode, _, attrs in instructions:
        if opcode in _NOT_BUFFERS or shape.startswith("("):
            continue
        size = shape_bytes(shape)
        where = re.search(r'op_name="([^"]*)"', attrs)
        out.append({"bytes": int(size), "shape": re.sub(r"\{[^}]*\}$", "", shape), "opcode": opcode,
                    "name": name, "op_name": where.group(1)[-120:] if where else ""})
    out.sort(key=lambda b: -b["bytes"])
    result = []
    for b in out:
        if (b["shape"], b["op_name"]) in seen:
            continue
        seen.add((b["shape"], b["op_name"]))
        result.append(b)
        if len(result) == count:
            break
    return result


# ------------------------------------------------------------------------------------------------ planning
@dataclasses.dataclass(frozen=True)
class Plan:
    """A config prepared for planning (see `prepare`)."""

    config: object            # the experiment config (train.batch_size, data.seq_len, grad accumulation set)
    experiment: object        # trainer.Experiment
    batch_size: int           # global sequences per optimizer step
    seq_len: int
    grad_accum_steps: int
    active_params: int
    total_params: int

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum_steps

    def with_batch(self, batch_size: int, grad_accum_steps: int) -> "Plan":
        config = copy.deepcopy(self.config)
        config.train.batch_size = batch_size
        if "grad_accum_steps" in config.train:
            config.train.grad_accum_steps = grad_accum_steps
        return dataclasses.replace(self, config=config, batch_size=batch_size, grad_accum_steps=grad_accum_steps)


def _positive(flag: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{flag}={value!r} is invalid: accepted values are integers >= 1")


def prepare(config, *, batch_size: int | None = None, seq_len: int | None = None,
            grad_accum_steps: int | None = None) -> Plan:
    """Validate the config for planning (errors name the key or flag) and resolve the model. Defaults:
    train.batch_size, data.seq_len, train.grad_accum_steps (1 when the config has none)."""
    from grin_jax.params import count_params
    from grin_jax.train import config as _train_config
    from grin_jax.train import trainer

    config = complete_config(copy.deepcopy(config))
    batch_size = config.train.batch_size if batch_size is None else batch_size
    seq_len = config.data.seq_len if seq_len is None else seq_len
    if grad_accum_steps is None:
        grad_accum_steps = config.train.get("grad_accum_steps", 1)
    for flag, value in (("--batch_size", batch_size), ("--seq_len", seq_len),
                        ("--grad_accum_steps", grad_accum_steps)):
        _positive(flag, value)
    if batch_size % grad_accum_steps:
        raise ValueError(f"--batch_size={batch_size} is not divisible by --grad_accum_steps={grad_accum_steps}: "
                         "the global batch is split into equal micro-batches")
    config.train.batch_size = batch_size
    config.data.seq_len = seq_len
    if "grad_accum_steps" in config.train:
        config.train.grad_accum_steps = grad_accum_steps
    _train_config.validate_train_config(config.train)
    # resolve() also refuses batches whose activations would not fit THIS machine's memory (the trainer's guard);
    # planning allocates nothing, so resolve a copy with one sequence; the real batch is checked per layout.
    probe = copy.deepcopy(config)
    probe.train.batch_size = 1
    if "grad_accum_steps" in probe.train:
        probe.train.grad_accum_steps = 1
    experiment = dataclasses.replace(trainer.resolve(probe, check_mesh=False), config=config)
    counts = count_params(experiment.model)
    return Plan(config=config, experiment=experiment, batch_size=batch_size, seq_len=seq_len,
                grad_accum_steps=grad_accum_steps, active_params=counts["active"], total_params=counts["total"])


def _layout_config(plan: Plan, sizes: dict):
    config = copy.deepcopy(plan.config)
    for axis in MESH_AXES:
        config.mesh[axis] = sizes.get(axis, 1)
    return config


def data_shards(sizes: dict) -> int:
    """The number of batch shards of a resolved mesh (data x fsdp x expert: sharding.BATCH_AXES)."""
    return sizes["data"] * sizes["fsdp"] * sizes["expert"]


def check_layout(plan: Plan, text: str, sizes: dict, num_devices: int, platform: str) -> dict:
    """sharding.validate for the layout on `num_devices`, plus the micro-batch against the data shards; returns
    the resolved mesh sizes. ValueError names the --mesh layout and the key."""
    from grin_jax import sharding
    config = _layout_config(plan, sizes)
    try:
        resolved = dict(sharding.validate(config, num_devices=num_devices, process_count=1, platform=platform))
    except ValueError as error:
        raise ValueError(f"--mesh {text!r} on --devices={num_devices}: {error}") from None
    shards = data_shards(resolved)
    if plan.micro_batch % shards:
        raise ValueError(f"--mesh {text!r}: the micro-batch --batch_size={plan.batch_size} / --grad_accum_steps="
                         f"{plan.grad_accum_steps} = {plan.micro_batch} sequences is not divisible by its {shards} "
                         f"data shards (data x fsdp x expert); accepted: micro-batches that are multiples of {shards}")
    return resolved


def resolve_sizes(text: str, sizes: dict, num_devices: int) -> dict:
    """The mesh sizes of a layout (-1 filled), ValueError naming the --mesh layout."""
    from grin_jax import sharding
    try:
        return dict(zip(MESH_AXES, sharding.resolve_mesh_shape(sizes, num_devices, process_count=1)))
    except ValueError as error:
        raise ValueError(f"--mesh {text!r} on --devices={num_devices}: {error}") from None


class _StderrTee:
    """Capture what is written to file descriptor 2 (C++ logging included) while the block runs, then write it
    to the real stderr; `.text` holds it."""

    def __enter__(self):
        import tempfile
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        if self.text:
            sys.stderr.write(self.text)
            sys.stderr.flush()
        return False


def fit(peak_bytes: float, hbm_gb: float) -> str:
    if peak_bytes <= FIT_MARGIN * hbm_gb * GIB:
        return "yes"
    return "tight" if peak_bytes <= hbm_gb * GIB else "no"


def plan_layout(plan: Plan, text: str, sizes: dict, devices, *, hbm=None, compiler_options=None, tx=None,
                abstract=None, hlo_dir: str | None = None) -> dict:
    """Compile the train step for one layout (sizes: the resolved mesh) and measure it: one row (module
    docstring). tx / abstract: (optimizer, (graphdef, abstract state)) to reuse across layouts. hlo_dir: also
    write the optimized HLO there (<layout>.hlo.txt)."""
    import jax
    from grin_jax import sharding
    from grin_jax.train import step, trainer

    hbm = parse_hbm(DEFAULT_HBM) if hbm is None else hbm
    if tx is None:
        tx, _ = trainer.make_optimizer(plan.config.train, plan.experiment.model)
    graphdef, state = trainer.abstract_state(plan.experiment, tx) if abstract is None else abstract
    mesh = sharding.make_mesh(_layout_config(plan, sizes).mesh, devices=devices)
    shardings = sharding.state_shardings(state, mesh)
    held = state_bytes(state, shardings)
    batch = step.batch_spec(plan.batch_size, plan.seq_len,
                            document_attention=step.document_attention(plan.config.data))
    start = time.perf_counter()
    with _StderrTee() as log:  # XLA's C++ warnings (e.g. the SPMD partitioner's) go to fd 2: count them
        compiled = step.compile_train_step(graphdef, tx, state, shardings, mesh, batch,
                                           grad_accum_steps=plan.grad_accum_steps,
                                           compiler_options=compiler_options)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    flops = step.compiled_flops(compiled)
    hlo_text = compiled.as_text()
    del compiled
    hlo = analyse_hlo(hlo_text, num_devices=mesh.size)
    if hlo_dir:
        _write_atomic(os.path.join(hlo_dir, re.sub(r"[^\w=,.-]+", "_", text) + ".hlo.txt"), hlo_text)
    del hlo_text
    gc.collect()
    n = mesh.size
    argument = int(memory.argument_size_in_bytes)
    output = int(memory.output_size_in_bytes)
    temp = int(memory.temp_size_in_bytes)
    alias = int(memory.alias_size_in_bytes)
    peak = argument + output + temp - alias
    tokens = plan.batch_size * plan.seq_len
    model_flops = 6.0 * plan.active_params * tokens
    return {
        "layout": text,
        "mesh": {a: int(sizes[a]) for a in MESH_AXES},
        "devices": int(n),
        "batch_size": plan.batch_size,
        "seq_len": plan.seq_len,
        "grad_accum_steps": plan.grad_accum_steps,
        "micro_batch": plan.micro_batch,
        # per micro-batch and data shard; the devices of one shard's model axis share its sequences
        "sequences_per_device": plan.micro_batch / data_shards(sizes),
        "tokens_per_step": tokens,
        "param_bytes": held["params"],
        "opt_state_bytes": held["opt_state"],
        "other_state_bytes": held["other"],
        "argument_bytes": argument,
        "output_bytes": output,
        "temp_bytes": temp,
        "alias_bytes": alias,
        "generated_code_bytes": int(memory.generated_code_size_in_bytes),
        "peak_bytes": peak,
        "fits": {label: fit(peak, size) for size, label in hbm},
        "xla_flops_per_device": flops,
        "xla_flops_total": flops * n,
        "dot_flops_per_device": hlo["dot_flops"],
        "dot_flops_total": hlo["dot_flops"] * n,
        "dot_flops_in_unknown_loops_per_device": hlo["dot_flops_in_unknown_loops"],
        "model_flops_6nt_total": model_flops,
        "model_flops_6nt_per_device": model_flops / n,
        "dot_flops_over_6nt": hlo["dot_flops"] * n / model_flops if model_flops else None,
        "collectives": hlo["collectives"],
        "while_loops": hlo["loops"],
        "unknown_trip_loops": hlo["unknown_trip_loops"],
        "custom_calls": hlo["custom_calls"],
        "largest_buffers": hlo["largest"],
        "involuntary_rematerializations": log.text.count("Involuntary full rematerialization"),
        "compile_seconds": round(seconds, 1),
        "platform": jax.default_backend(),
    }


def layout_batch(plan: Plan, text: str, shards: int, per_shard_batch: int, fixed_batch: bool) -> Plan:
    """The plan of a layout with `shards` data shards and a micro-batch of per_shard_batch sequences per shard:
    fixed_batch, the global batch plan.batch_size is kept and reached with plan.batch_size / (per_shard_batch x
    shards) micro-batches per step; else plan.grad_accum_steps micro-batches per step."""
    micro = per_shard_batch * shards
    if not fixed_batch:
        return plan.with_batch(micro * plan.grad_accum_steps, plan.grad_accum_steps)
    if plan.batch_size % micro:
        raise ValueError(f"--mesh {text!r}: --batch_size={plan.batch_size} is not divisible by --per_shard_batch="
                         f"{per_shard_batch} x its {shards} data shards = {micro}: the global batch must be a whole "
                         "number of micro-batches")
    return plan.with_batch(plan.batch_size, plan.batch_size // micro)


def run(plan: Plan, layouts, devices, *, per_shard_batch: int | None = None, fixed_batch: bool = True, hbm=None,
        compiler_options=None, hlo_dir=None, progress=True) -> list[dict]:
    """Validate every layout (before compiling any), then plan each; a progress line per layout on `progress`
    (True: sys.stderr; None / False: none; or a file). per_shard_batch: every layout gets micro-batches of
    per_shard_batch sequences per data shard (`layout_batch`: with fixed_batch, as many micro-batches as make
    plan.batch_size; else plan.grad_accum_steps of them)."""
    import jax
    from grin_jax.train import trainer

    progress = sys.stderr if progress is True else (progress or None)
    platform = jax.default_backend()
    if per_shard_batch is not None:
        _positive("--per_shard_batch", per_shard_batch)
    jobs = []
    for text, sizes in layouts:
        layout_plan = plan
        if per_shard_batch is not None:
            shards = data_shards(resolve_sizes(text, sizes, len(devices)))
            layout_plan = layout_batch(plan, text, shards, per_shard_batch, fixed_batch)
        jobs.append((layout_plan, text, check_layout(layout_plan, text, sizes, len(devices), platform)))
    tx, _ = trainer.make_optimizer(plan.config.train, plan.experiment.model)
    abstract = trainer.abstract_state(plan.experiment, tx)
    rows = []
    for i, (layout_plan, text, sizes) in enumerate(jobs, 1):
        shape = ",".join(f"{a}={sizes[a]}" for a in MESH_AXES)
        if progress is not None:
            print(f"[{i}/{len(jobs)}] {text} ({shape}), batch {layout_plan.batch_size} x {layout_plan.seq_len}: "
                  "compiling ...", file=progress, flush=True)
        row = plan_layout(layout_plan, text, sizes, devices, hbm=hbm, compiler_options=compiler_options, tx=tx,
                          abstract=abstract, hlo_dir=hlo_dir)
        if progress is not None:
            print(f"[{i}/{len(jobs)}] {text}: {row['compile_seconds']:.0f} s, peak "
                  f"{row['peak_bytes'] / GIB:.2f} GiB/device", file=progress, flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ output
def _gib(x) -> str:
    return f"{x / GIB:.2f}" if x >= GIB / 100 or x == 0 else f"{x / GIB:.2e}"


def _tflop(x) -> str:
    return f"{x / 1e12:.1f}" if x >= 1e11 else f"{x / 1e12:.3g}"


def _collective_cell(c: dict) -> str:
    if not c["executed"]:
        return "-"
    return f"{c['executed']}x {_bytes(c['traffic'])}"


def _bytes(x) -> str:
    return f"{x / GIB:.2f}G" if x >= GIB / 100 else f"{x / 2 ** 20:.2f}M"


def table_columns(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    labels = list(rows[0]["fits"]) if rows else []
    header = (["layout", "data,fsdp,exp,model", "batch", "seq/dev", "params GiB", "opt GiB", "arg GiB", "out GiB",
               "temp GiB", "alias GiB", "peak GiB"] + [f"fit {label}" for label in labels]
              + ["TFLOP/dev XLA", "TFLOP/dev dots", "dots/6NT", "dots in dyn. loops"]
              + [COLLECTIVE_ABBREV[k] for k in COLLECTIVES] + ["sent/dev", "compile s"])
    body = []
    for r in rows:
        m = r["mesh"]
        batch = f"{r['batch_size']}" + (f"/{r['grad_accum_steps']}" if r["grad_accum_steps"] > 1 else "")
        body.append([r["layout"], f"{m['data']},{m['fsdp']},{m['expert']},{m['model']}", batch,
                     f"{r['sequences_per_device']:g}", _gib(r["param_bytes"]), _gib(r["opt_state_bytes"]),
                     _gib(r["argument_bytes"]), _gib(r["output_bytes"]), _gib(r["temp_bytes"]),
                     _gib(r["alias_bytes"]), _gib(r["peak_bytes"])]
                    + [r["fits"][label] for label in labels]
                    + [_tflop(r["xla_flops_per_device"]), _tflop(r["dot_flops_per_device"]),
                       "-" if r["dot_flops_over_6nt"] is None else f"{r['dot_flops_over_6nt']:.2f}",
                       f"{100 * r['dot_flops_in_unknown_loops_per_device'] / max(r['dot_flops_per_device'], 1):.0f}%"]
                    + [_collective_cell(r["collectives"][k]) for k in COLLECTIVES]
                    + [_bytes(sum(c["traffic"] for c in r["collectives"].values())),
                       f"{r['compile_seconds']:.0f}"])
    return header, body


def format_table(rows: list[dict]) -> str:
    """The rows as aligned text columns."""
    header, body = table_columns(rows)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    just = lambda i, c, w: c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
    lines = ["  ".join(just(i, h, w) for i, (h, w) in enumerate(zip(header, widths))),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(just(i, c, w) for i, (c, w) in enumerate(zip(row, widths))) for row in body]
    return "\n".join(lines)


LEGEND = ("Per device. batch: global sequences per optimizer step (/K: K micro-batches); seq/dev: sequences per "
          "data shard and micro-batch (the devices of a shard's model axis share them). params / opt: exact shard "
          "bytes. arg / out / temp / alias: XLA:CPU's memory_analysis() of the partitioned program (temp = "
          "activations and temporaries: an estimate for GPU / TPU). peak = arg + out + temp - alias. fit: 'yes' "
          "when peak <= 90 % of the HBM (GiB), 'tight' <= 100 %, else 'no'. TFLOP/dev XLA: XLA's cost analysis "
          "(a while loop's body counted once); TFLOP/dev dots: the matmuls of the optimized HLO times their loops' "
          "trip counts; dots in dyn. loops: the share of those inside loops with data-dependent trip counts, counted "
          "as one iteration (the MoE 'tiled' backend's tile loops: the true count depends on the routing); dots/6NT: "
          "dot FLOPs x "
          "devices / (6 x active params x tokens). AG / RS / AR / A2A / CP (all-gather, reduce-scatter, all-reduce, "
          "all-to-all, collective-permute): ops executed per step x bytes each device sends per step by ring "
          "algorithms (AG (g-1) x shard, RS (g-1)/g x input, AR 2 (g-1)/g x input; XLA:CPU keeps reductions as AR "
          "that GPU / TPU turn into RS); sent/dev: their sum (G = GiB, M = MiB). See grin_jax/plan.py's docstring.")


def format_markdown(rows: list[dict], meta: dict) -> str:
    header, body = table_columns(rows)
    parts = []
    if meta["batch_size"] is not None:
        parts.append(f"{meta['batch_size']} sequences x {meta['seq_len']} tokens = "
                     f"{meta['batch_size'] * meta['seq_len']:,} tokens per optimizer step")
    if meta["per_shard_batch"] is not None:
        parts.append(f"micro-batches of {meta['per_shard_batch']} sequence(s) of {meta['seq_len']} tokens per data "
                     "shard" + ("" if meta["batch_size"] is not None else
                                " (the global batch differs per layout: column 'batch')"))
    if meta["grad_accum_steps"] is not None:
        parts.append(f"grad_accum_steps {meta['grad_accum_steps']}")
    else:
        parts.append("grad_accum_steps per layout (column 'batch': B/K = K micro-batches)")
    batch = ", ".join(parts)
    lines = [f"# Plan: {meta['config']} on {meta['devices']} devices", "",
             f"- command: `{meta['command']}`",
             f"- model: {meta['total_params'] / 1e9:.3f}B parameters, {meta['active_params'] / 1e9:.3f}B active "
             f"per token; param_dtype {meta['param_dtype']}, dtype {meta['dtype']}, activation_dtype "
             f"{meta['activation_dtype']}, scan_layers {meta['scan_layers']}, remat {meta['remat']}, MoE backend "
             f"{meta['moe_backend']}",
             f"- batch: {batch}",
             f"- compiled on {meta['platform']} ({meta['devices']} fake devices), jax {meta['jax_version']}, "
             f"{meta['compiler_options'] or 'default compiler options'}; git {meta['git_commit'] or '?'}"
             f"{' (uncommitted changes)' if meta['git_dirty'] else ''}", "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", LEGEND, ""]
    for r in rows:
        flops = (f"6·N·T {r['model_flops_6nt_total'] / 1e15:.1f} PFLOP per step; dots x devices "
                 f"{r['dot_flops_total'] / 1e15:.1f}, XLA x devices {r['xla_flops_total'] / 1e15:.1f}")
        notes = [flops]
        if r["unknown_trip_loops"]:
            notes.append(f"{r['unknown_trip_loops']} of {r['while_loops']} while loops have data-dependent trip "
                         "counts (counted once)")
        if r["custom_calls"]:
            notes.append(f"custom calls {r['custom_calls']}")
        if r["involuntary_rematerializations"]:
            notes.append(f"{r['involuntary_rematerializations']} 'involuntary full rematerialization' warnings of "
                         "the SPMD partitioner")
        if r["largest_buffers"]:
            notes.append("largest top-level buffers: " + ", ".join(
                f"{b['shape']} {b['bytes'] / GIB:.1f} GiB" for b in r["largest_buffers"][:4]))
        lines.append(f"- {r['layout']}: " + "; ".join(notes))
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def output_paths(out: str) -> tuple[str, str]:
    """--out=DIR/name.md (or DIR/name) -> (DIR/name.md, DIR/name.json)."""
    stem = out[:-3] if out.endswith(".md") else out
    return stem + ".md", stem + ".json"


def _git() -> tuple[str | None, bool]:
    try:
        from grin_jax.train import provenance
        info = provenance.git_provenance()
        return info.get("git_commit"), bool(info.get("git_dirty"))
    except Exception:  # noqa: BLE001 - provenance is informative only
        return None, False


def _moe_backends(model) -> str:
    """What each MoE section's backend is, and what 'auto' resolves to on this platform for its compute dtype."""
    import jax
    import jax.numpy as jnp
    out = []
    for name, section in model.sections:
        backend = getattr(section, "backend", None)
        if backend is None:
            continue
        if backend == "auto":
            from grin_jax.moe import dispatch
            dtype = jnp.result_type(jnp.dtype(model.dtype), jnp.dtype(model.activation_dtype))
            try:
                chosen, _ = dispatch.select_backend("auto", jax.default_backend(),
                                                    activation=getattr(section, "activation", None), dtype=dtype)
            except Exception:  # noqa: BLE001 - informative only
                chosen = "?"
            backend = f"auto ({chosen} on {jax.default_backend()})"
        out.append(f"{name}: {backend}")
    return "; ".join(out) or "none"


def metadata(plan: Plan, config_name: str, num_devices: int, argv, *, per_shard_batch=None, fixed_batch=True,
             compiler_options=None) -> dict:
    import jax
    m = plan.experiment.model
    commit, dirty = _git()
    return {"config": config_name, "command": " ".join(["python -m grin_jax.plan"] + list(argv[1:])),
            "devices": num_devices, "batch_size": plan.batch_size if fixed_batch else None,
            "per_shard_batch": per_shard_batch,
            "seq_len": plan.seq_len,
            "grad_accum_steps": plan.grad_accum_steps if per_shard_batch is None else None,
            "total_params": plan.total_params, "active_params": plan.active_params,
            "param_dtype": m.param_dtype, "dtype": m.dtype, "activation_dtype": m.activation_dtype,
            "scan_layers": m.scan_layers, "remat": m.remat, "num_layers": m.num_layers, "d_model": m.d_model,
            "moe_backend": _moe_backends(m), "platform": jax.default_backend(), "jax_version": jax.__version__,
            "compiler_options": compiler_options or {}, "git_commit": commit, "git_dirty": dirty,
            "peak_formula": "argument + output + temp - alias",
            "fit_rule": f"yes: peak <= {FIT_MARGIN} x HBM GiB; tight: <= HBM; else no"}


# ------------------------------------------------------------------------------------------------ CLI
USAGE = ("usage: python -m grin_jax.plan --config=configs/<file>.py[:variant] --devices=N "
         "[--mesh='fsdp=16,expert=4;fsdp=8,model=8'] [--batch_size=B | --per_shard_batch=K] [--seq_len=S] "
         "[--grad_accum_steps=A] [--hbm=80,95] [--out=DIR/name.md] [--config.a.b=value ...]")


def _parse_args(argv):
    """Two passes: the flags and the config file, then (after `complete_config`) the --config.* overrides, so
    that keys a model-only config file leaves out can be overridden."""
    from absl import flags
    from ml_collections import config_flags

    argv = list(argv)
    prog, args = argv[0], argv[1:]
    overrides, rest = [], []
    for arg in args:
        if arg.startswith("--config."):
            if "=" not in arg:
                raise ValueError(f"{arg}: give overrides as --config.a.b=value")
            overrides.append(arg)
        else:
            rest.append(arg)
    fv = flags.FlagValues()
    # config_flags reads the overrides from sys_argv (sys.argv by default): give each pass its own arguments.
    config_flags.DEFINE_config_file("config", None, "experiment config file (get_config(arg))", flag_values=fv,
                                    lock_config=False, sys_argv=[prog] + rest)
    flags.DEFINE_integer("devices", None, "number of devices of the mesh (fake CPU devices)", flag_values=fv)
    flags.DEFINE_multi_string("mesh", [], "mesh layouts: 'fsdp=16,expert=4,model=2' (repeat, or ';'-separated)",
                              flag_values=fv)
    flags.DEFINE_integer("batch_size", None, "global sequences per optimizer step (default train.batch_size)",
                         flag_values=fv)
    flags.DEFINE_integer("per_shard_batch", None, "instead of --batch_size: this many sequences per data shard "
                         "and micro-batch, on every layout", flag_values=fv)
    flags.DEFINE_integer("seq_len", None, "tokens per sequence (default data.seq_len)", flag_values=fv)
    flags.DEFINE_integer("grad_accum_steps", None, "micro-batches per optimizer step", flag_values=fv)
    flags.DEFINE_string("hbm", DEFAULT_HBM, "device memory sizes (GB) to judge fit, comma-separated",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "write the table as markdown here and the rows as JSON next to it",
                        flag_values=fv)
    flags.DEFINE_string("hlo_dir", None, "also write each layout's optimized HLO text to this directory",
                        flag_values=fv)
    flags.DEFINE_bool("fast_compile", False, "XLA:CPU backend optimisation level 0 (same HLO, faster compile)",
                      flag_values=fv)
    fv([prog] + rest)
    if fv.config is None:
        raise ValueError(f"--config is required; {USAGE}")
    if fv.devices is None or fv.devices < 1:
        raise ValueError(f"--devices={fv.devices} is invalid: accepted values are integers >= 1; {USAGE}")
    if fv.per_shard_batch is not None and fv.batch_size is not None and fv.grad_accum_steps is not None:
        raise ValueError("--grad_accum_steps cannot be given with both --batch_size and --per_shard_batch: they "
                         "set it (batch_size / (per_shard_batch x data shards) for each layout)")
    config = complete_config(fv.config)
    if overrides:
        fv2 = flags.FlagValues()
        config_flags.DEFINE_config_dict("config", config, "the config, completed", flag_values=fv2,
                                        lock_config=True, sys_argv=[prog] + overrides)
        fv2([prog] + overrides)
        config = fv2.config
    return fv, config


def main(argv=None) -> int:
    from grin_jax.cli import run_main
    return run_main(_main, argv)


def _main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    fv, config = _parse_args(argv)
    hbm = parse_hbm(fv.hbm)
    layouts = parse_layouts(fv.mesh)
    configure_fake_devices(fv.devices)  # before anything starts JAX's backend
    devices = planning_devices(fv.devices)
    batch_size, accum = fv.batch_size, fv.grad_accum_steps
    fixed_batch = fv.batch_size is not None
    if fv.per_shard_batch is not None:  # the batch and accumulation are set per layout by `run`
        _positive("--per_shard_batch", fv.per_shard_batch)
        if fixed_batch:
            accum = 1
        else:
            accum = accum if accum is not None else config.train.get("grad_accum_steps", 1)
            batch_size = accum
    plan = prepare(config, batch_size=batch_size, seq_len=fv.seq_len, grad_accum_steps=accum)
    if not layouts:
        from grin_jax.sharding import mesh_config_of
        mesh = mesh_config_of(plan.config)
        text = ",".join(f"{a}={mesh[a]}" for a in MESH_AXES if mesh[a] != 1) or "data=1"
        layouts = [(text, {a: mesh[a] for a in MESH_AXES})]
    options = {"xla_backend_optimization_level": 0} if fv.fast_compile else None
    rows = run(plan, layouts, devices, per_shard_batch=fv.per_shard_batch, fixed_batch=fixed_batch, hbm=hbm,
               compiler_options=options, hlo_dir=fv.hlo_dir)
    name = getattr(fv["config"], "config_filename", None) or "config"
    meta = metadata(plan, name, len(devices), argv, per_shard_batch=fv.per_shard_batch, fixed_batch=fixed_batch,
                    compiler_options=options)
    print(format_table(rows))
    print(f"\n{LEGEND}")
    if fv.out:
        md_path, json_path = output_paths(fv.out)
        _write_atomic(json_path, json.dumps({"meta": meta, "rows": rows}, indent=2, sort_keys=True) + "\n")
        _write_atomic(md_path, format_markdown(rows, meta))
        print(f"wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
