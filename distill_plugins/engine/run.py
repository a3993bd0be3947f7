"""Entry point of ``distill run`` and the one training loop: :class:`Engine`.

Design
------
:func:`run` turns a validated recipe and a plugin host into a training run on
this process:

1. SIGUSR1/SIGTERM handlers installed first (:mod:`.signals`), so a signal
   during the slow start-up stops the run cleanly at the first step boundary;
2. ``output_dir`` and ``checkpoint.dir`` proven writable (a clear error, exit 2);
3. CPU layer on when ``device: cpu`` or ``--cpu`` (:mod:`.cpu`);
4. :class:`Engine`: model specs completed from ``hf:`` / ``megatron:`` /
   ``checkpoint:`` sources (``models.resolve.resolve_model_spec``), the real
   vocabularies, torch.distributed + megatron groups (:mod:`.process_groups`),
   the checkpoint to resume from agreed by every rank
   (``checkpoint.run_checkpoint.resolve_resume``: refuses to start when
   checkpoints exist and none can be loaded), objective, selector and
   temperature policy (:func:`.loss.build_loss_parts`), the vocabulary aligner
   (:class:`.alignment.AlignerRuntime`), the data iterator, the sequence source
   (:class:`.sequences.SequenceRuntime`), student, teacher,
   DDP, optimizer and scheduler (:class:`.trainer.Trainer`), then the resume;
5. :meth:`Engine.train`, the loop.

The loop (:meth:`Engine.train`) is the only one: one optimizer step
(:meth:`.trainer.Trainer.train_step`), then the callbacks
(:mod:`.callbacks`): the metrics file, the progress line and the plugin
observers report the step; the evaluation schedule, the checkpoint schedule
and the stop signals set ``engine.control``; the loop then evaluates, saves
and stops as asked. Tests and embedding scripts add their own callbacks
through the same protocol.

Checkpoints (``distill_plugins.checkpoint.run_checkpoint``) hold the student only
(never the teacher), the optimizer, the scheduler, RNG states, the data
position, every stateful part's ``state_dict()``, the aligner's trainable
modules (DSKD projectors) and the engine's counters; the student weights are
also written with ``dist_checkpointing`` (``model_dist/``) so
``student.checkpoint`` / ``teacher.checkpoint`` can load them under another
TP/PP layout. A save that fails on any rank fails on every rank with the same
error, and the previous checkpoint stays the one resumed from.

Usage (what the CLI does in each process)::

    from distill_plugins.engine.run import run
    status = run(recipe, host, cpu=args.cpu)

or, embedding the engine::

    engine = Engine(recipe, host, cpu=True, callbacks=[MyCallback()])
    engine.train()
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from distill_plugins.checkpoint.optimizer_state import load_optimizer_state, optimizer_state_dict
from distill_plugins.checkpoint.integrity import agree_errors, rank_world
from distill_plugins.checkpoint.run_checkpoint import (check_checkpoint, check_writable, checkpoint_directory,
                                                       load_checkpoint, resolve_resume, save_checkpoint)
from distill_plugins.data.embedded import DEFAULT_VOCAB_SIZE
from distill_plugins.data.iterators import build_data, build_eval_data, resolve_tokenizer
from distill_plugins.data.text_batches import build_aligned_data, build_aligned_eval_data
from distill_plugins.engine import process_groups
from distill_plugins.engine.alignment import AlignerRuntime
from distill_plugins.engine.callbacks import (Callback, CheckpointSchedule, EvaluationSchedule, LoopControl,
                                              MetricsLog, PluginObservers, ProgressLog, StopOnSignal, global_rank)
from distill_plugins.engine.cpu import disable_cpu_mode, enable_cpu_mode
from distill_plugins.engine.evaluation import evaluate_instruct, held_out_source
from distill_plugins.engine.loss import build_loss_parts
from distill_plugins.engine.remote_teacher import start_separate
from distill_plugins.engine.sequences import SequenceRuntime
from distill_plugins.engine.signals import StopSignals, current_stop_handlers, install_stop_handlers, \
    restore_stop_handlers
from distill_plugins.engine.trainer import Trainer
from distill_plugins.errors import DistillError, RecipeError, RecipeWarning
from distill_plugins.logging import configure_logging, get_logger
from distill_plugins.models.megatron_ckpt import write_checkpoint_meta
from distill_plugins.models.resolve import resolve_model_spec
from distill_plugins.recipe.record import write_run_record
from distill_plugins.recipe.schema import Recipe
from distill_plugins.recipe.validate import tokenizer_vocab_errors

if TYPE_CHECKING:  # type-only
    from distill_plugins.manager import PluginHost

__all__ = ["run", "resolve_vocab_sizes", "resolve_specs", "Engine"]

log = get_logger(__name__)

#: the learning-rate schedule's keys in megatron's scheduler state, with the recipe key each comes from
_SCHEDULE_KEYS = {"lr_decay_steps": "training.steps", "lr_warmup_steps": "training.warmup_steps",
                  "lr_decay_style": "training.lr_decay", "max_lr": "training.lr", "min_lr": "training.min_lr"}


def resolve_specs(recipe: Recipe) -> Recipe:
    """``recipe`` with student/teacher shape keys read from their ``hf:``/``megatron:``/``checkpoint:`` sources."""
    return dataclasses.replace(recipe, student=resolve_model_spec(recipe.student),
                               teacher=resolve_model_spec(recipe.teacher))


def _tokenizer_vocab(recipe: Recipe, which: str) -> Optional[int]:
    tok = resolve_tokenizer(recipe, which)
    return int(tok.vocab_size) if tok is not None else None


def resolve_vocab_sizes(recipe: Recipe) -> tuple[int, int]:
    """The real vocabularies ``(student, teacher)``.

    Each side: its model's ``vocab_size``, else its tokenizer's size
    (``data.teacher_tokenizer`` for the teacher when set), else, with one
    tokenizer, the other side's ``vocab_size``; for embedded data without a
    tokenizer the embedded default. Whether two different sizes are allowed is
    the aligner's business (:class:`.alignment.AlignerRuntime`).

    Raises:
        RecipeError: a size is unknown, or a tokenizer has more tokens than its model's vocabulary.
    """
    s, t = recipe.student.vocab_size, recipe.teacher.vocab_size
    two_tokenizers = bool(recipe.data.teacher_tokenizer)
    if s is None:
        s = _tokenizer_vocab(recipe, "student") or (None if two_tokenizers else t)
    if t is None:
        t = _tokenizer_vocab(recipe, "teacher") if two_tokenizers else s
    if s is None and recipe.data.kind == "embedded":
        s = DEFAULT_VOCAB_SIZE
        t = t if t is not None else s
    for who, size in (("student", s), ("teacher", t)):
        if size is None:
            key = "data.tokenizer" if who == "student" else "data.teacher_tokenizer"
            raise RecipeError(f"the {who}'s vocabulary size is unknown: set {who}.vocab_size or {key}")
    # the check `distill check` runs, again with the sizes the run uses (megatron:/checkpoint: shapes read now)
    too_large = [e for e in tokenizer_vocab_errors(recipe, {"student": s, "teacher": t})
                 if not isinstance(e, RecipeWarning)]
    if too_large:
        raise RecipeError(too_large)
    return int(s), int(t)


class Engine:
    """A built run on this rank: trainer, data, checkpoints and the training loop.

    Args:
        recipe: a validated recipe.
        host: the plugin host that builds the parts and runs the plugin hooks.
        cpu: the CPU layer is on (gloo).
        data: this DP rank's training batches (an iterator with ``state_dict()`` /
            ``load_state_dict()``); default built from ``recipe.data``.
        callbacks: :class:`~.callbacks.Callback` objects run by :meth:`train`
            after the engine's own observers and before its schedules.
        signals: the stop-signal handlers to use (default: the process-wide ones of
            :func:`.signals.install_stop_handlers` if installed, else new ones,
            installed for the duration of :meth:`train`).

    Attributes:
        trainer: the :class:`~.trainer.Trainer` (one optimizer step).
        control: the :class:`~.callbacks.LoopControl` callbacks set after a step.
        metrics: the :class:`~.callbacks.MetricsLog` that owns ``metrics.jsonl``.
        end: the step :meth:`train` runs to.
        resume_path: the checkpoint this run resumed from, or None.
        last_saved_step: the step of the last checkpoint this engine saved, or None.

    Raises:
        DistillError: on every rank, e.g. when ``checkpoint.dir`` holds checkpoints and none can be loaded.
    """

    def __init__(self, recipe: Recipe, host: "PluginHost", *, cpu: bool, data: Any = None,
                 callbacks: Iterable[Callback] = (), signals: Optional[StopSignals] = None, teacher_provider=None):
        self.recipe = recipe = resolve_specs(recipe)
        self.host, self.cpu = host, cpu
        self.vocab_size, self.teacher_vocab_size = resolve_vocab_sizes(recipe)
        self.ctx = process_groups.initialize(recipe.parallel, seed=recipe.seed, cpu=cpu)
        self.ckpt_dir = checkpoint_directory(recipe)
        # agreed by every rank before the slow model build; refuses when checkpoints exist and none loads
        self.resume_path = resolve_resume(recipe.checkpoint.resume, self.ckpt_dir)
        self.parts = build_loss_parts(recipe, host)
        self.aligner = AlignerRuntime.build(recipe, host, student_vocab_size=self.vocab_size,
                                            teacher_vocab_size=self.teacher_vocab_size)
        self.data = data if data is not None else self._build_data(split="train")
        # where each step's responses come from (docs/sequences.md); refuses what it cannot run
        self.sequences = SequenceRuntime.build(recipe, host, ctx=self.ctx, data=self.data, aligner=self.aligner,
                                               teacher_provider=teacher_provider)
        self.trainer = Trainer.build(recipe, self.parts, ctx=self.ctx, data=self.data, vocab_size=self.vocab_size,
                                     cpu=cpu, teacher_vocab_size=self.teacher_vocab_size, aligner=self.aligner,
                                     teacher_provider=teacher_provider, sequences=self.sequences)
        self.layout = {"tp": recipe.parallel.tensor, "pp": recipe.parallel.pipeline, "dp": self.ctx.dp_size} \
            if teacher_provider is None else teacher_provider.layout_record()  # both roles' layouts
        self.control = LoopControl()
        self.end = recipe.training.steps
        self.last_saved_step: Optional[int] = None
        self.signals = signals or current_stop_handlers() or StopSignals()
        self.metrics = MetricsLog(recipe.output_dir)
        self._observers: list[Callback] = [self.metrics,
                                           ProgressLog(log_interval=recipe.training.log_interval,
                                                       kd=self.parts.kd_weight > 0),
                                           PluginObservers(host)]
        self._added: list[Callback] = list(callbacks)
        self._schedules: list[Callback] = [EvaluationSchedule(recipe.training.eval_interval),
                                           CheckpointSchedule(recipe.checkpoint.interval),
                                           StopOnSignal(self.signals, output_dir=recipe.output_dir)]
        self._eval_data = None
        self._generation_source = None  # the held-out instruction split, built at the first generating evaluation
        if self.resume_path is not None:
            self.load(self.resume_path, checked=True)

    def _build_data(self, *, split: str, eval: bool = False):
        """This DP rank's batches: token ids, or raw text with both tokenizations for two tokenizers."""
        kw = dict(dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp_size, split=split)
        if self.aligner.text_batches:
            build = build_aligned_eval_data if eval else build_aligned_data
            return build(self.recipe, pairing=self.aligner.pairing, **kw)
        return (build_eval_data if eval else build_data)(self.recipe, **kw)

    # ------------------------------------------------------------------ callbacks
    @property
    def callbacks(self) -> tuple[Callback, ...]:
        """Every callback in call order: observers, the added ones, the schedules."""
        return (*self._observers, *self._added, *self._schedules)

    def add_callback(self, callback: Callback) -> None:
        """Run ``callback`` in :meth:`train`, after those added before it and before the schedules."""
        self._added.append(callback)

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # ------------------------------------------------------------------ loop
    def train(self, steps: Optional[int] = None) -> int:
        """Train to ``steps`` (default ``training.steps``); returns the exit status 0.

        Collective: call on every rank. Ends when the steps are done or after a
        stop signal (checkpoint saved first). Raises
        :class:`~.trainer.NonFiniteLossError` after too many non-finite steps in
        a row, and :class:`~distill_plugins.errors.DistillError` when a
        checkpoint could not be saved (on every rank).
        """
        self.end = self.recipe.training.steps if steps is None else steps
        trainer, control = self.trainer, self.control
        control.stop = False
        reason = "error"
        try:
            self._emit("on_train_start")
            if trainer.step >= self.end:
                log.info("step %d reached already (training.steps=%d): nothing to train", trainer.step, self.end)
            while trainer.step < self.end and not control.stop:
                control.clear()
                result = trainer.train_step()
                self._emit("on_step_end", result)  # report; the schedules set control.evaluate/save/stop
                trainer.check_nonfinite_streak()
                if control.evaluate:
                    self._emit("on_eval", self.evaluate())
                if control.save:
                    self._emit("on_save", self.save())
            reason = "stopped" if control.stop else "finished"
        finally:
            self._emit("on_train_end", reason)
        return 0

    def evaluate(self) -> dict[str, float]:
        """Forward-only pass over the ``valid`` split (built once); the figures, identical on every rank.

        With ``training.eval_generate: N`` (instruction data) the same evaluation also runs
        :func:`~.evaluation.evaluate_instruct` on the first ``N`` valid examples (greedy answers,
        ``training.eval_max_new_tokens``; collective) and adds its ``eval_response_ce``, ``eval_kl``,
        ``eval_rouge_l``, ... to the figures: one ``metrics.jsonl`` line per evaluation (docs/eval.md).
        """
        if self._eval_data is None:
            self._eval_data = self._build_data(split="valid", eval=True)
        metrics = self.trainer.evaluate(self._eval_data)
        t = self.recipe.training
        if t.eval_generate:
            if self._generation_source is None:
                self._generation_source = held_out_source(self.recipe, "valid")
            result = evaluate_instruct(self, source=self._generation_source, num_examples=t.eval_generate,
                                       max_new_tokens=t.eval_max_new_tokens)
            metrics.update(result.metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Save a checkpoint of the current step. Collective.

        Raises:
            DistillError: on every rank when any rank failed; nothing is committed.
        """
        tr = self.trainer

        def add_model_record(tmp: Path) -> None:
            # the shape record that `distill export` and `teacher: {megatron: ...}` read (rank 0, before commit)
            write_checkpoint_meta(tr.stage.student, str(tmp),
                                  make_vocab_size_divisible_by=self.recipe.parallel.make_vocab_size_divisible_by)

        path = save_checkpoint(
            self.ckpt_dir, tr.step, model_state=tr.stage.state_dict(), optimizer_state=optimizer_state_dict(tr.optimizer),
            scheduler_state=tr.scheduler.state_dict(), data_state=self.data.state_dict(),
            parts_state=self._parts_state(), extra=tr.counters(), layout=self.layout, keep=self.recipe.checkpoint.keep,
            sharded_model_state=tr.stage.sharded_state_dict(), before_commit=add_model_record)
        self.last_saved_step = tr.step
        return path

    def _parts_state(self) -> dict:
        state = {k: p.state_dict() for k, p in self.parts.stateful().items()}
        aligner_state = self.aligner.state_dict()
        if aligner_state:
            state["aligner"] = aligner_state
        sequences_state = self.sequences.state_dict()
        if sequences_state:  # a stateful source (a schedule, a replay buffer): parts/sequences
            state["sequences"] = sequences_state
        return state

    def load(self, path: str | Path, *, checked: bool = False) -> None:
        """Restore student, optimizer, scheduler, data position, parts and counters from ``path``. Collective.

        Args:
            path: a checkpoint written by :meth:`save` with the same layout.
            checked: ``path`` came from :func:`resolve_resume`, which verified it on every rank.

        The learning-rate schedule follows this engine's recipe (a changed
        ``training.steps``, ``warmup_steps``, ``lr_decay``, ``lr`` or ``min_lr``
        applies from the next step; a warning names the changes).

        Raises:
            DistillError: on every rank when the checkpoint fails its checks or any rank cannot restore it.
        """
        if not checked:
            errors = check_checkpoint(path)
            if errors:
                raise DistillError(f"cannot resume from {path}: {'; '.join(errors)}")
        rank, _ = rank_world()
        error, changes = None, []
        try:
            changes = self._restore(Path(path))
        except Exception as exc:  # any rank's failure becomes every rank's error: no rank trains alone
            error = f"rank {rank}: {type(exc).__name__}: {exc}"
        errors = agree_errors(error)
        if errors:
            raise DistillError(f"cannot resume from {path}: {'; '.join(errors)}")
        tr = self.trainer
        if changes and global_rank() == 0:
            log.warning("resuming %s at step %d with a changed learning-rate schedule (%s): the schedule follows "
                        "this recipe from step %d on (lr now %.3g)", path, tr.step, ", ".join(changes), tr.step + 1,
                        tr.current_lr())
        log.info("resumed from %s at step %d", path, tr.step)

    def _restore(self, path: Path) -> list[str]:
        """Load this rank's file into every component; returns the schedule keys the recipe changed."""
        tr = self.trainer
        ck = load_checkpoint(path, layout=self.layout, verify=False)  # checksums: check_checkpoint/resolve_resume
        tr.stage.load_state_dict(ck.model_state)
        fresh = [(g.get("max_lr"), g.get("min_lr")) for g in tr.optimizer.param_groups]
        load_optimizer_state(tr.optimizer, ck.optimizer_state)
        groups = tr.optimizer.param_groups
        if len(groups) == len(fresh):  # this recipe's per-group learning rates, not the checkpoint's
            for group, (max_lr, min_lr) in zip(groups, fresh):
                if max_lr is not None:
                    group["max_lr"] = max_lr
                if min_lr is not None:
                    group["min_lr"] = min_lr
        saved = dict(ck.scheduler_state or {})
        tr.scheduler.load_state_dict(ck.scheduler_state)
        changes = [f"{key} {saved[name]} -> {getattr(tr.scheduler, name)}" for name, key in _SCHEDULE_KEYS.items()
                   if name in saved and saved[name] != getattr(tr.scheduler, name)]
        self.data.load_state_dict(ck.data_state)
        parts = self.parts.stateful()
        saved_parts = dict(ck.parts_state or {})
        if self.aligner.state_dict() or "aligner" in saved_parts:
            self.aligner.load_state_dict(saved_parts.pop("aligner", {}))
        self.sequences.load_state_dict(saved_parts.pop("sequences", {}))
        for key, state in saved_parts.items():
            if key in parts:
                parts[key].load_state_dict(state)
        tr.load_counters(ck.extra or {})
        return changes


def run(recipe: Recipe, host: "PluginHost", *, cpu: bool = False) -> int:
    """Train ``recipe`` in this process (one of torchrun's, or a single process).

    Args:
        recipe: a validated recipe.
        host: the plugin host (``distill_plugins.manager.build_plugin_host``).
        cpu: force the CPU layer (``distill run --cpu``); also on when ``recipe.device == "cpu"``.

    Returns:
        Process exit status: 0 when training finished or stopped on a signal after saving.

    Raises:
        DistillError: recipe/user errors (the CLI prints them and exits with 2), including
            :class:`~distill_plugins.engine.trainer.NonFiniteLossError`, an unwritable
            ``output_dir`` and a checkpoint that could not be saved.
    """
    signals = install_stop_handlers()  # first: a signal during the slow start-up must not kill the process
    cpu = bool(cpu or recipe.device == "cpu")
    cpu_enabled = False
    try:
        configure_logging()
        check_writable([("output_dir", recipe.output_dir), ("checkpoint.dir", checkpoint_directory(recipe))])
        if cpu:
            enable_cpu_mode()
            cpu_enabled = True
        if recipe.teacher_parallel is None:
            engine = Engine(recipe, host, cpu=cpu, signals=signals)
        else:  # a teacher on ranks of its own: this process is a student or a teacher rank (docs/separate_teacher.md)
            resolved = resolve_specs(recipe)
            engine = start_separate(resolved, cpu=cpu, vocab_size=resolve_vocab_sizes(resolved)[0], signals=signals,
                                    build_student=lambda p: Engine(recipe, host, cpu=cpu, signals=signals,
                                                                   teacher_provider=p))
        if global_rank() == 0:
            write_run_record(engine.recipe, host, recipe.output_dir)
        return engine.train()
    finally:
        restore_stop_handlers()
        if cpu_enabled:  # in-process callers (tests, notebooks) get torch back as it was
            disable_cpu_mode()
