"""Training runs of the quality benchmarks: one record per (method, seed) and a pool that trains a few at once.

``benchmarks/quality.py`` and ``benchmarks/instruct_quality.py`` train every
(method, seed) pair as a ``distill run`` subprocess in its own directory
(``command.txt``, ``console.log``, ``trained.json`` when it finished), then score it.
:func:`train_in_pool` keeps ``jobs`` of them running; a ``finish`` callback scores
each finished run on the calling thread while the next ones train.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from distill_plugins.checkpoint import run_checkpoint as ckpt

__all__ = ["Run", "launch", "train_in_pool", "trained_seconds", "triage"]


@dataclass
class Run:
    """One (method, seed) training run of a benchmark and what came of it."""

    method: Any  # the benchmark's Method record (has .key)
    seed: int
    directory: Path
    result: Optional[dict] = None
    seconds: float = 0.0
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)


def launch(run: Run, cmd: Sequence[str], env: dict) -> subprocess.Popen:
    """Start ``cmd`` for ``run`` in a fresh ``run.directory`` (``command.txt``, output to ``console.log``)."""
    if run.directory.exists():
        shutil.rmtree(run.directory)
    run.directory.mkdir(parents=True)
    (run.directory / "command.txt").write_text(shlex.join(cmd) + "\n")
    run.extra["t0"] = time.perf_counter()
    run.extra["log"] = open(run.directory / "console.log", "w")
    return subprocess.Popen(list(cmd), stdout=run.extra["log"], stderr=subprocess.STDOUT, env=env)


def train_in_pool(runs: Sequence[Run], *, jobs: int, start: Callable[[Run], subprocess.Popen],
                  log: logging.Logger, finish: Optional[Callable[[Run], None]] = None) -> None:
    """Train ``runs`` at most ``jobs`` at a time; ``start(run)`` launches one (see :func:`launch`).

    A run that exits 0 gets ``seconds`` and ``trained.json``; another exit status sets
    ``run.error`` (logged). With ``finish``, each finished run is passed to it on this
    thread once the freed slot has been refilled, so scoring overlaps the next runs' training.
    """
    queue, active, finished = list(runs), [], []
    while queue or active or finished:
        while queue and len(active) < jobs:
            run = queue.pop(0)
            log.info("start %s seed %d", run.method.key, run.seed)
            active.append((run, start(run)))
        if finished:
            finish(finished.pop(0))
            continue
        time.sleep(1.0)
        for run, proc in list(active):
            code = proc.poll()
            if code is None:
                continue
            active.remove((run, proc))
            run.extra["log"].close()
            run.seconds = time.perf_counter() - run.extra["t0"]
            if code != 0:
                run.error = f"exit code {code}; see {run.directory / 'console.log'}"
                log.warning("%s seed %d failed: %s", run.method.key, run.seed, run.error)
                continue
            (run.directory / "trained.json").write_text(json.dumps({"seconds": run.seconds}) + "\n")
            log.info("done %s seed %d in %.0fs (%d left)", run.method.key, run.seed, run.seconds,
                     len(queue) + len(active))
            if finish is not None:
                finished.append(run)


def trained_seconds(run: Run, cmd: Sequence[str], steps: int, *, from_metrics: bool = False) -> Optional[float]:
    """Training seconds of a finished run of exactly ``cmd`` (None: train it).

    Finished: ``command.txt`` is ``cmd`` and the checkpoint of step ``steps`` is complete. The
    time comes from ``trained.json``; without it, None, or with ``from_metrics`` the sum of the
    run's logged ``step_time_s``.
    """
    cmd_file = run.directory / "command.txt"
    if not cmd_file.is_file() or cmd_file.read_text().strip() != shlex.join(cmd):
        return None
    if ckpt.validate_checkpoint(run.directory / "run" / "checkpoints" / ckpt.step_dirname(steps)) is not None:
        return None
    marker = run.directory / "trained.json"
    if marker.is_file():
        return float(json.loads(marker.read_text())["seconds"])
    if not from_metrics:
        return None
    metrics = run.directory / "run" / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    return float(sum(r.get("step_time_s") or 0.0 for r in lines))


def triage(runs: Sequence[Run], *, signature: Callable[[Run], dict],
           trained: Callable[[Run], Optional[float]]) -> tuple[list[Run], list[Run]]:
    """Which runs still need work: ``(pending, to_train)``.

    A run whose ``result.json`` carries ``signature(run)`` takes its result from there; the
    others are pending. A pending run that ``trained`` finds finished gets its ``seconds``
    (to be scored only); the rest are to train.
    """
    pending = []
    for run in runs:
        done = run.directory / "result.json"
        if done.is_file():
            saved = json.loads(done.read_text())
            if saved.get("signature") == signature(run):
                run.result = saved["result"]
                continue
        pending.append(run)
    to_train = []
    for run in pending:
        seconds = trained(run)
        if seconds is None:
            to_train.append(run)
        else:
            run.seconds = seconds
    return pending, to_train
