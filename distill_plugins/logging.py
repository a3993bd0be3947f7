"""Rank-aware logging: the library never prints.

``get_logger(name)`` returns a standard logger under ``distill_plugins``. By
default only global rank 0 emits INFO; every rank emits WARNING and above,
prefixed with its rank. ``DISTILL_LOG_ALL_RANKS=1`` lets every rank log INFO.
"""

from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist

_CONFIGURED = False


def global_rank() -> int:
    """This process's rank from torch.distributed, else RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = global_rank()
        record.rank = rank
        if rank == 0 or os.environ.get("DISTILL_LOG_ALL_RANKS") == "1":
            return True
        return record.levelno >= logging.WARNING


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (so redirection and capture work)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Install the rank-aware handler on the ``distill_plugins`` logger (idempotent)."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    handler = _StderrHandler()
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter("[%(asctime)s rank%(rank)s %(levelname)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger("distill_plugins")
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    """A logger under ``distill_plugins``; call :func:`configure_logging` once in entry points."""
    if not name.startswith("distill_plugins"):
        name = f"distill_plugins.{name}"
    return logging.getLogger(name)
