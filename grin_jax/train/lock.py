"""A workdir is one run: `workdir_lock` holds `<workdir>/.lock` (pid, host) while a trainer runs in it, so a second
trainer on the same workdir (a rerun sweep whose killed runner left its trial running, a second terminal) is refused
instead of writing over the first. A lock left by a process that no longer exists on this host is stale and taken
over; one from another host cannot be checked from here and is refused with what to do."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

LOCK_NAME = ".lock"


class WorkdirInUseError(RuntimeError):
    """Another trainer holds the workdir (a user error: the CLI answers it in one line, grin_jax.cli)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _try_create(path: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
    return True


def acquire(workdir: str) -> str:
    """Take the lock or raise WorkdirInUseError (a RuntimeError) naming the process that holds it. Returns the
    lock's path."""
    path = os.path.join(workdir, LOCK_NAME)
    for _ in range(3):
        if _try_create(path):
            return path
        try:
            with open(path) as f:
                holder = json.load(f)
        except (OSError, ValueError):  # being written, or torn: treat as held for a moment
            time.sleep(0.2)
            continue
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
            os.remove(path)  # stale: its process is gone
            continue
        raise WorkdirInUseError(f"{workdir} is in use by process {holder.get('pid')} on {holder.get('host')} "
                                f"(since {time.ctime(holder.get('since', 0))}): a workdir is one run. Wait for it, "
                                f"stop it, or, if that process is dead on another host, remove {path}")
    raise WorkdirInUseError(f"could not take the lock {path}; remove it if no trainer runs in {workdir}")


@contextlib.contextmanager
def workdir_lock(workdir: str, *, enabled: bool = True):
    """Hold the workdir's lock for the block (enabled=False: a no-op, e.g. on processes other than 0)."""
    if not enabled:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = acquire(workdir)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
