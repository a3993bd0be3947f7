"""Entry point of ``distill run``: one call per torchrun process.

Design
------
:func:`run` turns a validated recipe and a plugin host into a training run on
this process:

1. CPU layer on when ``device: cpu`` or ``--cpu`` (:mod:`.cpu`);
2. model specs completed from ``hf:`` / ``megatron:`` checkpoints
   (``hf_import.resolve_model_spec``), the real vocabulary resolved (recipe,
   else tokenizer);
3. torch.distributed + megatron parallel state (:mod:`.parallel_state`);
4. objective, selector and temperature policy built through the host
   (:func:`.loss.build_loss_parts`);
5. data iterator (``distill_plugins.data.iterators.build_data``);
6. student, teacher, DDP, optimizer and scheduler (:class:`.train.Trainer`);
7. resume from ``checkpoint.resume`` (``auto``: latest valid checkpoint);
8. the loop: train steps; save every ``checkpoint.interval`` steps, at the end,
   and when SIGUSR1/SIGTERM reached any rank (all ranks agree at the step
   boundary, save, and return 0 so a SLURM requeue resumes);
   evaluation every ``training.eval_interval`` steps.

Checkpoints (``distill_plugins.megatron.checkpoint``) hold the student only
(never the teacher), the optimizer, the scheduler, RNG states, the data
position, every stateful part's ``state_dict()`` and the engine's counters;
the student weights are also written with ``dist_checkpointing``
(``model_dist/``) so ``student.checkpoint`` / ``teacher.checkpoint`` can load
them under another TP/PP layout.

Usage (what the CLI does in each process)::

    from distill_plugins.megatron.engine import run
    status = run(recipe, host, cpu=args.cpu)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ..errors import DistillError, RecipeError
from ..logging import configure_logging, get_logger
from ..recipe.schema import Recipe

__all__ = ["run", "resolve_vocab_size", "resolve_specs", "Engine"]

log = get_logger(__name__)

#: environment variable naming the requeue marker file the SLURM scripts watch
REQUEUE_MARKER_ENV = "DISTILL_REQUEUE_MARKER"


def resolve_specs(recipe: Recipe) -> Recipe:
    """``recipe`` with student/teacher shape keys read from their ``hf:``/``megatron:`` checkpoints."""
    try:
        from .hf_import import resolve_model_spec
    except ImportError:  # pragma: no cover - HF import module absent
        return recipe
    return dataclasses.replace(recipe, student=resolve_model_spec(recipe.student),
                               teacher=resolve_model_spec(recipe.teacher))


def resolve_vocab_size(recipe: Recipe) -> int:
    """The real vocabulary shared by student and teacher.

    Raises:
        RecipeError: unknown, or student and teacher differ (the megatron engine
            distils over one shared vocabulary; cross-tokenizer aligners are not
            run by the engine).
    """
    s, t = recipe.student.vocab_size, recipe.teacher.vocab_size
    if s is not None and t is not None and s != t:
        raise RecipeError(f"student.vocab_size={s} and teacher.vocab_size={t} differ: the megatron engine needs one "
                          "shared vocabulary (same tokenizer); cross-tokenizer aligners are not supported by it")
    vocab = s or t
    if vocab is None:
        try:
            from ..data.iterators import resolve_tokenizer

            tok = resolve_tokenizer(recipe)
        except ImportError:
            tok = None
        if tok is not None:
            vocab = int(tok.vocab_size)
        elif recipe.data.kind == "embedded":
            from ..data.embedded import DEFAULT_VOCAB_SIZE

            vocab = DEFAULT_VOCAB_SIZE
    if vocab is None:
        raise RecipeError("the vocabulary size is unknown: set student.vocab_size or data.tokenizer")
    return int(vocab)


class Engine:
    """A built run: trainer + data + checkpointing (used by :func:`run` and by tests)."""

    def __init__(self, recipe: Recipe, host: Any, *, cpu: bool, parts=None, data=None,
                 student_init=None, teacher_init=None):
        from . import parallel_state as dps
        from .loss import build_loss_parts
        from .train import Trainer

        self.recipe = recipe = resolve_specs(recipe)
        self.cpu = cpu
        self.vocab_size = resolve_vocab_size(recipe)
        self.ctx = dps.initialize(recipe.parallel, seed=recipe.seed, cpu=cpu)
        self.parts = parts if parts is not None else build_loss_parts(recipe, host)
        from .checkpoint import checkpoint_directory, resolve_resume

        self.ckpt_dir = checkpoint_directory(recipe)
        self.resume_path = resolve_resume(recipe.checkpoint.resume, self.ckpt_dir)
        if data is None:
            from ..data.iterators import build_data

            data = build_data(recipe, dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp_size)
        self.data = data
        self.trainer = Trainer.build(recipe, self.parts, ctx=self.ctx, data=data, vocab_size=self.vocab_size,
                                     host=host, cpu=cpu, student_init=student_init, teacher_init=teacher_init)
        self.layout = {"tp": recipe.parallel.tensor, "pp": recipe.parallel.pipeline, "dp": self.ctx.dp_size}
        if self.resume_path is not None:
            self.load(self.resume_path)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Any:
        """Save a checkpoint of the current step (collective)."""
        from .checkpoint import save_checkpoint

        tr = self.trainer
        if self.recipe.parallel.distributed_optimizer:
            raise DistillError("checkpointing with parallel.distributed_optimizer is not supported yet; set it false")
        path = save_checkpoint(
            self.ckpt_dir, tr.step, model_state=tr.stage.state_dict(), optimizer_state=tr.optimizer.state_dict(),
            scheduler_state=tr.scheduler.state_dict(), data_state=self.data.state_dict(),
            parts_state={k: p.state_dict() for k, p in self.parts.stateful().items()},
            extra=tr.counters(), layout=self.layout, keep=self.recipe.checkpoint.keep,
            sharded_model_state=tr.stage.sharded_state_dict())
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            from .megatron_ckpt import write_checkpoint_meta

            # the shape record that `distill export` and `teacher: {megatron: ...}` read
            write_checkpoint_meta(tr.stage.student, str(path),
                                  make_vocab_size_divisible_by=self.recipe.parallel.make_vocab_size_divisible_by)
        return path

    def load(self, path) -> None:
        """Restore student, optimizer, scheduler, data position, parts and counters from ``path``."""
        from .checkpoint import load_checkpoint

        tr = self.trainer
        ck = load_checkpoint(path, layout=self.layout)
        tr.stage.load_state_dict(ck.model_state)
        tr.optimizer.load_state_dict(ck.optimizer_state)
        tr.scheduler.load_state_dict(ck.scheduler_state)
        self.data.load_state_dict(ck.data_state)
        parts = self.parts.stateful()
        for key, state in (ck.parts_state or {}).items():
            if key in parts:
                parts[key].load_state_dict(state)
        tr.load_counters(ck.extra or {})
        log.info("resumed from %s at step %d", path, tr.step)

    # ------------------------------------------------------------------ loop
    def train(self, steps: Optional[int] = None, *, stop=None) -> int:
        """Train to ``steps`` (default ``training.steps``), checkpointing as the recipe says; returns 0."""
        from .signals import StopSignals

        rc = self.recipe.checkpoint
        tr = self.trainer
        end = self.recipe.training.steps if steps is None else steps
        eval_data = None
        with (stop if stop is not None else StopSignals()) as signals:
            while tr.step < end:
                result = tr.train_step()
                if self.recipe.training.eval_interval and tr.step % self.recipe.training.eval_interval == 0:
                    if eval_data is None:
                        from ..data.iterators import build_eval_data

                        eval_data = build_eval_data(self.recipe, dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp_size)
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
            :class:`~distill_plugins.megatron.train.NonFiniteLossError`.
    """
    configure_logging()
    cpu = bool(cpu or recipe.device == "cpu")
    if cpu:
        from .cpu import enable_cpu_mode

        enable_cpu_mode()
    engine = Engine(recipe, host, cpu=cpu)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        from ..recipe.record import write_run_record

        write_run_record(engine.recipe, host, recipe.output_dir)
    return engine.train()
