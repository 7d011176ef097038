"""Metric writers: JSON lines (one record per logged step) and TensorBoard event files.

On resume from step k the JSONL log is rewritten (atomically) without the records past k that a crashed run
left behind, so the log has each step once.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np


def _to_python(value):
    value = np.asarray(value)
    if value.ndim == 0:
        value = value.item()
        return None if isinstance(value, float) and not math.isfinite(value) else value
    return value.tolist()


def write_json_atomic(path: str, payload) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line from a crash
                    break
    return records


class MetricWriter:
    """Writes scalar and vector metrics to `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tb`."""

    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                self._tb = None

    def write(self, step: int, metrics: dict, *, prefix: str = "") -> dict:
        record = {"step": int(step)}
        for key, value in metrics.items():
            record[prefix + key] = _to_python(value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        return record

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
