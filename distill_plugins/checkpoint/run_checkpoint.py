"""Atomic, resumable training checkpoints: one ``torch.save`` file per rank.

Design. Exact resume for the same parallel layout is the job: every global
rank writes the state it holds (its shard of the student's weights, its
optimizer state, the scheduler, its RNG states, the data position and the
state of every stateful plugin) to its own file. Nothing is gathered, so a
save costs one local write per rank and works the same under gloo and NCCL.
Changing TP/PP/DP between save and resume needs resharding, which per-rank
files cannot do: for that, pass ``sharded_model_state`` (a megatron
``sharded_state_dict()``) and the weights are also written with
``megatron.core.dist_checkpointing`` (synchronous save, no writer process)
into ``model_dist/`` of the same checkpoint, loadable under any layout.

Layout on disk::

    <dir>/step_000010/
        metadata.json        written last by rank 0: the completion marker
        rank_00000.pt        {"model", "optimizer", "scheduler", "rng", "data", "parts", "extra", ...}
        rank_00001.pt
        model_dist/          only with sharded_model_state
    <dir>/step_000020.tmp-1a2b3c4d/   a save in progress (or interrupted)

Atomicity. All ranks write into ``step_N.tmp-<id>/``; each reports its file
name, size and SHA-256 to rank 0; only if every rank succeeded does rank 0
write ``metadata.json`` (with that list) and rename the directory to
``step_N/``. A crash at any point before the rename leaves a ``.tmp-``
directory that :func:`find_latest_checkpoint` skips (with a warning), so the
previous checkpoint stays the one resumed from. After the rename rank 0
deletes complete checkpoints beyond the newest ``keep`` and stale ``.tmp-``
directories. All ranks must see the same file system (as on any cluster with
a shared scratch).

Usage (engine)::

    save_checkpoint(ckpt_dir, step, model_state=model[0].state_dict(),
                    optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                    data_state=train_iter.state_dict(), parts_state={"selector": sel.state_dict()},
                    layout={"tp": 2, "pp": 2, "dp": 1}, keep=recipe.checkpoint.keep)

    path = resolve_resume(recipe.checkpoint.resume, ckpt_dir)      # auto | none | path
    if path:
        ck = load_checkpoint(path, layout={"tp": 2, "pp": 2, "dp": 1})   # also restores RNG states
        model[0].load_state_dict(ck.model_state); optimizer.load_state_dict(ck.optimizer_state)
        scheduler.load_state_dict(ck.scheduler_state); train_iter.load_state_dict(ck.data_state)

Files are read with ``torch.load(weights_only=False)`` (they hold Python and
NumPy RNG states): load only checkpoints you wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from distill_plugins.errors import DistillError
from distill_plugins.logging import get_logger

log = get_logger(__name__)

PathLike = Union[str, os.PathLike]
FORMAT_VERSION = 1
METADATA = "metadata.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^step_(\d+)\.(tmp|old)-[0-9a-f]+$")


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
    # Only when megatron is already in use: importing it here would cost seconds for nothing.
    if "megatron.core.tensor_parallel.random" in sys.modules:
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
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(dict(state["megatron_tracker"]))


# ---------------------------------------------------------------------------
# Distributed helpers (all no-ops without an initialised process group)
# ---------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_world(group=None) -> tuple[int, int]:
    dist = _dist()
    if dist is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _broadcast_from_first(obj: Any, group=None) -> Any:
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _gather_to_first(obj: Any, group=None) -> Optional[list]:
    dist = _dist()
    if dist is None:
        return [obj]
    rank, world = _rank_world(group)
    out = [None] * world if rank == 0 else None
    dst = dist.get_global_rank(group, 0) if group is not None else 0
    dist.gather_object(obj, out, dst=dst, group=group)
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------


def save_checkpoint(directory: PathLike, step: int, *, model_state: Any = None, optimizer_state: Any = None,
                    scheduler_state: Any = None, rng_state: Optional[dict] = None, data_state: Any = None,
                    parts_state: Optional[dict] = None, extra: Optional[dict] = None,
                    layout: Optional[dict] = None, keep: Optional[int] = None,
                    sharded_model_state: Optional[dict] = None, checksum: bool = True, group=None) -> Path:
    """Write this rank's part of checkpoint ``step`` atomically (collective over ``group``, default world).

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
        keep: keep only this many newest complete checkpoints (None keeps all).
        sharded_model_state: megatron ``sharded_state_dict()``; also save the weights with
            ``dist_checkpointing`` into ``model_dist/`` (layout-independent).
        checksum: record each file's SHA-256 (verified by :func:`load_checkpoint`).
        group: process group spanning every rank that holds state (default: world).

    Returns:
        The final checkpoint path (on every rank).

    Raises:
        DistillError: some rank failed to write (the checkpoint is not committed).
    """
    directory = Path(directory)
    rank, world = _rank_world(group)
    final = directory / step_dirname(step)
    tmp_name = _broadcast_from_first(f"{step_dirname(step)}.tmp-{uuid.uuid4().hex[:8]}" if rank == 0 else None, group)
    tmp = directory / tmp_name
    t0 = time.monotonic()
    report: dict[str, Any]
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        payload = {
            "format_version": FORMAT_VERSION, "step": int(step), "rank": rank, "world_size": world,
            "model": model_state, "optimizer": optimizer_state, "scheduler": scheduler_state,
            "rng": rng_state if rng_state is not None else capture_rng_state(),
            "data": data_state, "parts": parts_state or {}, "extra": extra or {},
        }
        name = rank_filename(rank)
        partial = tmp / (name + ".partial")
        with open(partial, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, tmp / name)
        report = {"ok": True, "file": name, "size": (tmp / name).stat().st_size,
                  "sha256": _sha256(tmp / name) if checksum else None}
    except Exception as exc:  # reported to rank 0 so no rank commits a partial checkpoint
        report = {"ok": False, "error": f"rank {rank}: {type(exc).__name__}: {exc}"}
    if sharded_model_state is not None:
        report = _save_dist(sharded_model_state, tmp, report, group)
    reports = _gather_to_first(report, group)
    outcome: Optional[str] = None
    if rank == 0:
        failures = [r["error"] for r in reports if not r["ok"]]
        if failures:
            outcome = "; ".join(failures)
        else:
            try:
                _write_metadata(tmp, step, world, layout, reports, sharded_model_state is not None)
                _commit(tmp, final)
                if keep is not None:
                    prune_checkpoints(directory, keep)
            except Exception as exc:
                outcome = f"rank 0: {type(exc).__name__}: {exc}"
    outcome = _broadcast_from_first(outcome, group)
    if outcome is not None:
        raise DistillError(f"checkpoint {final} was not saved ({outcome}); the previous checkpoint is intact")
    log.info("saved checkpoint %s (%d rank file(s), %.1fs)", final, world, time.monotonic() - t0)
    return final


def _save_dist(sharded_state: dict, tmp: Path, report: dict, group) -> dict:
    """Collective megatron dist_checkpointing save of the model weights into ``tmp/model_dist``."""
    from megatron.core import dist_checkpointing

    target = tmp / "model_dist"
    try:
        target.mkdir(exist_ok=True)
    except OSError:
        pass
    dist = _dist()
    if dist is not None:
        dist.barrier(group)  # the directory must exist before any rank writes into it
    try:
        from distill_plugins.models.megatron_ckpt import in_process_results_queue

        with in_process_results_queue():  # a synchronous save needs no writer-manager process
            dist_checkpointing.save(sharded_state, str(target), async_sharded_save=False)
    except Exception as exc:
        if report.get("ok"):
            report = {"ok": False, "error": f"dist_checkpointing.save: {type(exc).__name__}: {exc}"}
    return report


def _write_metadata(tmp: Path, step: int, world: int, layout: Optional[dict], reports: list, has_dist: bool) -> None:
    import importlib.metadata as md

    def version(dist_name: str) -> Optional[str]:
        try:
            return md.version(dist_name)
        except md.PackageNotFoundError:
            return None

    meta = {
        "format_version": FORMAT_VERSION, "step": int(step), "world_size": world, "layout": layout,
        "files": {r["file"]: {"size": r["size"], "sha256": r["sha256"]} for r in reports},
        "model_dist": "model_dist" if has_dist else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "megatron-core": version("megatron-core"),
                     "distill-plugins": version("distill-plugins")},
    }
    path = tmp / METADATA
    with open(path.with_suffix(".json.partial"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(path.with_suffix(".json.partial"), path)
    _fsync_dir(tmp)


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` directory to ``final`` (replacing an older save of the same step)."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
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


def prune_checkpoints(directory: PathLike, keep: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep`` and leftover ``.tmp-``/``.old-`` directories.

    Call on one rank only, with no save in progress. Returns what was deleted.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    valid = [p for _, p in list_checkpoints(directory) if validate_checkpoint(p) is None]
    doomed = valid[keep:]
    doomed += [p for p in directory.iterdir() if p.is_dir() and _TMP_RE.match(p.name)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------
# Find and load
# ---------------------------------------------------------------------------


def read_metadata(path: PathLike) -> dict:
    """The parsed ``metadata.json`` of a checkpoint directory."""
    return json.loads((Path(path) / METADATA).read_text(encoding="utf-8"))


def validate_checkpoint(path: PathLike, *, deep: bool = False) -> Optional[str]:
    """Why checkpoint ``path`` cannot be loaded, or None if it looks complete.

    Checks the marker, its format, and that every rank file exists with its
    recorded size (``deep=True`` also compares SHA-256 checksums).
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
    for name, info in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != info["size"]:
            return f"{name} has {f.stat().st_size} bytes, expected {info['size']}"
        if deep and info.get("sha256") and _sha256(f) != info["sha256"]:
            return f"{name} checksum mismatch"
    if meta.get("model_dist") and not (path / meta["model_dist"]).is_dir():
        return f"missing {meta['model_dist']}/"
    return None


def find_latest_checkpoint(directory: PathLike, *, deep: bool = False) -> Optional[Path]:
    """The newest complete checkpoint under ``directory``, or None.

    Incomplete or corrupt ones (no marker, missing or truncated rank files,
    interrupted ``.tmp-`` saves) are skipped with one warning each.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for p in sorted(directory.iterdir()):
        if p.is_dir() and _TMP_RE.match(p.name) and ".tmp-" in p.name:
            log.warning("skipping %s: an interrupted save (no %s; deleted at the next save)", p, METADATA)
    for _, path in list_checkpoints(directory):
        problem = validate_checkpoint(path, deep=deep)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
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
    """Read this rank's file of checkpoint ``path`` (and restore RNG states).

    Args:
        path: a checkpoint directory (``.../step_000010``).
        rank: which rank file (default: this process's rank in ``group``).
        layout: this run's parallel layout; must equal the saved one if both are given.
        restore_rng: apply the saved RNG states now (:func:`restore_rng_state`).
        verify: compare this rank file's SHA-256 with the metadata.
        map_location: passed to ``torch.load``.

    Raises:
        DistillError: incomplete/corrupt checkpoint, or a different world size or layout.
    """
    path = Path(path)
    problem = validate_checkpoint(path)
    if problem is not None:
        raise DistillError(f"cannot resume from {path}: {problem}")
    meta = read_metadata(path)
    my_rank, world = _rank_world(group)
    rank = my_rank if rank is None else rank
    if _dist() is not None and meta["world_size"] != world:
        raise DistillError(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {world}; "
                           "per-rank checkpoints resume only with the same parallel layout (use the same TP/PP/DP, "
                           "or initialise the weights from its model_dist/ directory when it has one)")
    if layout is not None and meta.get("layout") is not None and dict(meta["layout"]) != dict(layout):
        raise DistillError(f"checkpoint {path} was written with layout {meta['layout']}, this run has {layout}")
    name = rank_filename(rank)
    if verify and meta["files"][name].get("sha256") and _sha256(path / name) != meta["files"][name]["sha256"]:
        raise DistillError(f"cannot resume from {path}: {name} checksum mismatch (file corrupted)")
    payload = torch.load(path / name, map_location=map_location, weights_only=False)
    if restore_rng and payload.get("rng"):
        restore_rng_state(payload["rng"])
    return Checkpoint(path=path, step=int(payload["step"]), rank=rank, model_state=payload["model"],
                      optimizer_state=payload["optimizer"], scheduler_state=payload["scheduler"],
                      rng_state=payload["rng"], data_state=payload["data"], parts_state=payload["parts"],
                      extra=payload["extra"], metadata=meta)


def load_dist_model_state(checkpoint: Checkpoint, sharded_state_dict: dict) -> dict:
    """Load the weights saved with ``sharded_model_state`` into ``sharded_state_dict`` (any TP/PP layout).

    Returns the loaded state dict (pass it to ``model.load_state_dict``). Collective.
    """
    from megatron.core import dist_checkpointing

    if checkpoint.model_dist_dir is None:
        raise DistillError(f"checkpoint {checkpoint.path} has no model_dist/ (saved without sharded_model_state)")
    return dist_checkpointing.load(sharded_state_dict, str(checkpoint.model_dist_dir))


def checkpoint_directory(recipe) -> Path:
    """``checkpoint.dir`` of a recipe, defaulting to ``<output_dir>/checkpoints``."""
    return Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else Path(recipe.output_dir) / "checkpoints"


def resolve_resume(resume: str, directory: PathLike) -> Optional[Path]:
    """The checkpoint to resume from for ``checkpoint.resume``.

    * ``auto``: the latest valid checkpoint under ``directory``, or None (fresh start);
    * ``none``: None;
    * a path: that checkpoint (or, for a directory of checkpoints, its latest
      valid one); an error if it is missing or incomplete.
    """
    if resume == "none":
        return None
    if resume == "auto":
        found = find_latest_checkpoint(directory)
        if found is None:
            log.info("no checkpoint under %s: starting from scratch", directory)
        return found
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise DistillError(f"checkpoint.resume={resume!r}: no such directory (use auto, none or a checkpoint path)")
    if not (path / METADATA).exists() and list_checkpoints(path):
        found = find_latest_checkpoint(path)
        if found is None:
            raise DistillError(f"checkpoint.resume={resume!r}: no complete checkpoint in it")
        return found
    problem = validate_checkpoint(path)
    if problem is not None:
        raise DistillError(f"checkpoint.resume={resume!r} is not a complete checkpoint: {problem}")
    return path
