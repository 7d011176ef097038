"""Timing harness: variants of one group are compiled, then timed interleaved (rep r of every variant before rep
r + 1 of any), so slow drifts of a shared machine's load hit all of them alike. Reports medians of wall-clock
and of process CPU time, the ratio to the group's baseline, achieved GFLOP/s of useful (active) FLOPs and the
executable's memory from XLA's `memory_analysis()`."""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from typing import Any, Callable

import jax


@dataclasses.dataclass
class Variant:
    """One timed function. `fn` is jitted; `args` its inputs; `flops` the useful FLOPs of one call."""

    name: str
    fn: Callable
    args: tuple
    flops: float
    meta: dict = dataclasses.field(default_factory=dict)  # "scratch_bytes": memory XLA's analysis cannot see
    baseline: str | None = None  # name of the variant this one's ratio is taken against
    reps: int | None = None      # fewer repetitions for very slow variants
    bytes: float = 0.0           # the least memory traffic one call must make (0: not stated)


@dataclasses.dataclass
class Group:
    name: str
    variants: list[Variant]
    note: str = ""


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def memory_of(compiled) -> dict:
    """Bytes from XLA's memory analysis of a compiled executable ({} when the backend does not say)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - optional information
        return {}
    if stats is None:
        return {}
    get = lambda name: int(getattr(stats, name, 0) or 0)  # noqa: E731
    out = {"temp_bytes": get("temp_size_in_bytes"), "argument_bytes": get("argument_size_in_bytes"),
           "output_bytes": get("output_size_in_bytes"), "alias_bytes": get("alias_size_in_bytes")}
    out["peak_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    return out


def _with_scratch(memory: dict, scratch: int | None) -> dict:
    """Adds a custom call's own scratch (e.g. the CPU kernel's) to XLA's numbers: 'scratch_bytes', and peak_bytes."""
    if not scratch or "peak_bytes" not in memory:
        return memory
    return {**memory, "scratch_bytes": scratch, "peak_bytes": memory["peak_bytes"] + scratch}


def run_group(group: Group, *, reps: int, log: Callable[[str], Any] = print) -> list[dict]:
    """Compile, warm up and time every variant of `group` interleaved; one record per variant."""
    compiled, memory = {}, {}
    for v in group.variants:
        start = time.perf_counter()
        exe = v.fn.lower(*v.args).compile()
        compiled[v.name] = exe
        memory[v.name] = memory_of(exe)
        jax.block_until_ready(exe(*v.args))  # warm-up
        log(f"  compiled {group.name}/{v.name} in {time.perf_counter() - start:.1f}s")
    wall = {v.name: [] for v in group.variants}
    cpu = {v.name: [] for v in group.variants}
    for rep in range(reps):
        for v in group.variants:
            if v.reps is not None and rep >= v.reps:
                continue
            exe = compiled[v.name]
            c0, t0 = _cpu_seconds(), time.perf_counter()
            jax.block_until_ready(exe(*v.args))
            wall[v.name].append(time.perf_counter() - t0)
            cpu[v.name].append(_cpu_seconds() - c0)
    med = {name: statistics.median(ts) for name, ts in wall.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    records = []
    for v in group.variants:
        base = v.baseline
        record = {
            "group": group.name,
            "name": v.name,
            **v.meta,
            "reps": len(wall[v.name]),
            "median_s": med[v.name],
            "min_s": min(wall[v.name]),
            "median_cpu_s": med_cpu[v.name],
            "baseline": base,
            "ratio_to_dense": med[v.name] / med[base] if base else None,
            "cpu_ratio_to_dense": med_cpu[v.name] / med_cpu[base] if base else None,
            "useful_gflop": v.flops / 1e9,
            "gflops_per_s": v.flops / med[v.name] / 1e9,
            "useful_gbyte": v.bytes / 1e9,
            "gbytes_per_s": v.bytes / med[v.name] / 1e9,
            "memory": _with_scratch(memory[v.name], v.meta.get("scratch_bytes")),
        }
        records.append(record)
    return records
