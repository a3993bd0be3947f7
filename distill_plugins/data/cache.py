"""The on-disk cache shared by corpora, tokenizers and indexed datasets.

Design: everything derived from data the machine already has (the embedded
corpus, tokenizers trained on it, its indexed datasets) is built once and kept
under one directory, ``$DISTILL_CACHE`` or ``~/.cache/distill_plugins``. Every
file is written to a temporary name and renamed into place, so a reader never
sees half a file; builders take an exclusive ``flock`` on a lock file so two
processes on one machine (two ranks, two test workers) never build the same
thing at once: the second waits, then finds the result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

#: Environment variable overriding the cache directory.
CACHE_ENV = "DISTILL_CACHE"


def cache_dir() -> Path:
    """The cache root: ``$DISTILL_CACHE`` if set, else ``~/.cache/distill_plugins``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distill_plugins"


@contextlib.contextmanager
def file_lock(path: PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; cached files are meant to be shared
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: PathLike, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def embedded_cache_key(name: str, version: int, include: Optional[Sequence[str]] = None) -> str:
    """The cache folder name of an embedded dataset built from this Python's standard library.

    ``<name>-py<X.Y.Z>-v<version>``, plus ``-subset-<10 hex>`` (SHA-256 of the module list) when only
    ``include``'d modules are read: a new Python, a new builder version or another subset is another folder.
    """
    key = f"{name}-py{'.'.join(map(str, sys.version_info[:3]))}-v{version}"
    if include is not None:
        key += "-subset-" + hashlib.sha256("\n".join(include).encode()).hexdigest()[:10]
    return key
