"""Entry point of ``distill run``: one call per torchrun process.

Design
------
:func:`run` turns a validated recipe and a plugin host into a training run on
this process:

1. CPU layer on when ``device: cpu`` or ``--cpu`` (:mod:`.cpu`);
2. model specs completed from ``hf:`` / ``megatron:`` checkpoints
   (``models.resolve.resolve_model_spec``), the real vocabulary resolved (recipe,
   else tokenizer);
3. torch.distributed + megatron parallel state (:mod:`.parallel_state`);
4. objective, selector and temperature policy built through the host
   (:func:`.loss.build_loss_parts`), and the vocabulary aligner
   (:class:`.alignment.AlignerRuntime`; ``auto`` resolved);
5. data iterator (``distill_plugins.data.iterators.build_data``; for two
   tokenizers ``distill_plugins.data.text_batches.build_aligned_data``);
6. student, teacher, DDP, optimizer and scheduler (:class:`.train.Trainer`);
7. resume from ``checkpoint.resume`` (``auto``: latest valid checkpoint);
8. the loop: train steps; save every ``checkpoint.interval`` steps, at the end,
   and when SIGUSR1/SIGTERM reached any rank (all ranks agree at the step
   boundary, save, and return 0 so a SLURM requeue resumes);
   evaluation every ``training.eval_interval`` steps.

Checkpoints (``distill_plugins.checkpoint.run_checkpoint``) hold the student only
(never the teacher), the optimizer, the scheduler, RNG states, the data
position, every stateful part's ``state_dict()``, the aligner's trainable
modules (DSKD projectors) and the engine's counters;
the student weights are also written with ``dist_checkpointing``
(``model_dist/``) so ``student.checkpoint`` / ``teacher.checkpoint`` can load
them under another TP/PP layout.

Usage (what the CLI does in each process)::

    from distill_plugins.engine.run import run
    status = run(recipe, host, cpu=args.cpu)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from distill_plugins.errors import DistillError, RecipeError, RecipeWarning
from distill_plugins.logging import configure_logging, get_logger
from distill_plugins.recipe.schema import Recipe
from distill_plugins.recipe.validate import tokenizer_vocab_errors

__all__ = ["run", "resolve_vocab_sizes", "resolve_specs", "Engine"]

log = get_logger(__name__)

#: environment variable naming the requeue marker file the SLURM scripts watch
REQUEUE_MARKER_ENV = "DISTILL_REQUEUE_MARKER"


def resolve_specs(recipe: Recipe) -> Recipe:
    """``recipe`` with student/teacher shape keys read from their ``hf:``/``megatron:`` checkpoints."""
    try:
        from distill_plugins.models.resolve import resolve_model_spec
    except ImportError:  # pragma: no cover - HF import module absent
        return recipe
    return dataclasses.replace(recipe, student=resolve_model_spec(recipe.student),
                               teacher=resolve_model_spec(recipe.teacher))


def _tokenizer_vocab(recipe: Recipe, which: str) -> Optional[int]:
    try:
        from distill_plugins.data.iterators import resolve_tokenizer
    except ImportError:  # pragma: no cover - data package absent
        return None
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
        from distill_plugins.data.embedded import DEFAULT_VOCAB_SIZE

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
    """A built run: trainer + data + checkpointing (used by :func:`run` and by tests)."""

    def __init__(self, recipe: Recipe, host: Any, *, cpu: bool, parts=None, data=None,
                 student_init=None, teacher_init=None):
        from distill_plugins.engine import process_groups as dps
        from distill_plugins.engine.loss import build_loss_parts
        from distill_plugins.engine.trainer import Trainer

        from distill_plugins.engine.alignment import AlignerRuntime

        self.recipe = recipe = resolve_specs(recipe)
        self.cpu = cpu
        self.vocab_size, self.teacher_vocab_size = resolve_vocab_sizes(recipe)
        self.ctx = dps.initialize(recipe.parallel, seed=recipe.seed, cpu=cpu)
        self.parts = parts if parts is not None else build_loss_parts(recipe, host)
        self.aligner = AlignerRuntime.build(recipe, host if host is not None else _default_host(),
                                            student_vocab_size=self.vocab_size,
                                            teacher_vocab_size=self.teacher_vocab_size)
        from distill_plugins.checkpoint.run_checkpoint import checkpoint_directory, resolve_resume

        self.ckpt_dir = checkpoint_directory(recipe)
        self.resume_path = resolve_resume(recipe.checkpoint.resume, self.ckpt_dir)
        if data is None:
            data = self._build_data(split="train")
        self.data = data
        self.trainer = Trainer.build(recipe, self.parts, ctx=self.ctx, data=data, vocab_size=self.vocab_size,
                                     host=host, cpu=cpu, student_init=student_init, teacher_init=teacher_init,
                                     teacher_vocab_size=self.teacher_vocab_size, aligner=self.aligner)
        self.layout = {"tp": recipe.parallel.tensor, "pp": recipe.parallel.pipeline, "dp": self.ctx.dp_size}
        if self.resume_path is not None:
            self.load(self.resume_path)

    def _build_data(self, *, split: str, eval: bool = False):
        """This DP rank's batches: token ids, or raw text with both tokenizations for two tokenizers."""
        kw = dict(dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp_size, split=split)
        if self.aligner.text_batches:
            from distill_plugins.data.text_batches import build_aligned_data, build_aligned_eval_data

            build = build_aligned_eval_data if eval else build_aligned_data
            return build(self.recipe, pairing=self.aligner.pairing, **kw)
        from distill_plugins.data.iterators import build_data, build_eval_data

        return (build_eval_data if eval else build_data)(self.recipe, **kw)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Any:
        """Save a checkpoint of the current step (collective)."""
        from distill_plugins.checkpoint.run_checkpoint import save_checkpoint
        from distill_plugins.checkpoint.optimizer_state import optimizer_state_dict

        tr = self.trainer
        path = save_checkpoint(
            self.ckpt_dir, tr.step, model_state=tr.stage.state_dict(), optimizer_state=optimizer_state_dict(tr.optimizer),
            scheduler_state=tr.scheduler.state_dict(), data_state=self.data.state_dict(),
            parts_state=self._parts_state(),
            extra=tr.counters(), layout=self.layout, keep=self.recipe.checkpoint.keep,
            sharded_model_state=tr.stage.sharded_state_dict())
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            from distill_plugins.models.megatron_ckpt import write_checkpoint_meta

            # the shape record that `distill export` and `teacher: {megatron: ...}` read
            write_checkpoint_meta(tr.stage.student, str(path),
                                  make_vocab_size_divisible_by=self.recipe.parallel.make_vocab_size_divisible_by)
        return path

    def _parts_state(self) -> dict:
        state = {k: p.state_dict() for k, p in self.parts.stateful().items()}
        aligner_state = self.aligner.state_dict()
        if aligner_state:
            state["aligner"] = aligner_state
        return state

    def load(self, path) -> None:
        """Restore student, optimizer, scheduler, data position, parts and counters from ``path``."""
        from distill_plugins.checkpoint.run_checkpoint import load_checkpoint

        tr = self.trainer
        ck = load_checkpoint(path, layout=self.layout)
        tr.stage.load_state_dict(ck.model_state)
        from distill_plugins.checkpoint.optimizer_state import load_optimizer_state

        load_optimizer_state(tr.optimizer, ck.optimizer_state)
        tr.scheduler.load_state_dict(ck.scheduler_state)
        self.data.load_state_dict(ck.data_state)
        parts = self.parts.stateful()
        saved = dict(ck.parts_state or {})
        if self.aligner.state_dict() or "aligner" in saved:
            self.aligner.load_state_dict(saved.pop("aligner", {}))
        for key, state in saved.items():
            if key in parts:
                parts[key].load_state_dict(state)
        tr.load_counters(ck.extra or {})
        log.info("resumed from %s at step %d", path, tr.step)

    # ------------------------------------------------------------------ loop
    def train(self, steps: Optional[int] = None, *, stop=None) -> int:
        """Train to ``steps`` (default ``training.steps``), checkpointing as the recipe says; returns 0."""
        from distill_plugins.engine.signals import StopSignals

        rc = self.recipe.checkpoint
        tr = self.trainer
        end = self.recipe.training.steps if steps is None else steps
        eval_data = None
        with (stop if stop is not None else StopSignals()) as signals:
            while tr.step < end:
                result = tr.train_step()
                if self.recipe.training.eval_interval and tr.step % self.recipe.training.eval_interval == 0:
                    if eval_data is None:
                        eval_data = self._build_data(split="valid", eval=True)
                    tr.evaluate(eval_data)
                stopping = signals.should_stop()
                if stopping or (rc.interval and tr.step % rc.interval == 0) or tr.step == end:
                    self.save()
                if stopping:
                    if tr.step < end:
                        self._write_requeue_marker()
                    log.warning("stop signal received: saved step %d; exiting with status 0 (resume: auto continues)",
                                result.step)
                    return 0
        return 0

    def _write_requeue_marker(self) -> None:
        """Tell the job script to requeue (docs/launching.md): ``step=<n>`` in ``$DISTILL_REQUEUE_MARKER``.

        Written by global rank 0 after the checkpoint is complete, only when training is unfinished;
        defaults to ``<output_dir>/REQUEUE`` when the variable is unset.
        """
        import os
        from pathlib import Path

        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return
        marker = Path(os.environ.get(REQUEUE_MARKER_ENV) or Path(self.recipe.output_dir) / "REQUEUE")
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(f"step={self.trainer.step}\n")
        os.replace(tmp, marker)


def _default_host() -> Any:
    from distill_plugins.manager import build_plugin_host

    return build_plugin_host()


def run(recipe: Recipe, host: Any, *, cpu: bool = False) -> int:
    """Train ``recipe`` in this process (one of torchrun's, or a single process).

    Args:
        recipe: a validated recipe.
        host: the plugin host (``distill_plugins.manager.build_plugin_host``).
        cpu: force the CPU layer (``distill run --cpu``); also on when ``recipe.device == "cpu"``.

    Returns:
        Process exit status: 0 when training finished or stopped on a signal after saving.

    Raises:
        DistillError: recipe/user errors (the CLI prints them), including
            :class:`~distill_plugins.engine.trainer.NonFiniteLossError`.
    """
    configure_logging()
    cpu = bool(cpu or recipe.device == "cpu")
    if cpu:
        from distill_plugins.engine.cpu import enable_cpu_mode

        enable_cpu_mode()
    engine = Engine(recipe, host, cpu=cpu)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        from distill_plugins.recipe.record import write_run_record

        write_run_record(engine.recipe, host, recipe.output_dir)
    return engine.train()
