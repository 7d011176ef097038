"""Orbax checkpoints of the train state (params, optimizer state, step, RNG, and 'model_state': the running
statistics of a model that has some) plus JSON metadata (data iterator state, config name, the loss at the save).
Saves are atomic (Orbax writes to a temporary directory and renames) and asynchronous; restores take an abstract
target so that optax namedtuples and shardings are kept.

Verified: once a save is complete, process 0 seals it with `<step>/checksums.json` (the size and SHA-256 of every
file of the step, written atomically), at the next save, `wait` or `close`. `verify(step)` re-reads the files and
raises DamagedCheckpointError on a missing, truncated or altered file (a flipped bit included). A step without
checksums.json (a crash between Orbax's commit and the seal, or written before sealing existed) is "unsealed": it
is used only if Orbax restores it. `restore_newest` walks the steps newest first and returns the first that
verifies and restores; `set_aside` moves a damaged step out of the checkpoint directory (to
`<workdir>/damaged_checkpoints/`), so that the run can save that step again. Nothing is deleted.

Pinned: the newest `max_to_keep` steps are kept, and also the step passed to `pin` (the trainer pins the newest
checkpoint saved while the loss was healthy, so that a divergence lasting several saves cannot rotate it out).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp

CHECKSUMS = "checksums.json"
_CHUNK = 1 << 22


class DamagedCheckpointError(ValueError):
    """A checkpoint step whose files do not match its checksums, or that Orbax cannot read."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
    """Every file under step_dir except checksums.json, as sorted relative paths."""
    out = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != CHECKSUMS and not rel.startswith(CHECKSUMS + ".tmp"):
                out.append(rel)
    return sorted(out)


class _LatestAndPinned:
    """Orbax preservation policy: the newest `n` steps and the pinned ones."""

    def __init__(self, n: int):
        self.n, self.pinned = n, set()

    def should_preserve(self, checkpoints, *, context):
        newest = {info.step for info in checkpoints[-self.n:]} if self.n > 0 else set()
        return [info.step in newest or info.step in self.pinned for info in checkpoints]


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._policy = _LatestAndPinned(max_to_keep)
        options = ocp.CheckpointManagerOptions(preservation_policy=self._policy,
                                               enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._unsealed: list[int] = []  # saved steps whose checksums are not written yet

    def pin(self, step: int | None) -> None:
        """Keep `step` (None: no step) besides the newest max_to_keep, until another step is pinned."""
        self._policy.pinned = set() if step is None else {int(step)}

    def meta(self, step: int) -> dict:
        """The JSON metadata saved with `step` (not verified; {} when unreadable)."""
        try:
            with open(os.path.join(self.step_dir(step), "meta", "metadata")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def save(self, step: int, state, meta: dict, *, force: bool = True) -> None:
        self._seal()
        self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                              meta=ocp.args.JsonSave(meta)), force=force)
        self._unsealed.append(int(step))

    def _seal(self) -> None:
        """Wait for the pending save, then write checksums.json of every saved step not sealed yet (process 0)."""
        self._manager.wait_until_finished()
        steps, self._unsealed = self._unsealed, []
        if jax.process_index() != 0:
            return
        for step in steps:
            step_dir = self.step_dir(step)
            if not os.path.isdir(step_dir):  # already rotated out (max_to_keep)
                continue
            files = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _sha256(os.path.join(step_dir, rel))]
                     for rel in _files(step_dir)}
            tmp = os.path.join(step_dir, f"{CHECKSUMS}.tmp-{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump({"algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(step_dir, CHECKSUMS))

    def sealed(self, step: int) -> bool:
        return os.path.exists(os.path.join(self.step_dir(step), CHECKSUMS))

    def verify(self, step: int) -> None:
        """Raise DamagedCheckpointError when step's files differ from its checksums.json (no-op when unsealed)."""
        step_dir = self.step_dir(step)
        path = os.path.join(step_dir, CHECKSUMS)
        if not os.path.exists(path):
            return
        try:
            with open(path) as f:
                expected = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DamagedCheckpointError(f"step {step}: {CHECKSUMS} is unreadable ({error})") from None
        for rel, (size, digest) in sorted(expected.items()):
            file = os.path.join(step_dir, rel)
            if not os.path.exists(file):
                raise DamagedCheckpointError(f"step {step}: {rel} is missing")
            if os.path.getsize(file) != size:
                raise DamagedCheckpointError(f"step {step}: {rel} has {os.path.getsize(file)} bytes, "
                                             f"{size} were written")
            if _sha256(file) != digest:
                raise DamagedCheckpointError(f"step {step}: {rel} differs from what was written (checksum)")

    def restore(self, step: int, abstract_state):
        """Restore `step` onto `abstract_state` (a pytree of jax.ShapeDtypeStruct with the wanted shardings), after
        verifying its checksums. DamagedCheckpointError: damaged files, or (unsealed steps) Orbax cannot read it."""
        self.verify(step)
        try:
            restored = self._manager.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as error:  # noqa: BLE001  (Orbax raises many types; the caller decides)
            if self.sealed(step):  # intact files that do not restore: not damage (e.g. another model); re-raise
                raise
            message = " ".join(str(error).split())[:300]
            raise DamagedCheckpointError(f"step {step} (unsealed) cannot be read: {type(error).__name__}: "
                                         f"{message}") from None
        return restored["state"], restored["meta"]

    def restore_newest(self, abstract_state, *, log=None):
        """(step, state, meta, damaged) of the newest step that verifies and restores; damaged: [(step, reason)] of
        the newer steps that did not. (None, None, None, damaged) when there is no usable step."""
        damaged = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, abstract_state)
            except DamagedCheckpointError as error:
                damaged.append((step, str(error)))
                if log is not None:
                    log(f"checkpoint {self.step_dir(step)} is damaged: {error}")
                continue
            return step, state, meta, damaged
        return None, None, None, damaged

    def set_aside(self, step: int, why: str = "damaged") -> str:
        """Move a step to <workdir>/<why>_checkpoints/<step>-<time> (process 0) so that it no longer counts as a
        checkpoint and its step can be saved again; returns where it went."""
        self._seal()
        target = os.path.join(os.path.dirname(self.directory), f"{why}_checkpoints",
                              f"{int(step)}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(self.step_dir(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"grin_jax set_aside {step}")
        self._manager.reload()
        return target

    def wait(self) -> None:
        self._seal()

    def close(self) -> None:
        self._seal()
        self._manager.close()


def abstract_like(tree):
    """ShapeDtypeStruct twin of a pytree of arrays, keeping each array's sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
