"""Provenance of a run: the git commit of the code and whether the checkout had uncommitted changes.

`git_provenance()` asks git about the repository holding the grin_jax package (when the package is a git checkout,
e.g. `pip install -e .`; an installed copy has none): {'git_commit': 'a1b2...', 'git_dirty': bool}, or both None
when it is not a checkout or git is missing or slow. Dirty means `git status --porcelain` lists anything: modified,
staged or untracked files that .gitignore does not exclude. Each git call has a short timeout, and git takes no
optional locks (GIT_OPTIONAL_LOCKS=0), so a run never blocks or disturbs a concurrent git command.
"""

from __future__ import annotations

import os
import subprocess

import grin_jax

TIMEOUT_SECONDS = 5.0


def package_root() -> str:
    """The directory holding the grin_jax package (the repository root of a checkout)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(grin_jax.__file__)))


def _git(repo: str, *args: str) -> str:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
    result = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
                            env=env, stdin=subprocess.DEVNULL, check=True)
    return result.stdout


def git_provenance(repo: str | None = None) -> dict:
    """{'git_commit': HEAD's full hash or None, 'git_dirty': bool or None} of `repo` (default: package_root())."""
    repo = repo or package_root()
    try:
        top = _git(repo, "rev-parse", "--show-toplevel").strip()
        if os.path.realpath(top) != os.path.realpath(repo):  # the package sits inside some other repository
            return {"git_commit": None, "git_dirty": None}
        commit = _git(repo, "rev-parse", "HEAD").strip()
        dirty = bool(_git(repo, "status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):  # not a checkout, no git, no commit yet, too slow
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}
