"""How every command-line entry point answers errors: a user error in one line, a bug with its traceback.

    def main(argv=None) -> int:
        return run_main(_main, argv)     # _main(argv) -> int | None (None, or any non-int: exit status 0)

A user error prints `error: <message>` on one line to stderr (newlines in the message become '; ', a very long one
is cut) and gives an exit status:
  2    ValueError (a config or argument mistake: the message names the key), FileNotFoundError, FileExistsError,
       NotADirectoryError, IsADirectoryError, PermissionError, absl flag errors, a --config file that does not
       load, and a workdir another trainer holds (grin_jax.train.lock.WorkdirInUseError)
  1    the disk is full, read-only or over quota (OSError ENOSPC / EROFS / EDQUOT, also as the cause of another
       exception; the message names the file), and a training loss that became NaN or infinite
       (grin_jax.train.NonFiniteLossError)
  130  KeyboardInterrupt (Ctrl-C)
When such an error was raised outside grin_jax's own code (whose messages name their key or path), a second line
says how to see the traceback. Any other exception is a bug and keeps its traceback; so does every error when the
environment variable GRIN_JAX_DEBUG is set (to anything but '', '0', 'false' or 'no'). SystemExit (argparse's usage
errors, an explicit exit status) passes through.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Sequence

DEBUG_ENV = "GRIN_JAX_DEBUG"
MAX_MESSAGE_CHARS = 800

_PATH_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)
_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                errno.EDQUOT: "the disk quota is exceeded"}
# grin_jax's own user errors that are not ValueErrors, looked up only in modules already imported (nothing else
# can have raised them), so a CLI imports nothing for them: (module, class name, exit status).
_PACKAGE_ERRORS = (("grin_jax.train.trainer", "NonFiniteLossError", 1),
                   ("grin_jax.train.lock", "WorkdirInUseError", 2))
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """main(argv) -> its exit status (an int; None or any other value: 0); a user error -> one line on stderr and
    its exit status (module docstring); a bug, or any error with GRIN_JAX_DEBUG set, raises as it was."""
    try:
        result = main(argv)
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - classified below; everything else is re-raised
        code = exit_status(error)
        if code is None or debug_enabled():
            raise
        print(f"error: {error_message(error)}", file=sys.stderr)
        if (code == 2 and not _is_flag_error(error) and not _is_config_file_error(error)
                and _raised_outside_package(error)):
            print(f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.stderr.flush()
        return code
    return result if isinstance(result, int) else 0


def exit_status(error: BaseException) -> int | None:
    """The exit status of a user error; None for anything else (a bug: keep the traceback)."""
    if isinstance(error, KeyboardInterrupt):
        return 130
    if _disk_error(error) is not None:
        return 1
    if isinstance(error, _PATH_ERRORS) or _is_flag_error(error) or _is_config_file_error(error):
        return 2
    for module_name, class_name, code in _PACKAGE_ERRORS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None and isinstance(error, cls):
            return code
    return None


def error_message(error: BaseException) -> str:
    """The error as one line: newlines become '; ', a very long message is cut (GRIN_JAX_DEBUG=1 shows it all)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    disk = _disk_error(error)
    if disk is not None:
        where = f" writing {_paths(disk)}" if disk.filename is not None else ""
        text = f"{_DISK_ERRNOS[disk.errno]}{where} ({disk.strerror or os.strerror(disk.errno)})"
    elif _is_config_file_error(error):  # 'Configuration is not available ... Attempted ...' over several lines
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        text = f"the config file does not load: {lines[-1] if lines else type(error).__name__}"
    elif isinstance(error, OSError) and error.errno is not None and error.filename is not None:
        text = f"{error.strerror}: {_paths(error)}"  # not '[Errno 2] No such file or directory: ...'
    else:
        text = str(error) or type(error).__name__
    if "Traceback (most recent call last):" in text:  # ml_collections puts a config file's traceback in its message
        head, _, trace = text.partition("Traceback (most recent call last):")
        lines = [line for line in trace.splitlines() if line.strip()]
        text = " ".join(part for part in (head.strip(), lines[-1].strip() if lines else "") if part)
    text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    if len(text) > MAX_MESSAGE_CHARS:
        cut = len(text) - MAX_MESSAGE_CHARS
        text = f"{text[:MAX_MESSAGE_CHARS]} ... [{cut:,} more characters: set {DEBUG_ENV}=1 to see them]"
    return text


def _paths(error: OSError) -> str:
    paths = [os.fsdecode(p) for p in (error.filename, error.filename2) if p is not None]
    return " -> ".join(paths)


def _disk_error(error: BaseException) -> OSError | None:
    """The OSError ENOSPC / EROFS / EDQUOT that is `error` or caused it (a library may wrap it), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def _is_flag_error(error: BaseException) -> bool:
    """absl's flag parsing errors and app.UsageError (only if absl was imported: nothing else raises them)."""
    flags = sys.modules.get("absl.flags")
    app = sys.modules.get("absl.app")
    return ((flags is not None and isinstance(error, flags.Error))
            or (app is not None and isinstance(error, app.UsageError)))


def _is_config_file_error(error: BaseException) -> bool:
    """The OSError ml_collections' config_flags raises when a --config file does not load (no errno to go by)."""
    return isinstance(error, OSError) and "config_flags" in _innermost_file(error).replace(os.sep, "/").split("/")


def _innermost_file(error: BaseException) -> str:
    tb = error.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename)


def _raised_outside_package(error: BaseException) -> bool:
    """True when the innermost Python frame of the traceback is not grin_jax's: a message written for users names
    its key or path; one from a library (a shape error in JAX, say) may need the traceback to be understood."""
    where = _innermost_file(error)
    return bool(where) and not where.startswith(_PACKAGE_DIR + os.sep)
