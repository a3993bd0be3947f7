"""Checksums of checkpoint files, and agreement between ranks on what failed.

Design
------
A run checkpoint (:mod:`.run_checkpoint`) records, in its ``metadata.json``,
the size and SHA-256 of every file it holds: the per-rank state files
(``files``), the weights written with megatron's ``dist_checkpointing``
(``model_dist_files``, relative to ``model_dist/``) and files rank 0 adds
before the commit, such as ``distill_model.json`` (``extra_files``). A check
compares sizes (cheap: :func:`check_records` with ``deep=False``) or sizes
and checksums (``deep=True``).

Verifying is shared out: with ``world`` ranks, rank ``r`` hashes the files whose
index in the sorted list is ``r`` modulo ``world`` (:func:`share`), so every
file is read once, in parallel.

Every function that can fail on one rank and not on another ends in an
agreement: :func:`agree_errors` gathers each rank's error (or None) on every
rank, so all ranks take the same branch before anyone enters the next
collective. A rank that raised while the others wait in a collective is the
hang this module exists to prevent.

Usage::

    records = file_records(step_dir / "model_dist", names)        # at save
    problem = check_records(step_dir / "model_dist", records, deep=True, only=share(sorted(records), r, w))
    errors = agree_errors(problem and f"rank {r}: {problem}")     # collective
    verify_model_dist("/ckpt/step_000100")                        # before loading model_dist/ (collective)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch.distributed as dist

from distill_plugins.errors import DistillError

__all__ = ["METADATA", "MODEL_DIST", "sha256_file", "file_records", "check_records", "share", "agree_errors",
           "rank_world", "run_checkpoint_of", "verify_model_dist"]

#: the completion marker of a run checkpoint (megatron's model_dist/ holds its own, different, metadata.json)
METADATA = "metadata.json"
#: the subdirectory holding the weights in megatron dist_checkpointing format
MODEL_DIST = "model_dist"

PathLike = Union[str, Path]


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_records(root: PathLike, names: Iterable[str], *, checksum: bool = True) -> dict[str, dict[str, Any]]:
    """``{name: {"size": bytes, "sha256": hex or None}}`` for files ``names`` under ``root``."""
    root = Path(root)
    return {name: {"size": (root / name).stat().st_size, "sha256": sha256_file(root / name) if checksum else None}
            for name in names}


def check_records(root: PathLike, records: dict[str, dict[str, Any]], *, deep: bool,
                  only: Optional[Iterable[str]] = None, label: str = "") -> Optional[str]:
    """Why the files under ``root`` differ from ``records``, or None.

    Args:
        root: directory the names are relative to.
        records: :func:`file_records` output saved in the metadata.
        deep: also compare SHA-256 checksums (sizes are always compared).
        only: check these names only (a rank's :func:`share`); default all.
        label: prefix for names in the message (``"model_dist/"``).
    """
    root = Path(root)
    names = sorted(records) if only is None else list(only)
    for name in names:
        info = records[name]
        f = root / name
        if not f.is_file():
            return f"missing {label}{name}"
        size = f.stat().st_size
        if size != info["size"]:
            return f"{label}{name} has {size} bytes, expected {info['size']}"
        if deep and info.get("sha256") and sha256_file(f) != info["sha256"]:
            return f"{label}{name} checksum mismatch (the file is corrupted)"
    return None


def share(names: Sequence[str], rank: int, world: int) -> list[str]:
    """The names rank ``rank`` of ``world`` verifies: every ``world``-th of the sorted list, from ``rank``."""
    return sorted(names)[rank::world]


def rank_world(group=None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``, ``(0, 1)`` without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def agree_errors(error: Optional[str], group=None) -> list[str]:
    """Every rank's error message (None entries dropped), on every rank. Collective over ``group``.

    Call it on every rank at the same point, whatever happened locally; ranks
    then raise, or go on, together.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [error] if error else []
    out: list[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, error, group=group)
    return [e for e in out if e]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_checkpoint_of(path: PathLike) -> Optional[Path]:
    """The run checkpoint (``step_N/``) that ``path`` is, or whose ``model_dist/`` it is; else None.

    A run checkpoint's ``metadata.json`` has ``format_version`` and ``files``;
    megatron's own ``metadata.json`` (inside ``model_dist/``) has neither.
    """
    path = Path(path)
    for candidate in (path, path.parent if path.name == MODEL_DIST else None):
        if candidate is None:
            continue
        meta = _read_json(candidate / METADATA)
        if meta is not None and "format_version" in meta and "files" in meta:
            return candidate
    return None


def verify_model_dist(path: PathLike, group=None) -> None:
    """Check the ``model_dist/`` files of a run checkpoint against their recorded checksums. Collective.

    ``path`` is a run checkpoint or its ``model_dist/``; anything else (a plain
    ``dist_checkpointing`` directory, a checkpoint written before checksums were
    recorded) has nothing to verify. With torch.distributed initialised each
    rank hashes its :func:`share` of the files and the ranks agree.

    Raises:
        DistillError: on every rank, when a file is missing, truncated or corrupted on any rank.
    """
    step_dir = run_checkpoint_of(path)
    if step_dir is None:
        return
    meta = _read_json(step_dir / METADATA) or {}
    records = meta.get("model_dist_files") or {}
    rank, world = rank_world(group)
    problem = check_records(step_dir / (meta.get("model_dist") or MODEL_DIST), records, deep=True,
                            only=share(list(records), rank, world), label=f"{MODEL_DIST}/") if records else None
    errors = agree_errors(problem, group)
    if errors:
        raise DistillError(f"checkpoint {step_dir}: {'; '.join(sorted(set(errors)))}; its weights cannot be used "
                           "(use an older checkpoint of the run)")
