"""The training loop's callback protocol, and the callbacks the engine runs itself.

Design
------
:meth:`Engine.train <distill_plugins.engine.run.Engine.train>` is the one
training loop. What happens around an optimizer step is a :class:`Callback`:
the metrics file, the progress line, the plugin observers
(``distill_on_step_end``), the evaluation and checkpoint schedules and the
stop signals are callbacks, and so are the ones a test or an embedding script
adds (``Engine(..., callbacks=[...])`` or :meth:`Engine.add_callback`).

A callback observes (the step's :class:`~.trainer.StepResult`, the
evaluation's figures, the saved path) and may ask the loop to evaluate, save
or stop after the current step by setting the flags of ``engine.control``
(:class:`LoopControl`, cleared before each step). The loop acts on them in that
order: evaluate, then save, then stop.

Every rank calls the same callbacks, in this order:

1. the observers: :class:`MetricsLog`, :class:`ProgressLog`, :class:`PluginObservers`;
2. the callbacks added by the caller, in the order added;
3. the schedules: :class:`EvaluationSchedule`, :class:`CheckpointSchedule`, :class:`StopOnSignal`.

:class:`StopOnSignal` runs a collective (an all-reduce of the stop flag), so
all ranks must have it; a callback added by the caller that calls a
collective must likewise be added on every rank, while one that only observes
may be added on one rank. A caller's callback that sends itself a signal in
``on_step_end`` is seen at the same step, because the signal check comes last.

The hooks and when they run (``engine.trainer.step`` is the number of steps done):

================  =============================================================
``on_train_start``  after resume, before the first step
``on_step_end``     after each optimizer step (skipped non-finite steps included)
``on_eval``         after an evaluation, with its figures
``on_save``         after a checkpoint was committed on every rank, with its path
``on_train_end``    once, with ``"finished"``, ``"stopped"`` (signal) or ``"error"``
================  =============================================================

Usage::

    class LossRecorder(Callback):
        def __init__(self):
            self.losses = []

        def on_step_end(self, engine, result):
            self.losses.append(result.metrics["loss"])

    recorder = LossRecorder()
    engine = Engine(recipe, host, cpu=True, callbacks=[recorder])
    engine.train()
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch.distributed as dist

from distill_plugins.engine.signals import StopSignals
from distill_plugins.engine.trainer import StepResult
from distill_plugins.logging import get_logger

if TYPE_CHECKING:  # type-only: run.py imports this module
    from distill_plugins.engine.run import Engine
    from distill_plugins.manager import PluginHost

__all__ = ["Callback", "LoopControl", "MetricsLog", "ProgressLog", "PluginObservers", "EvaluationSchedule",
           "CheckpointSchedule", "StopOnSignal", "REQUEUE_MARKER_ENV", "global_rank"]

log = get_logger(__name__)

#: environment variable naming the requeue marker file the SLURM scripts watch
REQUEUE_MARKER_ENV = "DISTILL_REQUEUE_MARKER"


def global_rank() -> int:
    """This process's rank in the world (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Callback:
    """A hook into the training loop; every method does nothing unless overridden.

    Methods run on every rank where the callback is registered, in
    registration order (module docstring). They must not raise to signal
    anything: set ``engine.control`` flags instead.
    """

    def on_train_start(self, engine: "Engine") -> None:
        """After resume, before the first step (``engine.trainer.step`` is the start step)."""

    def on_step_end(self, engine: "Engine", result: StepResult) -> None:
        """After each optimizer step; ``result`` is identical on every rank."""

    def on_eval(self, engine: "Engine", metrics: Mapping[str, float]) -> None:
        """After an evaluation: ``eval_kd_loss``, ``eval_ce_loss``, ``eval_tokens``, ... (identical on every rank)."""

    def on_save(self, engine: "Engine", path: Path) -> None:
        """After checkpoint ``path`` was committed."""

    def on_train_end(self, engine: "Engine", reason: str) -> None:
        """Once, when the loop ends: ``"finished"``, ``"stopped"`` (stop signal) or ``"error"`` (an exception)."""


@dataclass
class LoopControl:
    """What the loop does after the current step's callbacks; the flags are cleared before each step."""

    evaluate: bool = False
    save: bool = False
    stop: bool = False

    def clear(self) -> None:
        self.evaluate = self.save = False


# ---------------------------------------------------------------------------
# Observers
# ---------------------------------------------------------------------------


def _json_value(v: Any) -> Any:
    return (v if math.isfinite(v) else None) if isinstance(v, float) else v


class MetricsLog(Callback):
    """Owns ``<output_dir>/metrics.jsonl``: one JSON line per step and per evaluation, written by global rank 0.

    Lines carry ``step``; a training line has the keys of
    :meth:`~.trainer.Trainer.train_step`'s metrics, an evaluation line
    ``eval_*`` keys. Non-finite numbers are written as ``null``.

    On a resume from step ``k``, lines with ``step > k`` (written by the run
    after that checkpoint, and about to be replayed) are moved from
    ``metrics.jsonl`` to ``metrics.trimmed.jsonl``, each with
    ``"trimmed_at_resume_from": k`` added, so ``metrics.jsonl`` has one line per
    step. A starting run (step 0) moves every earlier line the same way. A line
    that is not valid JSON (a crash mid-write) is moved too.

    Args:
        output_dir: the run directory.
        writer: whether this process writes (default: global rank 0).
    """

    FILE = "metrics.jsonl"
    TRIMMED = "metrics.trimmed.jsonl"

    def __init__(self, output_dir: str | os.PathLike, *, writer: Optional[bool] = None):
        self.path = Path(output_dir) / self.FILE
        self.trimmed_path = Path(output_dir) / self.TRIMMED
        self.writer = global_rank() == 0 if writer is None else writer

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one line (writer only)."""
        if not self.writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")

    def trim(self, step: int) -> int:
        """Move lines with ``step`` > ``step`` (and unreadable lines) to :attr:`trimmed_path`; returns how many."""
        if not self.writer or not self.path.is_file():
            return 0
        keep, moved = [], []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                moved.append({"unparsed_line": line, "trimmed_at_resume_from": step})
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] <= step:
                keep.append(line)
            else:
                moved.append({**(record if isinstance(record, dict) else {"value": record}),
                              "trimmed_at_resume_from": step})
        if not moved:
            return 0
        with open(self.trimmed_path, "a", encoding="utf-8") as fh:
            for record in moved:
                fh.write(json.dumps(record) + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)
        log.warning("%s: moved %d line(s) after step %d to %s (this run continues from step %d)", self.path,
                    len(moved), step, self.trimmed_path.name, step)
        return len(moved)

    def on_train_start(self, engine: "Engine") -> None:
        self.trim(engine.trainer.step)

    def on_step_end(self, engine: "Engine", result: StepResult) -> None:
        self.append(result.metrics)

    def on_eval(self, engine: "Engine", metrics: Mapping[str, float]) -> None:
        self.append({"step": engine.trainer.step, **metrics})


class ProgressLog(Callback):
    """The progress line every ``training.log_interval`` steps (and on skipped and last steps), global rank 0.

    ::

        step 12/100  loss 2.4312  kd 2.4312  ce 3.0127  lr 3.00e-03  gnorm 0.512  tok/s 5230  kept 0.50  ETA 1m12s
    """

    def __init__(self, *, log_interval: int, kd: bool, writer: Optional[bool] = None):
        self.log_interval, self.kd = log_interval, kd
        self.writer = global_rank() == 0 if writer is None else writer

    def on_step_end(self, engine: "Engine", result: StepResult) -> None:
        total = engine.trainer.total_steps
        if not self.writer or not (result.skipped or result.step % self.log_interval == 0 or result.step == total):
            return
        m = result.metrics
        eta = m["eta_s"]
        kd = f"  kd {m['kd_loss']:.4f}" if self.kd else ""  # CE-only runs have no KD
        kept = f"  kept {m['kept_fraction']:.2f}" if self.kd else ""
        coverage = f"  aligned {m['aligned_fraction']:.2f}" if "aligned_fraction" in m else ""
        if "teacher_wait_s" in m:  # a teacher on its own ranks: seconds the student waited for it this step
            coverage += f"  wait {m['teacher_wait_s']:.2f}s"
        if "gen_s" in m:  # a generating sequence source: generation seconds and on-policy share of the step
            coverage += f"  gen {m['gen_s']:.2f}s  on-policy {m['on_policy_fraction']:.2f}"
        log.info("step %d/%d  loss %.4f%s  ce %.4f  lr %.2e  gnorm %.3f  tok/s %.0f%s%s  ETA %dm%02ds%s",
                 result.step, total, m["loss"], kd, m["ce_loss"], m["lr"], m["grad_norm"],
                 m["tokens_per_second"], kept, coverage, int(eta // 60), int(eta % 60),
                 "  SKIPPED (non-finite)" if result.skipped else "")

    def on_eval(self, engine: "Engine", metrics: Mapping[str, float]) -> None:
        if not self.writer:
            return
        log.info("eval @ step %d  kd %.4f  ce %.4f  tokens %d", engine.trainer.step, metrics["eval_kd_loss"],
                 metrics["eval_ce_loss"], int(metrics["eval_tokens"]))
        if "eval_rouge_l" in metrics:  # training.eval_generate: the generation-based figures of docs/eval.md
            kl = "n/a" if metrics["eval_kl"] is None else f"{metrics['eval_kl']:.4f}"
            log.info("eval @ step %d  response ce %.4f  kl %s  rouge-L %.2f  examples %d", engine.trainer.step,
                     metrics["eval_response_ce"], kl, metrics["eval_rouge_l"], int(metrics["eval_examples"]))


class PluginObservers(Callback):
    """Calls the plugin hook ``distill_on_step_end(step, metrics)`` once per step.

    On the last pipeline stage's first tensor- and data-parallel rank, so each
    step is reported once (the metrics are the same on every rank).
    """

    def __init__(self, host: "PluginHost"):
        self.host = host

    def on_step_end(self, engine: "Engine", result: StepResult) -> None:
        ctx = engine.ctx
        if engine.trainer.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0:
            self.host.on_step_end(result.step, dict(result.metrics))


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------


class EvaluationSchedule(Callback):
    """Asks for an evaluation every ``interval`` steps (``training.eval_interval``; 0 never).

    With ``training.eval_generate: N`` (instruction data) the evaluation also
    generates (:meth:`~distill_plugins.engine.run.Engine.evaluate`; docs/eval.md).
    """

    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, engine: "Engine", result: StepResult) -> None:
        if self.interval and result.step % self.interval == 0:
            engine.control.evaluate = True


class CheckpointSchedule(Callback):
    """Asks for a save every ``interval`` steps (``checkpoint.interval``; 0: only at the end) and at the last step."""

    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, engine: "Engine", result: StepResult) -> None:
        if (self.interval and result.step % self.interval == 0) or result.step >= engine.end:
            engine.control.save = True


class StopOnSignal(Callback):
    """SIGUSR1/SIGTERM on any rank: every rank saves at the same step and the loop ends (status 0).

    ``on_train_start`` installs the handlers unless they already are (``distill
    run`` installs them before its slow start-up) and agrees on a signal that
    arrived during start-up: the loop then ends before the first step, with
    nothing new to save. ``on_step_end`` agrees on the flag (collective, every
    rank, every step). ``on_train_end`` writes the requeue marker when the run
    stopped before its last step (global rank 0, after the checkpoint was
    committed) and puts back the handlers it installed.

    The marker: ``step=<n>`` in ``$DISTILL_REQUEUE_MARKER``, default
    ``<output_dir>/REQUEUE`` (docs/launching.md).
    """

    def __init__(self, signals: StopSignals, *, output_dir: str | os.PathLike):
        self.signals = signals
        self.output_dir = Path(output_dir)
        self._installed_here = False

    def on_train_start(self, engine: "Engine") -> None:
        if not self.signals.installed:
            self.signals.install()
            self._installed_here = True
        if self.signals.should_stop():
            log.warning("stop signal received during start-up: stopping before step %d", engine.trainer.step + 1)
            engine.control.stop = True

    def on_step_end(self, engine: "Engine", result: StepResult) -> None:
        if self.signals.should_stop():
            engine.control.save = engine.control.stop = True

    def on_train_end(self, engine: "Engine", reason: str) -> None:
        try:
            if reason == "stopped":
                step = engine.trainer.step
                if step < engine.end:
                    self.write_marker(step)
                log.warning("stop signal received: %s step %d; exiting with status 0 (resume: auto continues)",
                            "saved" if engine.last_saved_step == step else "no new checkpoint at", step)
        finally:
            if self._installed_here:
                self.signals.restore()
                self._installed_here = False

    def write_marker(self, step: int) -> None:
        """``step=<n>`` into the requeue marker (global rank 0), atomically."""
        if global_rank() != 0:
            return
        marker = Path(os.environ.get(REQUEUE_MARKER_ENV) or self.output_dir / "REQUEUE")
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(f"step={step}\n")
        os.replace(tmp, marker)
