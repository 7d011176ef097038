"""Metric writers: JSON lines (one record per logged step) and TensorBoard event files.

On resume from step k the JSONL log is rewritten (atomically) without the records past k that a crashed run
left behind, so the log has each step once, and without lines that are not a JSON record (a line torn by a crash or
a full disk; reported on stderr): every readable record around them is kept.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

import numpy as np


def _to_python(value):
    value = np.asarray(value)
    if value.ndim == 0:
        value = value.item()
        return None if isinstance(value, float) and not math.isfinite(value) else value
    return value.tolist()


@contextlib.contextmanager
def naming_the_file(path: str):
    """An OSError from writing to an open file (a full disk: errno ENOSPC) carries no file name: add `path`, so the
    one-line error of the CLI (grin_jax.cli) says which file could not be written."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            error.filename = path
        raise


def write_json_atomic(path: str, payload) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with naming_the_file(path):
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def read_jsonl(path: str, *, warn: bool = True) -> list[dict]:
    """The JSON-object records of a JSON-lines file ([] if there is none). A line that is not one (torn by a crash
    or a full disk, damaged bytes) is skipped, not the end of the log: the records after it are read; with `warn`
    the skipped lines are reported on stderr, naming the file."""
    if not os.path.exists(path):
        return []
    records, skipped = [], []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)  # bytes: bad UTF-8 is a ValueError of this line only
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped.append(lineno)
    if skipped and warn:
        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        plural = "s" if len(skipped) != 1 else ""
        print(f"warning: {path}: skipped {len(skipped)} unreadable line{plural} (line{plural} {shown}: not a JSON "
              f"record, e.g. torn by a crash); the other {len(records)} records are kept", file=sys.stderr,
              flush=True)
    return records


class MetricWriter:
    """Writes scalar and vector metrics to `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tb`."""

    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        tmp = self.path + ".tmp"
        with naming_the_file(self.path):
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
        with naming_the_file(self.path):
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
