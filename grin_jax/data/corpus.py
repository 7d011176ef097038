"""The embedded default corpus: the running interpreter's standard-library source, as a TFDS dataset.

What is in it (decided here, tested in tests/test_data.py):
  * every `*.py` file under `sysconfig.get_paths()['stdlib']`, walked in sorted order;
  * minus directories that are not the library itself or that distributions ship separately:
    `site-packages`, `dist-packages` (third-party code), `test`, `tests`, `idle_test` (the test suites: twice the
    size of the library, full of deliberately odd data, and absent from Debian/Ubuntu's python3.X package),
    `__pycache__`, `lib-dynload`, `config-*` (the build's Makefile);
  * minus `_sysconfigdata_*.py` (the build's compiler flags and install paths: machine-specific).
Documents are stored byte-exact (`text` = the file's bytes, `path` = its path relative to the stdlib root, '/'
separated). On CPython 3.11.7 that is 732 files, 12.1 MB.

Split: a file is in 'validation' when the first 8 bytes of sha256("python_stdlib:" + relative path), read as a
fraction of 2**64, are below `validation_fraction` (default 0.15: 111 files, 1.43 MB on CPython 3.11.7, drawn
from 43 of the stdlib's top-level packages and modules); otherwise in 'train'. The assignment depends only on the
relative path, so it is the same on every machine; the contents depend on the Python build.

Identity: the builder config's name is `py{major}{minor}_{fingerprint}`, where the fingerprint hashes every
(relative path, content) pair and the validation fraction. A different interpreter or a patched stdlib therefore
builds into its own directory instead of silently reusing a stale one. Build time: about 0.3 s.

Written with file_format='array_record' and read with `builder.as_data_source(split)`: no TensorFlow.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import sys
import sysconfig

from absl import logging as absl_logging
import tensorflow_datasets as tfds

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                           "lib-dynload"})
EXCLUDED_DIR_PREFIXES = ("config-",)
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)
SPLIT_SALT = "python_stdlib:"
DEFAULT_VALIDATION_FRACTION = 0.15  # = data.validation_fraction's default (config.py)


def stdlib_root() -> str:
    """The standard-library directory of the running interpreter."""
    return sysconfig.get_paths()["stdlib"]


def list_corpus_files(root: str | None = None) -> list[str]:
    """Relative ('/'-separated) paths of the corpus files under `root`, sorted."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in EXCLUDED_DIRS and not d.startswith(EXCLUDED_DIR_PREFIXES))
        rel_dir = os.path.relpath(dirpath, root)
        for f in sorted(filenames):
            if f.endswith(".py") and not f.startswith(EXCLUDED_FILE_PREFIXES):
                rel = f if rel_dir == "." else os.path.join(rel_dir, f)
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def hash_fraction(key: str, salt: str = SPLIT_SALT) -> float:
    """A deterministic number in [0, 1) from a string (first 8 bytes of sha256)."""
    digest = hashlib.sha256((salt + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_validation(relpath: str, validation_fraction: float, salt: str = SPLIT_SALT) -> bool:
    return hash_fraction(relpath, salt) < validation_fraction


def split_files(files: list[str], validation_fraction: float) -> dict[str, list[str]]:
    val = [f for f in files if is_validation(f, validation_fraction)]
    vs = set(val)
    return {"train": [f for f in files if f not in vs], "validation": val}


def corpus_fingerprint(root: str, files: list[str], validation_fraction: float) -> str:
    h = hashlib.sha256(f"v1 fraction={validation_fraction!r}\n".encode())
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            content = f.read()
        h.update(rel.encode("utf-8") + b"\0" + hashlib.sha256(content).digest())
    return h.hexdigest()


@dataclasses.dataclass(kw_only=True)
class PythonStdlibConfig(tfds.core.BuilderConfig):
    root: str = ""
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    files: tuple[str, ...] = ()


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
    """The Python standard library's source files, one document per file. Build with `python_stdlib_builder`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version: *.py files of the stdlib, tests and site-packages excluded."}
    # No downloads, so no checksums file. tfds derives a builder's code path (only to look for checksums.tsv)
    # through `importlib_resources`, which etils >= 1.13 no longer installs; pinning the path here avoids it.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        files = list(cfg.files) or list_corpus_files(cfg.root)
        splits = split_files(files, cfg.validation_fraction)
        self.info.metadata.update({
            "python_version": sys.version.split()[0],
            "root": cfg.root,
            "validation_fraction": cfg.validation_fraction,
            "num_files": {k: len(v) for k, v in splits.items()},
            "num_bytes": {k: sum(os.path.getsize(os.path.join(cfg.root, f)) for f in v) for k, v in splits.items()},
        })
        return {k: self._generate_examples(v) for k, v in splits.items()}

    def _generate_examples(self, files):
        root = self.builder_config.root
        for rel in files:
            with open(os.path.join(root, rel), "rb") as f:
                yield rel, {"text": f.read(), "path": rel}


@contextlib.contextmanager
def _quiet_tfds():
    """Silence tfds's 'Using custom data configuration' warning and its progress bars."""
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)
        tfds.display_progress_bar(True)


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive advisory lock (several processes / test workers building into one data_dir)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def python_stdlib_builder(data_dir: str, *, validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                          root: str | None = None, prepare: bool = True) -> PythonStdlib:
    """The builder for this interpreter's stdlib corpus, built into `data_dir` on first use and reused after.

    `root` overrides the stdlib directory (tests build from a small directory of their own).
    """
    root = os.path.abspath(root or stdlib_root())
    files = list_corpus_files(root)
    if not files:
        raise FileNotFoundError(f"no *.py files under {root!r} to build the python_stdlib corpus from")
    fp = corpus_fingerprint(root, files, validation_fraction)
    v = sys.version_info
    config = PythonStdlibConfig(name=f"py{v.major}{v.minor}_{fp[:12]}", root=root,
                                validation_fraction=validation_fraction, files=tuple(files),
                                description=f"stdlib of Python {v.major}.{v.minor} at {root}")
    with _quiet_tfds():
        builder = PythonStdlib(data_dir=data_dir, config=config, file_format="array_record")
        if prepare and not builder.is_prepared():
            with file_lock(os.path.join(data_dir, "python_stdlib", ".build.lock")):
                builder.download_and_prepare()
    return builder
