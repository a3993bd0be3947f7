"""Atomic, resumable training checkpoints: one ``torch.save`` file per rank, agreed on by every rank.

Design
------
Exact resume for the same parallel layout is the job: every global rank
writes the state it holds (its shard of the student's weights, its optimizer
state, the scheduler, its RNG states, the data position and the state of every
stateful plugin) to its own file. Nothing is gathered, so a save costs one
local write per rank and works the same under gloo and NCCL. Changing TP/PP/DP
between save and resume needs resharding, which per-rank files cannot do: for
that, pass ``sharded_model_state`` (a megatron ``sharded_state_dict()``) and
the weights are also written with megatron's ``dist_checkpointing``
(synchronous, no writer process) into ``model_dist/``, loadable under any layout.

Layout on disk::

    <dir>/step_000010/
        metadata.json        written last by rank 0: the completion marker, with every file's size and SHA-256
        rank_00000.pt        {"model", "optimizer", "scheduler", "rng", "data", "parts", "extra", ...}
        rank_00001.pt
        distill_model.json   optional, written by rank 0 before the commit (``before_commit``)
        model_dist/          only with sharded_model_state
    <dir>/step_000020.tmp-1a2b3c4d/      a save in progress, or one that failed or was interrupted
    <dir>/step_000030.unloadable-5e6f7a8b/  a checkpoint that failed its checks, moved aside, never deleted

No rank waits for a rank that failed. A save is a sequence of phases; each
phase runs on every rank, catches any error (torch's ``CheckpointException``
included), and ends with every rank learning every rank's outcome
(:func:`~.integrity.agree_errors`). When any rank failed, every rank raises the
same :class:`~distill_plugins.errors.DistillError` ("checkpoint ... was not
saved (...); the previous checkpoint is intact") before anyone enters the next
collective. The phases:

1. *prepare*: every rank creates the temporary directory, writes and removes a
   probe file there (and in ``model_dist/``), and checks that the file system
   has room for what all ranks will write and that the file-size limit
   (``ulimit -f``) allows this rank's file. A read-only or full disk fails here,
   before anything is written.
2. *write*: every rank writes ``rank_NNNNN.pt`` (``.partial``, fsync, rename) and its SHA-256.
3. *model_dist* (with ``sharded_model_state``): megatron's save, step by step
   (validate, ``common.pt`` on rank 0, plan, write, finalize, ``metadata.json``
   on rank 0), each step agreed; then every rank hashes its share of the
   written files (:func:`~.integrity.share`).
4. *commit* (rank 0): ``before_commit(tmp)``, ``metadata.json`` (fsync), rename
   ``step_N.tmp-<id>`` to ``step_N``.

A crash at any point before the rename leaves a ``.tmp-`` directory that
:func:`find_latest_checkpoint` skips, so the previous checkpoint stays the one
resumed from. After the rename rank 0 deletes loadable checkpoints older than
the new one beyond the newest ``keep`` and stale ``.tmp-`` directories. A
checkpoint that fails its checks is never deleted or overwritten: a save of
the same step moves it aside (``.unloadable-``). All ranks must see the same
file system (as on any cluster with a shared scratch).

Resume (:func:`resolve_resume`) is agreed too: each rank checks the sizes of
every file, the checksum of its own rank file and of its share of
``model_dist/``; a checkpoint is used only when it passes on every rank, else
every rank falls back to the next older one. When checkpoints exist but none
passes, the run refuses to start (``checkpoint.resume: none`` starts from
scratch beside them).

Usage (engine)::

    save_checkpoint(ckpt_dir, step, model_state=model[0].state_dict(),
                    optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                    data_state=train_iter.state_dict(), parts_state={"selector": sel.state_dict()},
                    layout={"tp": 2, "pp": 2, "dp": 1}, keep=recipe.checkpoint.keep)

    path = resolve_resume(recipe.checkpoint.resume, ckpt_dir)      # auto | none | path; collective
    if path:
        ck = load_checkpoint(path, layout={"tp": 2, "pp": 2, "dp": 1}, verify=False)  # verified above
        model[0].load_state_dict(ck.model_state); ...

Files are read with ``torch.load(weights_only=False)`` (they hold Python and
NumPy RNG states): load only checkpoints you wrote.
"""

from __future__ import annotations

import errno
import importlib.metadata as md
import json
import os
import random
import re
import resource
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from distill_plugins.checkpoint.integrity import (METADATA, MODEL_DIST, agree_errors, check_records, file_records,
                                                  rank_world, share, sha256_file, verify_model_dist)
from distill_plugins.errors import DistillError
from distill_plugins.logging import get_logger

__all__ = ["save_checkpoint", "load_checkpoint", "load_dist_model_state", "resolve_resume", "find_latest_checkpoint",
           "list_checkpoints", "prune_checkpoints", "validate_checkpoint", "read_metadata", "checkpoint_directory",
           "check_writable", "capture_rng_state", "restore_rng_state", "step_dirname", "rank_filename", "Checkpoint",
           "METADATA", "MODEL_DIST", "FORMAT_VERSION"]

log = get_logger(__name__)

PathLike = Union[str, os.PathLike]
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^step_(\d+)\.(tmp|old)-[0-9a-f]+$")
#: headroom added to the estimated bytes of a save (pickle overhead, dist_checkpointing metadata)
_SLACK_BYTES = 1 << 20


def step_dirname(step: int) -> str:
    """``step_000010`` for step 10 (zero-padded so names sort by step)."""
    return f"step_{int(step):06d}"


def rank_filename(rank: int) -> str:
    return f"rank_{int(rank):05d}.pt"


# ---------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU, CUDA (if initialised) and megatron's model-parallel tracker RNG states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "cuda": None,
        "megatron_tracker": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "megatron.core.tensor_parallel.random" in sys.modules:
        # megatron-free path: only read when megatron is already in use (importing it costs seconds)
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        states = get_cuda_rng_tracker().get_states()
        state["megatron_tracker"] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in states.items()} or None
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state` (missing entries are left alone)."""
    if state.get("python") is not None:
        random.setstate(state["python"])
    if state.get("numpy") is not None:
        np.random.set_state(state["numpy"])
    if state.get("torch_cpu") is not None:
        torch.set_rng_state(state["torch_cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("megatron_tracker"):
        # megatron-free path: a tracker state exists only when megatron was in use at save time
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(dict(state["megatron_tracker"]))


# ---------------------------------------------------------------------------
# Distributed helpers (no-ops without an initialised process group)
# ---------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast_from_first(obj: Any, group=None) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _all_gather(obj: Any, group=None) -> list:
    if not _distributed():
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe(exc: BaseException, where: Optional[Path] = None) -> str:
    """One line for an exception; torch's CheckpointException lists its ranks' errors; a full disk says so."""
    if isinstance(exc, CheckpointException):
        parts = []
        for rank, failure in sorted(exc.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {rank}: {type(inner).__name__}: {inner}")
        text = "; ".join(parts) or "failed on another rank"
        return f"CheckpointException: {text}"
    text = f"{type(exc).__name__}: {exc}"
    if where is not None and ("unexpected pos" in text or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)):
        free = _free_bytes(where)
        if free is not None:
            text += f" ({_fmt_bytes(free)} free on the checkpoint file system: is the disk full?)"
    return text


def _free_bytes(path: Path) -> Optional[int]:
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class _Phases:
    """Runs the phases of one save on every rank; a failure anywhere raises the same error everywhere."""

    def __init__(self, final: Path, tmp: Path, group, rank: int):
        self.final, self.tmp, self.group, self.rank = final, tmp, group, rank

    def run(self, what: str, fn: Callable[[], Any], *, gather: bool = False) -> Any:
        """``fn()`` on this rank, then agreement; returns its value (every rank's values with ``gather``)."""
        value, error = None, None
        try:
            value = fn()
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            error = f"rank {self.rank}: {what}: {_describe(exc, self.tmp)}"
        if gather:
            pairs = _all_gather((error, value), self.group)
            errors, values = [e for e, _ in pairs if e], [v for _, v in pairs]
        else:
            errors, values = agree_errors(error, self.group), value
        if errors:
            if self.rank == 0:  # nobody writes into it any more: free the space now
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise DistillError(f"checkpoint {self.final} was not saved ({'; '.join(errors)}); "
                               "the previous checkpoint is intact")
        return values


# ---------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------


def save_checkpoint(directory: PathLike, step: int, *, model_state: Any = None, optimizer_state: Any = None,
                    scheduler_state: Any = None, rng_state: Optional[dict] = None, data_state: Any = None,
                    parts_state: Optional[dict] = None, extra: Optional[dict] = None,
                    layout: Optional[dict] = None, keep: Optional[int] = None,
                    sharded_model_state: Optional[dict] = None, checksum: bool = True, group=None,
                    before_commit: Optional[Callable[[Path], None]] = None) -> Path:
    """Write checkpoint ``step`` atomically (collective over ``group``, default world).

    Args:
        directory: the checkpoint root (``checkpoint.dir``); created if missing.
        step: optimizer steps completed; the checkpoint is ``directory/step_{step:06d}``.
        model_state: this rank's student state dict (e.g. ``model[0].state_dict()``; a list for virtual chunks).
        optimizer_state: ``optimizer.state_dict()`` (megatron or torch optimizer).
        scheduler_state: ``scheduler.state_dict()``.
        rng_state: RNG states; default :func:`capture_rng_state` now.
        data_state: the data iterator's ``state_dict()`` (consumed samples).
        parts_state: part name -> ``state_dict()`` of stateful plugins (selectors, temperature policies...).
        extra: any other picklable per-rank data (counters such as skipped steps).
        layout: parallel layout (e.g. ``{"tp": 2, "pp": 2, "dp": 1}``), recorded and checked on load.
        keep: keep only this many newest loadable checkpoints up to this one (None keeps all).
        sharded_model_state: megatron ``sharded_state_dict()``; also save the weights with
            ``dist_checkpointing`` into ``model_dist/`` (layout-independent).
        checksum: record each file's SHA-256 (verified on resume).
        group: process group spanning every rank that holds state (default: world).
        before_commit: called on rank 0 with the temporary directory before the commit, to add files
            (their sizes and checksums are recorded too); a failure aborts the save on every rank.

    Returns:
        The final checkpoint path (on every rank).

    Raises:
        DistillError: on every rank when any rank failed in any phase; nothing is committed and the
            previous checkpoint is intact.
    """
    directory = Path(directory)
    rank, world = rank_world(group)
    final = directory / step_dirname(step)
    tmp = directory / _broadcast_from_first(f"{step_dirname(step)}.tmp-{uuid.uuid4().hex[:8]}" if rank == 0 else None,
                                            group)
    t0 = time.monotonic()
    payload = {
        "format_version": FORMAT_VERSION, "step": int(step), "rank": rank, "world_size": world,
        "model": model_state, "optimizer": optimizer_state, "scheduler": scheduler_state,
        "rng": rng_state if rng_state is not None else capture_rng_state(),
        "data": data_state, "parts": parts_state or {}, "extra": extra or {},
    }
    phases = _Phases(final, tmp, group, rank)
    file_bytes = _state_bytes(payload) + _SLACK_BYTES
    dist_bytes = _sharded_bytes(sharded_model_state) if sharded_model_state is not None else 0
    needs = _all_gather(file_bytes + dist_bytes, group)
    phases.run("prepare", lambda: _prepare(tmp, largest_file=max(file_bytes, dist_bytes), total=sum(needs),
                                           model_dist=sharded_model_state is not None))
    reports = phases.run("write", lambda: _write_rank_file(tmp, rank, payload, checksum), gather=True)
    dist_files: dict[str, dict] = {}
    if sharded_model_state is not None:
        _save_dist(sharded_model_state, tmp / MODEL_DIST, phases, rank)
        for part in phases.run("hash model_dist", lambda: _hash_share(tmp / MODEL_DIST, rank, world, checksum),
                               gather=True):
            dist_files.update(part)
    phases.run("commit", lambda: _commit_on_first(
        tmp, final, step=step, world=world, layout=layout, reports=reports, dist_files=dist_files,
        before_commit=before_commit, checksum=checksum) if rank == 0 else None)
    if rank == 0 and keep is not None:
        try:
            prune_checkpoints(directory, keep, newest=final)
        except OSError as exc:  # the checkpoint is committed; an old one left behind is no reason to fail
            log.warning("could not prune old checkpoints in %s: %s", directory, exc)
    log.info("saved checkpoint %s (%d rank file(s), %.1fs)", final, world, time.monotonic() - t0)
    return final


def _state_bytes(obj: Any) -> int:
    """Bytes of the tensors and arrays in a nested state (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    stack = [obj]
    while stack:
        x = stack.pop()
        if torch.is_tensor(x):
            storage = x.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(x, np.ndarray):
            total += x.nbytes
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def _sharded_bytes(sharded: dict) -> int:
    """Bytes this rank writes for a megatron sharded state dict (main replicas only)."""
    # megatron-free path: per-rank-only saves (tests, the demo evaluation) never import megatron
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    return sum(v.data.numel() * v.data.element_size() for v in nested_values(sharded)
               if isinstance(v, ShardedTensor) and v.data is not None and is_main_replica(v.replica_id))


def _prepare(tmp: Path, *, largest_file: int, total: int, model_dist: bool) -> None:
    """Create the directories; prove they take a file; check room and the file-size limit."""
    dirs = [tmp] + ([tmp / MODEL_DIST] if model_dist else [])
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        with open(probe, "wb") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    free = _free_bytes(tmp)
    if free is not None and free < total:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {_fmt_bytes(free)} free, the save needs "
                                    f"{_fmt_bytes(total)}", str(tmp))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < largest_file:
        raise OSError(errno.EFBIG, f"{os.strerror(errno.EFBIG)}: the file-size limit (ulimit -f) is "
                                   f"{_fmt_bytes(limit)}, this rank writes up to {_fmt_bytes(largest_file)}",
                      str(tmp))


def _write_rank_file(tmp: Path, rank: int, payload: dict, checksum: bool) -> dict:
    name = rank_filename(rank)
    partial = tmp / (name + ".partial")
    with open(partial, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, tmp / name)
    return {"file": name, **file_records(tmp, [name], checksum=checksum)[name]}


def _save_dist(sharded_state: dict, target: Path, phases: _Phases, rank: int) -> None:
    """megatron ``dist_checkpointing.save`` (torch_dist, synchronous), each collective step agreed.

    The steps are those of megatron-core 0.16's ``serialization.save`` and
    ``AsyncRequest.execute_sync``; a failure on one rank between two of megatron's
    collectives (rank 0's ``common.pt`` or ``metadata.json`` on a read-only disk,
    a writer error) would otherwise leave the other ranks waiting in the next one.
    """
    # megatron-free path: per-rank-only saves (tests, the demo evaluation) never import megatron
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.serialization import (get_default_save_common_strategy,
                                                                get_default_save_sharded_strategy)
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    from distill_plugins.models.megatron_ckpt import in_process_results_queue

    strategy = get_default_save_sharded_strategy()
    common = get_default_save_common_strategy()
    sharded, common_state = phases.run("dist_checkpointing validate", lambda: save_preprocess(sharded_state, True))
    phases.run("dist_checkpointing common.pt", lambda: common.save_common(common_state, target))
    # torch_dist writes ShardedObjects itself (megatron's save skips save_sharded_objects for it too)
    with in_process_results_queue():  # a synchronous save needs no writer-manager process
        request = phases.run("dist_checkpointing plan", lambda: strategy.async_save(sharded, target))
        phases.run("dist_checkpointing write", lambda: _run_write(request))
        phases.run("dist_checkpointing finalize", lambda: [fn() for fn in request.finalize_fns])
    phases.run("dist_checkpointing metadata.json", lambda: save_config(
        CheckpointingConfig(strategy.backend, strategy.version), target) if rank == 0 else None)


def _run_write(request) -> None:
    """The local part of megatron's ``AsyncRequest.execute_sync``: stage tensors, write this rank's files."""
    args = list(request.async_fn_args)
    if request.preload_fn:
        args[1] = request.preload_fn()
    if request.async_fn is not None:
        request.async_fn(*args, **request.async_fn_kwargs)


def _hash_share(root: Path, rank: int, world: int, checksum: bool) -> dict:
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return file_records(root, share(names, rank, world), checksum=checksum)


def _commit_on_first(tmp: Path, final: Path, *, step: int, world: int, layout: Optional[dict], reports: list,
                     dist_files: dict, before_commit: Optional[Callable[[Path], None]], checksum: bool) -> None:
    if before_commit is not None:
        before_commit(tmp)
    own = {METADATA, MODEL_DIST} | {r["file"] for r in reports}
    extra_names = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name not in own
                         and not p.name.endswith(".partial"))
    meta = {
        "format_version": FORMAT_VERSION, "step": int(step), "world_size": world, "layout": layout,
        "files": {r["file"]: {"size": r["size"], "sha256": r["sha256"]} for r in reports},
        "model_dist": MODEL_DIST if dist_files else None,
        "model_dist_files": dist_files or None,
        "extra_files": file_records(tmp, extra_names, checksum=checksum) or None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "megatron-core": _version("megatron-core"),
                     "distill-plugins": _version("distill-plugins")},
    }
    _write_metadata(tmp, meta)
    _commit(tmp, final)


def _write_metadata(tmp: Path, meta: dict) -> None:
    """``metadata.json`` (``.partial``, fsync, rename): the completion marker."""
    path = tmp / METADATA
    partial = path.with_suffix(".json.partial")
    with open(partial, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)
    _fsync_dir(tmp)


def _version(dist_name: str) -> Optional[str]:
    try:
        return md.version(dist_name)
    except md.PackageNotFoundError:
        return None


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` directory to ``final``.

    An existing ``final`` that passes a full check (a loadable save of the same
    step) is replaced; one that does not is moved aside to
    ``step_N.unloadable-<id>`` and kept, because the run could not load it.
    If the rename fails, the old ``final`` is put back.
    """
    old = None
    if final.exists():
        problem = validate_checkpoint(final, deep=True)
        if problem is not None:
            aside = final.with_name(f"{final.name}.unloadable-{uuid.uuid4().hex[:8]}")
            os.rename(final, aside)
            log.warning("kept checkpoint %s as %s (%s): it cannot be loaded and is never deleted", final, aside.name,
                        problem)
        else:
            old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(directory: PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every directory named like a committed checkpoint, newest first (not validated)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def prune_checkpoints(directory: PathLike, keep: int, *, newest: Optional[PathLike] = None) -> list[Path]:
    """Delete loadable checkpoints beyond the newest ``keep`` and leftover ``.tmp-``/``.old-`` directories.

    With ``newest`` (the checkpoint just saved), only checkpoints of earlier
    steps count and may go: a later step (left by another run, or one this
    run could not load) is never deleted. Checkpoints that fail
    :func:`validate_checkpoint` (no marker, missing or truncated files) are never deleted. Call on one rank only, with no save in progress. Returns
    what was deleted.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    ckpts = list_checkpoints(directory)
    if newest is not None:
        limit = int(_STEP_RE.match(Path(newest).name).group(1))
        ckpts = [(s, p) for s, p in ckpts if s <= limit]
    valid = [p for _, p in ckpts if validate_checkpoint(p) is None]
    doomed = valid[keep:]
    doomed += [p for p in directory.iterdir() if p.is_dir() and _TMP_RE.match(p.name)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------
# Find, check and load
# ---------------------------------------------------------------------------


def read_metadata(path: PathLike) -> dict:
    """The parsed ``metadata.json`` of a checkpoint directory."""
    return json.loads((Path(path) / METADATA).read_text(encoding="utf-8"))


def validate_checkpoint(path: PathLike, *, deep: bool = False) -> Optional[str]:
    """Why checkpoint ``path`` cannot be loaded, or None if it looks complete.

    Checks the marker, its format, and that every recorded file (rank files,
    ``model_dist/`` files, extra files) exists with its recorded size;
    ``deep=True`` also compares SHA-256 checksums (reads everything).
    """
    path = Path(path)
    marker = path / METADATA
    if not marker.is_file():
        return f"no {METADATA} (the save did not finish)"
    try:
        meta = read_metadata(path)
    except (OSError, ValueError) as exc:
        return f"unreadable {METADATA}: {exc}"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
    files = meta.get("files") or {}
    expected = {rank_filename(r) for r in range(int(meta.get("world_size", 0)))}
    if set(files) != expected:
        return f"{METADATA} lists {len(files)} rank files for world_size {meta.get('world_size')}"
    problem = check_records(path, files, deep=deep) or check_records(path, meta.get("extra_files") or {}, deep=deep)
    if problem:
        return problem
    if meta.get("model_dist"):
        if not (path / meta["model_dist"]).is_dir():
            return f"missing {meta['model_dist']}/"
        return check_records(path / meta["model_dist"], meta.get("model_dist_files") or {}, deep=deep,
                             label=f"{meta['model_dist']}/")
    return None


def _problem_on_this_rank(path: Path, rank: int, world: int) -> Optional[str]:
    """Sizes of every file, checksums of this rank's file and of its share of the other files."""
    problem = validate_checkpoint(path)
    if problem is not None:
        return problem
    meta = read_metadata(path)
    if int(meta["world_size"]) != world:
        return (f"written by {meta['world_size']} ranks, this run has {world} (per-rank checkpoints resume only "
                "with the same parallel layout; its model_dist/ initialises a model under any layout)")
    own = rank_filename(rank)
    problem = check_records(path, meta["files"], deep=True, only=[own])
    if problem is None and meta.get("extra_files"):
        problem = check_records(path, meta["extra_files"], deep=True, only=share(list(meta["extra_files"]), rank, world))
    if problem is None and meta.get("model_dist_files"):
        records = meta["model_dist_files"]
        problem = check_records(path / meta["model_dist"], records, deep=True, only=share(list(records), rank, world),
                                label=f"{meta['model_dist']}/")
    return problem


def check_checkpoint(path: PathLike, group=None) -> list[str]:
    """Every rank's problems with checkpoint ``path`` (empty: loadable everywhere). Collective.

    Each rank compares the sizes of all files, the checksum of its own rank
    file and of its share of the other files (:func:`~.integrity.share`), so
    together the ranks read every file once.
    """
    rank, world = rank_world(group)
    try:
        problem = _problem_on_this_rank(Path(path), rank, world)
    except (OSError, ValueError, KeyError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    return agree_errors(f"rank {rank}: {problem}" if problem else None, group)


def find_latest_checkpoint(directory: PathLike, *, deep: bool = False) -> Optional[Path]:
    """The newest complete checkpoint under ``directory``, or None (this process only, no agreement).

    Incomplete or corrupt ones (no marker, missing or truncated files,
    interrupted ``.tmp-`` saves) are skipped with one warning each.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for p in sorted(directory.iterdir()):
        if p.is_dir() and _TMP_RE.match(p.name) and ".tmp-" in p.name:
            log.warning("skipping %s: an interrupted or failed save (no %s; deleted at the next save)", p, METADATA)
    for _, path in list_checkpoints(directory):
        problem = validate_checkpoint(path, deep=deep)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def resolve_resume(resume: str, directory: PathLike, *, group=None) -> Optional[Path]:
    """The checkpoint to resume from for ``checkpoint.resume``, the same on every rank. Collective.

    * ``auto``: the newest checkpoint under ``directory`` that passes
      :func:`check_checkpoint` on every rank; newer ones that fail are skipped
      with a warning (and kept). When checkpoints exist but none passes: an
      error (the run refuses to start; ``resume: none`` starts from scratch
      beside them). No checkpoint at all: None (fresh start).
    * ``none``: None.
    * a path: that checkpoint (or, for a directory of checkpoints, its newest
      one that passes); an error if it is missing or fails its checks.

    Raises:
        DistillError: on every rank, as above.
    """
    if resume == "none":
        return None
    if resume == "auto":
        return _newest_loadable(Path(directory), what="checkpoint.resume=auto", group=group, required=False)
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise DistillError(f"checkpoint.resume={resume!r}: no such directory (use auto, none or a checkpoint path)")
    if not (path / METADATA).exists() and list_checkpoints(path):
        return _newest_loadable(path, what=f"checkpoint.resume={resume!r}", group=group, required=True)
    errors = check_checkpoint(path, group)
    if errors:
        raise DistillError(f"checkpoint.resume={resume!r} is not a complete checkpoint: {'; '.join(errors)}")
    return path


def _newest_loadable(directory: Path, *, what: str, group, required: bool) -> Optional[Path]:
    if directory.is_dir():
        for p in sorted(directory.iterdir()):
            if p.is_dir() and ".tmp-" in p.name and _TMP_RE.match(p.name):
                log.warning("skipping %s: an interrupted or failed save (no %s; deleted at the next save)", p,
                            METADATA)
    rejected = []
    for _, path in list_checkpoints(directory):
        errors = check_checkpoint(path, group)
        if not errors:
            for bad, why in rejected:
                log.warning("skipped checkpoint %s (%s); resuming from the older %s. The skipped one is kept and "
                            "never overwritten", bad, why, path.name)
            return path
        rejected.append((path, "; ".join(errors)))
    if rejected:
        listing = "; ".join(f"{p.name}: {why}" for p, why in rejected)
        raise DistillError(f"{what}: {directory} holds {len(rejected)} checkpoint(s) and none can be loaded "
                           f"({listing}). Nothing was deleted. Repair or move them, resume from another path, or set "
                           "checkpoint.resume: none to start from scratch beside them (they are kept)")
    if required:
        raise DistillError(f"{what}: no complete checkpoint in it")
    log.info("no checkpoint under %s: starting from scratch", directory)
    return None


@dataclass
class Checkpoint:
    """One rank's view of a loaded checkpoint."""

    path: Path
    step: int
    rank: int
    model_state: Any
    optimizer_state: Any
    scheduler_state: Any
    rng_state: dict
    data_state: Any
    parts_state: dict
    extra: dict
    metadata: dict = field(default_factory=dict)

    @property
    def model_dist_dir(self) -> Optional[Path]:
        """The ``dist_checkpointing`` directory of the weights, if the save wrote one."""
        name = self.metadata.get("model_dist")
        return self.path / name if name else None


def load_checkpoint(path: PathLike, *, rank: Optional[int] = None, layout: Optional[dict] = None,
                    restore_rng: bool = True, verify: bool = True, map_location: Any = "cpu", group=None) -> Checkpoint:
    """Read this rank's file of checkpoint ``path`` (and restore RNG states). Local: no collective.

    Args:
        path: a checkpoint directory (``.../step_000010``).
        rank: which rank file (default: this process's rank in ``group``).
        layout: this run's parallel layout; must equal the saved one if both are given.
        restore_rng: apply the saved RNG states now (:func:`restore_rng_state`).
        verify: compare this rank file's SHA-256 with the metadata (False when
            :func:`resolve_resume` / :func:`check_checkpoint` has just done it).
        map_location: passed to ``torch.load``.

    Raises:
        DistillError: incomplete/corrupt checkpoint, or a different world size or layout.
    """
    path = Path(path)
    problem = validate_checkpoint(path)
    if problem is not None:
        raise DistillError(f"cannot resume from {path}: {problem}")
    meta = read_metadata(path)
    my_rank, world = rank_world(group)
    rank = my_rank if rank is None else rank
    if _distributed() and meta["world_size"] != world:
        raise DistillError(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {world}; "
                           "per-rank checkpoints resume only with the same parallel layout (use the same TP/PP/DP, "
                           "or initialise the weights from its model_dist/ directory when it has one)")
    if layout is not None and meta.get("layout") is not None and dict(meta["layout"]) != dict(layout):
        raise DistillError(f"checkpoint {path} was written with layout {meta['layout']}, this run has {layout}")
    name = rank_filename(rank)
    if verify and meta["files"][name].get("sha256") and sha256_file(path / name) != meta["files"][name]["sha256"]:
        raise DistillError(f"cannot resume from {path}: {name} checksum mismatch (file corrupted)")
    payload = torch.load(path / name, map_location=map_location, weights_only=False)
    if restore_rng and payload.get("rng"):
        restore_rng_state(payload["rng"])
    return Checkpoint(path=path, step=int(payload["step"]), rank=rank, model_state=payload["model"],
                      optimizer_state=payload["optimizer"], scheduler_state=payload["scheduler"],
                      rng_state=payload["rng"], data_state=payload["data"], parts_state=payload["parts"],
                      extra=payload["extra"], metadata=meta)


def load_dist_model_state(checkpoint: Checkpoint, sharded_state_dict: dict, group=None) -> dict:
    """Load the weights saved with ``sharded_model_state`` into ``sharded_state_dict`` (any TP/PP layout).

    The ``model_dist/`` files are first checked against their recorded
    checksums (:func:`~.integrity.verify_model_dist`). Returns the loaded state
    dict (pass it to ``model.load_state_dict``). Collective.
    """
    # megatron-free path: per-rank-only loads (tests, the demo evaluation) never import megatron
    from megatron.core import dist_checkpointing

    if checkpoint.model_dist_dir is None:
        raise DistillError(f"checkpoint {checkpoint.path} has no model_dist/ (saved without sharded_model_state)")
    verify_model_dist(checkpoint.path, group)
    return dist_checkpointing.load(sharded_state_dict, str(checkpoint.model_dist_dir))


# ---------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------


def checkpoint_directory(recipe) -> Path:
    """``checkpoint.dir`` of a recipe, defaulting to ``<output_dir>/checkpoints``."""
    return Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else Path(recipe.output_dir) / "checkpoints"


def check_writable(directories: Iterable[tuple[str, PathLike]]) -> None:
    """Create each directory and prove it takes a file; this process only.

    Args:
        directories: ``(recipe key, path)`` pairs, e.g. ``[("output_dir", "runs/x")]``.

    Raises:
        DistillError: naming the key, the path and the OS error (read-only file system,
            permission denied, a file in the way...).
    """
    for key, path in directories:
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            with open(probe, "wb") as fh:
                fh.write(b"ok")
            probe.unlink()
        except OSError as exc:
            raise DistillError(f"{key}={str(path)!r} is not writable ({exc}); choose a directory this job can "
                               "write to") from exc
