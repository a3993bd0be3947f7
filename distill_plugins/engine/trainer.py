"""One optimizer step of a distillation run: DDP, optimizer, LR schedule, NaN guard, step metrics.

Design
------
:class:`Trainer` owns one rank's share of a distillation run and runs one
optimizer step at a time (:meth:`Trainer.train_step`) or one forward-only
evaluation (:meth:`Trainer.evaluate`). The loop around the steps (evaluation
and checkpoint schedules, stop signals, metrics file, progress lines, plugin
observers) is :meth:`distill_plugins.engine.run.Engine.train`, through the
callbacks of :mod:`distill_plugins.engine.callbacks`. The trainer holds:

* ``model``: megatron's ``DistributedDataParallel`` around a
  :class:`~distill_plugins.engine.stage.DistillStage` (student trainable,
  teacher frozen and outside DDP);
* ``optimizer``: ``get_megatron_optimizer`` with an Adam ``OptimizerConfig``
  (decoupled weight decay, gradient clipping, the distributed optimizer when
  ``parallel.distributed_optimizer``);
* ``scheduler``: megatron's ``OptimizerParamScheduler`` counting optimizer steps
  (linear warm-up to ``training.lr``, then cosine/linear/constant decay to
  ``training.min_lr`` at ``training.steps``);
* ``parts``: the :class:`~distill_plugins.engine.loss.LossParts`.

One step (:meth:`Trainer.train_step`):

1. with a generating sequence source (``sequences``: ``on_policy``, ``mixed``,
   ``teacher_generated``, a plugin's), pull the step's microbatches and let
   :class:`~distill_plugins.engine.sequences.SequenceRuntime` plan them,
   generate the planned responses from the student / teacher and rebuild the
   batches (docs/sequences.md; ``gen_s``, ``generated_tokens``,
   ``on_policy_fraction`` join the metrics); then zero the grad buffers; run
   the step's ``num_microbatches = global_batch / (micro_batch * DP)``
   microbatches through megatron's schedule
   (:func:`~distill_plugins.engine.stage.forward_backward`); the loss glue
   returns (sum, count, report) per microbatch and megatron divides the
   gradients by the step's global token count. On the fused output layer
   (``loss.fused_output_layer``, decided once in :meth:`Trainer.build` by
   :func:`~distill_plugins.objectives.fused.decide_fused_output_layer`) the last
   stage hands hidden states and output-layer weights instead of logits and
   :meth:`Trainer._loss_fn` calls :func:`~distill_plugins.engine.fused_loss.fused_distill_loss`;
2. reduce the reports: sum over microbatches, all-reduce over DP on the last
   pipeline stage, broadcast over the pipeline group, so every rank holds the
   same figures;
3. NaN/Inf guard: a rank flags the step when its loss reports or its gradients
   are non-finite; the flag is all-reduced (MAX) over *all* ranks, so either
   every rank steps or every rank skips. A skipped step leaves parameters,
   optimizer state and LR schedule untouched and is counted (``nonfinite_skips``);
   after ``training.max_consecutive_nonfinite`` skips in a row
   :meth:`Trainer.check_nonfinite_streak` (called by the loop) raises
   :class:`NonFiniteLossError`. Under fp16, overflowing gradients are left to
   megatron's dynamic loss scaler (it skips that update and halves the scale;
   counted as ``loss_scale_skips``);
4. otherwise advance the LR schedule and ``optimizer.step()`` (clipping);
5. call every stateful part's ``on_optimizer_step(StepStats)`` with the
   DP-reduced KD loss and return the step's :class:`StepResult` (identical on
   every rank).

The LR schedule follows the recipe it is built from, also after a resume
(``override_opt_param_scheduler``): a checkpoint restores the number of steps
done, not the schedule's length (docs/checkpoints.md, "Changing the recipe").

Usage::

    trainer = Trainer.build(recipe, parts, ctx=ctx, data=my_iterator, vocab_size=V, cpu=True)
    result = trainer.train_step()          # one optimizer step
    trainer.check_nonfinite_streak()       # raises after too many skipped steps in a row
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from distill_plugins.errors import DistillError, RecipeError
from distill_plugins.interfaces import StepStats
from distill_plugins.logging import get_logger
from distill_plugins.parallel import ParallelContext
from distill_plugins.recipe.schema import Recipe
from distill_plugins.models import build as models
from distill_plugins.aligners.base import resolve_aligner
from distill_plugins.engine.fused_loss import fused_distill_loss
from distill_plugins.engine.loss import REPORT_KEYS, LossParts, distill_loss
from distill_plugins.engine.stage import DistillStage, StageOutput, check_schedule, forward_backward
from distill_plugins.engine.sequences import SequenceRuntime
from distill_plugins.models.sources import build_teacher, load_model_weights
from distill_plugins.objectives.fused import decide_fused_output_layer

__all__ = ["Trainer", "StepResult", "NonFiniteLossError", "num_microbatches", "reduce_reports"]

log = get_logger(__name__)


class NonFiniteLossError(DistillError):
    """Too many consecutive steps with NaN/Inf losses or gradients."""


def num_microbatches(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """``global / (micro * DP)``; raises :class:`RecipeError` when it does not divide."""
    per = micro_batch_size * dp_size
    if global_batch_size % per:
        raise RecipeError(f"training.global_batch_size={global_batch_size} is not a multiple of "
                          f"training.micro_batch_size x data-parallel size = {micro_batch_size} x {dp_size}")
    return global_batch_size // per


@dataclass
class StepResult:
    """The figures of one optimizer step, identical on every rank."""

    step: int
    skipped: bool
    metrics: dict[str, float] = field(default_factory=dict)


def reduce_reports(reports: list[dict[str, torch.Tensor]], ctx: ParallelContext, *, is_last_stage: bool,
                   device: Any = "cpu", keys: tuple[str, ...] = REPORT_KEYS) -> dict[str, float]:
    """Sum per-microbatch reports, all-reduce over DP, broadcast from the last pipeline stage.

    Every rank calls it with the same ``keys``; the result is identical everywhere.
    """
    vec = torch.zeros(len(keys), dtype=torch.float64, device=device)
    if is_last_stage:
        for r in reports:
            vec += torch.stack([r[k].to(vec) for k in keys])
        if ctx.dp_group is not None and dist.get_world_size(ctx.dp_group) > 1:
            dist.all_reduce(vec, group=ctx.dp_group)
    if ctx.pp_group is not None and dist.get_world_size(ctx.pp_group) > 1:
        last = dist.get_global_rank(ctx.pp_group, dist.get_world_size(ctx.pp_group) - 1)
        dist.broadcast(vec, src=last, group=ctx.pp_group)
    return {k: float(v) for k, v in zip(keys, vec.tolist())}


class Trainer:
    """One rank's distillation run (see module docstring)."""

    def __init__(self, *, recipe: Recipe, ctx: ParallelContext, model, stage: DistillStage, optimizer, scheduler,
                 parts: LossParts, data: Iterator[dict[str, torch.Tensor]], vocab_size: int,
                 cpu: bool = False, aligner=None, teacher_provider=None,
                 sequences: SequenceRuntime | None = None):
        self.recipe, self.ctx, self.model, self.stage = recipe, ctx, model, stage
        #: the sequence source at work (:mod:`.sequences`), or None / a non-generating one (the data's responses)
        self.sequences = sequences
        self.optimizer, self.scheduler, self.parts, self.data = optimizer, scheduler, parts, data
        self.vocab_size, self.cpu = vocab_size, cpu
        #: the :class:`~.alignment.AlignerRuntime`, or None (one vocabulary, usual glue)
        self.aligner = aligner
        self.report_keys = REPORT_KEYS + (aligner.report_keys if aligner is not None else ())
        #: a teacher on its own ranks (:class:`~.remote_teacher.RemoteTeacher`): teacher logits per microbatch
        self.teacher_provider = teacher_provider
        self.report_keys += teacher_provider.report_keys if teacher_provider is not None else ()
        t = recipe.training
        self.num_microbatches = num_microbatches(t.global_batch_size, t.micro_batch_size, ctx.dp_size)
        self.step = 0  # optimizer steps completed (skipped steps included)
        self.nonfinite_skips = 0
        self.consecutive_nonfinite = 0
        self.empty_microbatches = 0
        self.loss_scale_skips = 0  # fp16 steps the dynamic loss scaler skipped (overflow)
        self._t0: float | None = None
        self._steps_timed = 0
        self._tokens_timed = 0.0

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, recipe: Recipe, parts: LossParts, *, ctx: ParallelContext, data: Iterator, vocab_size: int,
              cpu: bool = False, teacher_vocab_size: int | None = None, aligner=None,
              teacher_provider=None, sequences: SequenceRuntime | None = None) -> "Trainer":
        """Build student, teacher, DDP, optimizer and scheduler for ``recipe``.

        ``parallel_state`` must be initialised. The student's weights come from
        ``student.hf`` / ``.megatron`` / ``.checkpoint``, else a layout-independent
        random init. ``teacher_vocab_size``: the teacher's real vocabulary when its
        tokenizer differs (default ``vocab_size``); ``aligner``: an
        :class:`~.alignment.AlignerRuntime` (its trainable modules join the
        optimizer). ``teacher_provider``: a teacher on its own ranks (docs/separate_teacher.md);
        no teacher is built here, the loss gets its logits from the provider. ``sequences``:
        a :class:`~.sequences.SequenceRuntime` (where each step's responses come from).
        """
        check_schedule(recipe.parallel.virtual_pipeline)
        t, par = recipe.training, recipe.parallel
        overrides = {"calculate_per_token_loss": True}
        student = models.build_gpt_model(recipe.student, par, vocab_size=vocab_size, precision=t.precision,
                                         cpu=cpu, who="student", config_overrides=overrides)
        load_model_weights(student, recipe.student, seed=recipe.seed, who="student")
        teacher_vocab = vocab_size if teacher_vocab_size is None else teacher_vocab_size
        teacher = None
        if parts.kd_weight > 0 and teacher_provider is None:
            teacher = build_teacher(recipe.teacher, par, vocab_size=teacher_vocab, precision=t.precision, cpu=cpu,
                                    seed=recipe.seed + 1)
        elif teacher_provider is None:
            log.info("loss.kd_weight is 0: no teacher is built (cross-entropy on labels only)")
        reference = None
        if teacher is not None and parts.selector is not None and parts.selector.needs_reference_model:
            if recipe.reference is None:
                raise RecipeError(f"selector {recipe.selector.name!r} needs a reference model: add a `reference:` "
                                  "section (the student's architecture, e.g. {hf: /models/draft-ref})")
            reference = build_teacher(recipe.reference, par, vocab_size=vocab_size, precision=t.precision, cpu=cpu,
                                      seed=recipe.seed + 2, who="reference")
        cross_vocab = aligner is not None and aligner.computes_loss
        if teacher is not None and not cross_vocab and \
                models.model_layout(teacher).padded_vocab_size != models.model_layout(student).padded_vocab_size:
            raise RecipeError("student and teacher padded vocabularies differ; they need the same vocab_size")
        stage = DistillStage(student, teacher, reference)
        aligner_name = aligner.name if aligner is not None else resolve_aligner(recipe).aligner.name
        fused = decide_fused_output_layer(recipe.loss.fused_output_layer, parts, aligner=aligner_name,
                                          separate_teacher=teacher_provider is not None)
        if fused.error:  # distill check reports the same; a recipe built in Python reaches this
            raise RecipeError(fused.error)
        if fused.notice:
            log.info(fused.notice)
        if fused.on:
            stage.fuse_output_layers()  # the last stage's output layers hand hidden states to the fused loss
        if aligner is not None and teacher is not None:
            aligner.attach(stage, tp_group=ctx.tp_group, seed=recipe.seed)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=t.precision != "fp32",
            overlap_grad_reduce=False,
            use_distributed_optimizer=par.distributed_optimizer,
        )
        model = DistributedDataParallel(config=student.config, ddp_config=ddp_config, module=stage)
        opt_config = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad,
            bf16=t.precision == "bf16", fp16=t.precision == "fp16",
            params_dtype=student.config.params_dtype, use_distributed_optimizer=par.distributed_optimizer,
            initial_loss_scale=t.initial_loss_scale,
        )
        overrides = aligner.optimizer_overrides(opt_config) if aligner is not None else None
        optimizer = get_megatron_optimizer(opt_config, [model], config_overrides=overrides)
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0 if t.warmup_steps > 0 else t.lr, max_lr=t.lr, min_lr=t.min_lr,
            lr_warmup_steps=t.warmup_steps, lr_decay_steps=t.steps, lr_decay_style=t.lr_decay,
            start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant",
            # after a resume the schedule is this recipe's (e.g. a longer training.steps), at the saved step count
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        )
        config = student.config
        config.no_sync_func = model.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        if t.precision == "fp16":
            config.grad_scale_func = optimizer.scale_loss
        return cls(recipe=recipe, ctx=ctx, model=model, stage=stage, optimizer=optimizer, scheduler=scheduler,
                   parts=parts, data=data, vocab_size=vocab_size, cpu=cpu, aligner=aligner,
                   teacher_provider=teacher_provider, sequences=sequences)

    # ------------------------------------------------------------------ helpers
    @property
    def is_last_stage(self) -> bool:
        return self.stage.last_stage

    @property
    def total_steps(self) -> int:
        return self.recipe.training.steps

    def _loss_fn(self, batch: dict[str, torch.Tensor], output: StageOutput) -> tuple:
        if self.teacher_provider is not None:  # the teacher runs on its own ranks: its logits from its payload
            output = output._replace(teacher_logits=self.teacher_provider.logits(batch, training=self.model.training))
        if self.aligner is not None and self.aligner.computes_loss and output.teacher_logits is not None:
            loss, count, report = self.aligner.loss(batch, output, self.parts, tp_group=self.ctx.tp_group,
                                                    step=self.step, total_steps=self.total_steps)
            return loss, count.to(torch.int), report
        if output.fused:  # no logits: the output layers fused with the loss (engine.fused_loss)
            loss, count, report = fused_distill_loss(
                output.student_hidden, output.student_weight, output.teacher_hidden, output.teacher_weight,
                batch["labels"], self.parts, loss_mask=batch.get("loss_mask"),
                reference_hidden=output.reference_hidden, reference_weight=output.reference_weight,
                tp_group=self.ctx.tp_group, vocab_size=self.vocab_size, step=self.step,
                total_steps=self.total_steps, sequence_parallel=self.recipe.parallel.sequence_parallel)
            return loss, count.to(torch.int), report
        loss, count, report = distill_loss(
            output.student_logits, output.teacher_logits, batch["labels"], self.parts,
            reference_logits=output.reference_logits, loss_mask=batch.get("loss_mask"),
            tp_group=self.ctx.tp_group, vocab_size=self.vocab_size, step=self.step, total_steps=self.total_steps)
        if self.teacher_provider is not None:
            report.update(self.teacher_provider.report_items())  # teacher_wait_s
        return loss, count.to(torch.int), report

    def _grads_finite(self) -> bool:
        for buffer in list(getattr(self.model, "buffers", [])) + list(getattr(self.model, "expert_parallel_buffers", [])):
            if not bool(torch.isfinite(buffer.grad_data).all()):
                return False
        return True

    def _agree(self, flag: bool) -> bool:
        """All-reduce MAX of a bool over every rank."""
        t = torch.tensor([1.0 if flag else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def current_lr(self) -> float:
        """The current learning rate of the first parameter group."""
        groups = self.optimizer.param_groups
        return float(groups[0]["lr"]) if groups else 0.0

    def grad_norm(self) -> float:
        """Global gradient L2 norm over all model-parallel ranks (after DP reduction)."""
        return float(self.optimizer.get_grad_norm())

    # ------------------------------------------------------------------ step
    def train_step(self) -> StepResult:
        """Run one optimizer step (see module docstring); identical result on every rank."""
        t = self.recipe.training
        if self._t0 is None:
            self._t0 = time.perf_counter()
        start = time.perf_counter()
        data, gen_figures = self._step_batches()
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = forward_backward(self.model, data, self._loss_fn, num_microbatches=self.num_microbatches,
                                   seq_length=self.recipe.data.seq_length, micro_batch_size=t.micro_batch_size)
        sums = reduce_reports(reports, self.ctx, is_last_stage=self.is_last_stage, keys=self.report_keys)
        # fp16: overflowing gradients are the dynamic loss scaler's business (megatron's optimizer
        # skips the update and lowers the scale); only a non-finite loss is the guard's.
        local_bad = t.precision != "fp16" and not self._grads_finite()
        if self.is_last_stage:
            local_bad = local_bad or sums["nonfinite"] > 0 or not math.isfinite(sums["kd_sum"] + sums["ce_sum"])
        skipped = self._agree(local_bad)
        grad_norm = float("nan")
        if skipped:
            self.nonfinite_skips += 1
            self.consecutive_nonfinite += 1
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
        else:
            self.consecutive_nonfinite = 0
            self.scheduler.step(increment=1)
            if t.clip_grad <= 0:
                grad_norm = self.grad_norm()
            ok, norm, _ = self.optimizer.step()
            if norm is not None:
                grad_norm = float(norm)
            if not ok:  # fp16 loss-scaler overflow: megatron skipped the update and lowered the scale
                self.loss_scale_skips += 1
        self.step += 1
        self.empty_microbatches += int(sums["empty_microbatches"])
        elapsed = time.perf_counter() - start
        metrics = self._metrics(sums, grad_norm, skipped, elapsed)
        metrics.update(gen_figures)
        result = StepResult(step=self.step, skipped=skipped, metrics=metrics)
        if not skipped:
            stats = StepStats(step=self.step, total_steps=self.total_steps, kd_loss=metrics["kd_loss"],
                              extras={"kept_fraction": metrics["kept_fraction"], "ce_loss": metrics["ce_loss"],
                                      "loss": metrics["loss"]})
            for part in self.parts.stateful().values():
                part.on_optimizer_step(stats)
            if self.sequences is not None:
                self.sequences.source.on_optimizer_step(stats)
        return result

    def _step_batches(self) -> tuple[Iterator[dict[str, Any]], dict[str, float]]:
        """The step's microbatches and generation figures: the data iterator itself for the data's responses,
        else the batches :meth:`~.sequences.SequenceRuntime.rollout` rebuilt with generated responses."""
        if self.sequences is None or not self.sequences.generates:
            return self.data, {}
        batches = [next(self.data) for _ in range(self.num_microbatches)]
        batches, figures = self.sequences.rollout(batches, self.stage, step=self.step, total_steps=self.total_steps)
        return iter(batches), figures

    def check_nonfinite_streak(self) -> None:
        """Raise :class:`NonFiniteLossError` after ``training.max_consecutive_nonfinite`` skipped steps in a row.

        The counter is identical on every rank, so every rank raises at the same step.
        """
        limit = self.recipe.training.max_consecutive_nonfinite
        if self.consecutive_nonfinite >= limit:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive steps had NaN/Inf losses or gradients (last: step "
                f"{self.step}); stopping (training.max_consecutive_nonfinite={limit}). "
                "Lower training.lr, check the data and the teacher, or use precision fp32/bf16")

    def _metrics(self, sums: dict[str, float], grad_norm: float, skipped: bool, elapsed: float) -> dict[str, float]:
        kd = sums["kd_sum"] / sums["kd_count"] if sums["kd_count"] > 0 else 0.0
        ce = sums["ce_sum"] / sums["ce_count"] if sums["ce_count"] > 0 else 0.0
        p = self.parts
        norm = sums["kd_count"] if p.kd_weight > 0 else sums["valid_tokens"]
        loss = (p.kd_weight * sums["kd_sum"] + p.ce_weight * sums["ce_sum"]) / norm if norm > 0 else 0.0
        valid = sums["valid_tokens"]
        # loss-computing aligners: coverage and per-term token means
        aligned = self.aligner.metrics(sums) if self.aligner is not None else {}
        if self.teacher_provider is not None:
            aligned.update(self.teacher_provider.metrics(sums))  # teacher_wait_s
        if not skipped:
            self._steps_timed += 1
            self._tokens_timed += sums["total_tokens"]
        wall = time.perf_counter() - (self._t0 or time.perf_counter())
        tps = self._tokens_timed / wall if wall > 0 else 0.0
        remaining = self.total_steps - self.step
        eta = wall / max(1, self.step) * max(0, remaining)
        return {
            "step": self.step, "loss": loss, "kd_loss": kd, "ce_loss": ce, "lr": self.current_lr(),
            "grad_norm": grad_norm, "tokens": sums["total_tokens"], "valid_tokens": valid,
            "kept_tokens": sums["kept_tokens"], "kept_fraction": sums["kept_tokens"] / valid if valid > 0 else 0.0,
            "tokens_per_second": tps, "step_time_s": elapsed, "eta_s": eta, "skipped": float(skipped),
            "nonfinite_skips": float(self.nonfinite_skips), "consecutive_nonfinite": float(self.consecutive_nonfinite),
            "empty_microbatches": float(self.empty_microbatches), **aligned,
            **({"loss_scale": float(self.optimizer.get_loss_scale()), "loss_scale_skips": float(self.loss_scale_skips)}
               if self.recipe.training.precision == "fp16" else {}),
        }

    # ------------------------------------------------------------------ state
    def counters(self) -> dict[str, int]:
        """The engine's counters, saved in checkpoints."""
        return {"step": self.step, "nonfinite_skips": self.nonfinite_skips,
                "consecutive_nonfinite": self.consecutive_nonfinite, "empty_microbatches": self.empty_microbatches,
                "loss_scale_skips": self.loss_scale_skips}

    def load_counters(self, state: dict[str, int]) -> None:
        self.step = int(state.get("step", self.step))
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.empty_microbatches = int(state.get("empty_microbatches", 0))
        self.loss_scale_skips = int(state.get("loss_scale_skips", 0))

    @torch.no_grad()
    def evaluate(self, eval_data) -> dict[str, float]:
        """Forward-only pass over ``eval_data`` (re-iterable microbatches); the losses, identical on every rank.

        Returns ``eval_kd_loss`` and ``eval_ce_loss`` (token means over the whole
        evaluation set), ``eval_tokens`` and an aligner's ``eval_`` figures.
        """
        t = self.recipe.training
        batches = iter(eval_data)
        n = len(eval_data)
        self.model.eval()
        try:
            reports = forward_backward(self.model, batches, self._loss_fn, num_microbatches=n,
                                       seq_length=self.recipe.data.seq_length, micro_batch_size=t.micro_batch_size,
                                       forward_only=True)
        finally:
            self.model.train()
        sums = reduce_reports(reports, self.ctx, is_last_stage=self.is_last_stage, keys=self.report_keys)
        out = {"eval_kd_loss": sums["kd_sum"] / sums["kd_count"] if sums["kd_count"] > 0 else 0.0,
               "eval_ce_loss": sums["ce_sum"] / sums["ce_count"] if sums["ce_count"] > 0 else 0.0,
               "eval_tokens": sums["valid_tokens"]}
        if self.aligner is not None:
            out.update(self.aligner.metrics(sums, prefix="eval_"))
        return out
