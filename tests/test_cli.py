"""grin_jax.cli.run_main: every command-line entry point answers a user error in one line with an exit status, a
bug with its traceback, and everything with its traceback under GRIN_JAX_DEBUG=1."""

import contextlib
import errno
import os
import subprocess
import sys

import pytest

from grin_jax.cli import DEBUG_ENV, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def _raising(error):
    def main(argv):
        raise error
    return main


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_a_full_disk_is_one_line_naming_the_file(capsys):
    error = OSError(errno.ENOSPC, "No space left on device", "/x/y/metrics.jsonl")
    assert run_main(_raising(error)) == 1
    (line,) = _lines(capsys.readouterr().err)
    assert line.startswith("error: the disk is full") and "/x/y/metrics.jsonl" in line

    def wrapped(argv):  # a library that wraps the OSError (a checkpoint writer, say)
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/0005")
        except OSError as cause:
            raise RuntimeError("save failed\n" + "\n".join(f"thread {i} failed" for i in range(1000))) from cause
    assert run_main(wrapped) == 1
    (line,) = _lines(capsys.readouterr().err)
    assert "disk is full" in line and "/ckpt/0005" in line
    assert run_main(_raising(OSError(errno.EROFS, "Read-only file system", "/ro"))) == 1
    assert "read-only" in capsys.readouterr().err


@pytest.mark.parametrize("error,status,needle", [
    (ValueError("model.d_model=-3 is invalid:\naccepted values are integers >= 1"), 2,
     "error: model.d_model=-3 is invalid:; accepted values are integers >= 1"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/no/such"), 2,
     "error: No such file or directory: /no/such"),
    (FileExistsError("--out /o is not empty"), 2, "error: --out /o is not empty"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 2, "Permission denied: /root/x"),
    (KeyboardInterrupt(), 130, "error: interrupted"),
])
def test_user_errors_are_one_line_with_an_exit_status(error, status, needle, capsys):
    assert run_main(_raising(error)) == status
    err = capsys.readouterr().err
    assert _lines(err)[0] == needle if needle.startswith("error:") else needle in err
    assert len(_lines(err)) <= 2  # the message, and where it came from outside grin_jax, the GRIN_JAX_DEBUG hint


def test_a_long_message_is_cut_and_the_return_value_is_the_status(capsys):
    assert run_main(_raising(ValueError("x" * 100_000))) == 2
    (line, *rest) = _lines(capsys.readouterr().err)
    assert len(line) < 1000 and "more characters" in line and len(rest) <= 1
    assert run_main(lambda argv: 3) == 3
    assert run_main(lambda argv: None) == 0
    assert run_main(lambda argv: {"fit": 1}) == 0  # fit.main returns its result
    assert run_main(lambda argv: list(argv), ["a"]) == 0


def test_non_finite_loss_and_a_locked_workdir_are_user_errors(capsys):
    from grin_jax.train.lock import WorkdirInUseError
    from grin_jax.train.trainer import NonFiniteLossError
    assert run_main(_raising(NonFiniteLossError("train loss is nan at step 3; lower train.learning_rate"))) == 1
    assert _lines(capsys.readouterr().err) == ["error: train loss is nan at step 3; lower train.learning_rate"]
    assert run_main(_raising(WorkdirInUseError("/w is in use by process 1"))) == 2
    assert _lines(capsys.readouterr().err)[0] == "error: /w is in use by process 1"


@pytest.mark.parametrize("error", [RuntimeError("a bug"), KeyError("k"), TypeError("a bug"),
                                   OSError(errno.EIO, "Input/output error")])
def test_bugs_keep_their_traceback(error):
    with pytest.raises(type(error)):
        run_main(_raising(error))


def test_debug_environment_variable_reraises(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="d_model"):
        run_main(_raising(ValueError("model.d_model=-3 is invalid")))
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert run_main(_raising(ValueError("model.d_model=-3 is invalid"))) == 2


def test_params_and_sample_answer_user_errors_in_one_line(tmp_path, capsys):
    from grin_jax.params import main as params_main
    from grin_jax.sample import main as sample_main
    assert params_main(["params", f"--config={REPO}/configs/grin_tiny.py:nonsense"]) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert line.startswith("error: ") and "config variant 'nonsense' is unknown" in line
    assert params_main(["params", f"--config={tmp_path}/missing.py"]) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert "the config file does not load" in line and "missing.py" in line
    assert params_main(["params", f"--config={REPO}/configs/grin_tiny.py:smoke", "--config.model.nope=1"]) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert "config.model.nope" in line
    assert sample_main(["sample", f"--workdir={tmp_path / 'never_trained'}"]) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert line.startswith("error: No such file or directory: ") and "never_trained" in line


def test_a_module_cli_answers_in_one_line_and_shows_the_traceback_under_debug():
    """python -m grin_jax.scaling.optimal (main raises ValueError; `__main__` goes through run_main)."""
    args = [sys.executable, "-m", "grin_jax.scaling.optimal", "--flops", "-1"]
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    plain = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and _lines(plain.stderr) == ["error: --flops=-1.0: expected positive FLOP budgets"]
    debug = subprocess.run(args, cwd=REPO, env={**env, DEBUG_ENV: "1"}, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "ValueError: --flops=-1.0" in debug.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_the_metric_writer_names_metrics_jsonl(tmp_path, capsys):
    """Writing to an open file on a full disk raises ENOSPC without a file name; the writer adds its path."""
    from grin_jax.train.metrics import MetricWriter
    writer = MetricWriter(str(tmp_path), tensorboard=False)
    writer._file.close()
    writer._file = open("/dev/full", "w")  # every flush: OSError ENOSPC
    try:
        assert run_main(lambda argv: writer.write(1, {"train/loss": 1.0})) == 1
    finally:
        with contextlib.suppress(OSError):
            writer._file.close()  # the buffered record cannot be flushed either
    (line,) = _lines(capsys.readouterr().err)
    assert line.startswith("error: the disk is full writing ") and line.count("metrics.jsonl") == 1
    assert str(tmp_path) in line
