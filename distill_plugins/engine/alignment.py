"""Vocabulary aligners inside the engine: building them, their projectors, their loss.

Design
------
:class:`AlignerRuntime` is what the engine holds for the recipe's ``aligner``:

* ``identity`` (or ``auto`` on one tokenizer): nothing to do; the engine's
  usual glue (:func:`.loss.distill_loss`) compares the logits.
* aligners that compute their own loss (``eta``, ``dskd``, ``uld``, and
  third-party :class:`~distill_plugins.interfaces.VocabAligner` parts with
  ``computes_loss``): :meth:`AlignerRuntime.loss` replaces the objective glue.
  When the two tokenizers differ the batches come from raw text
  (:mod:`distill_plugins.data.text_batches`) and carry ``teacher_tokens`` and
  the exact token alignment; with one tokenizer the usual token batches serve
  and row ``i`` pairs with row ``i``.
* aligners with trainable modules (DSKD projectors): built on the last
  pipeline stage from both output layers (``build_modules``), attached to
  the :class:`~.pipeline.DistillStage` before DDP wraps it (so DDP reduces their
  gradients over data-parallel ranks and the optimizer, clipping and NaN guard
  cover them), learning rate ``learning_rate()`` through a megatron optimizer
  parameter-group override, state saved in the checkpoint's ``parts`` under
  ``aligner``.

Per microbatch (last stage), with ``b, s`` the batch and sequence sizes::

    zs [b, s, Vs_local], zt [b, s, Vt_local]     student / teacher logits
    hs [s, b, d_s],      ht [s, b, d_t]          output-layer inputs (DSKD only)
    pairs = pair_rows(batch, "bs")               aligned rows of the flattened logits
    out   = aligner.loss(AlignerInputs(...))     token sum + count (aligned tokens)
    loss  = kd_weight * out.loss_sum + ce_weight * CE(student, labels) * aligned / valid

The step divides the summed microbatch losses by its global aligned-token
count (the KD normaliser). The CE term's own normaliser is the student's valid
tokens: each microbatch's CE sum is scaled by ``aligned / valid`` (its aligned
and valid student tokens), so its contribution is ``aligned * CE_mean`` and
the step's CE term is ``ce_weight`` times the aligned-weighted mean of the
microbatches' CE token means: the CE token mean when every microbatch has the
same coverage, and never ``valid / aligned`` times too heavy (the ~2.4x of
eta/dskd before). The logged ``loss`` is that objective; ``ce_loss`` the exact
token mean.

A CE-only run (``loss.kd_weight: 0``) builds no teacher and no aligner, but
when the recipe's aligner would read raw-text batches (a cross-tokenizer
aligner and two different tokenizers) it trains on those same batches
(:attr:`AlignerRuntime.text_batches`), so it is the baseline of the aligner run
on the same tokens.

Only temperature policies that do not read the teacher's logits
(``constant``, ``schedule``) and the ``all`` selector combine with these
aligners (the teacher's vocabulary is not the student's); ``distill check``
says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from megatron.core.optimizer import get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey

from distill_plugins.aligners.base import LOGIT_FREE_POLICIES, recipe_problems, resolve_aligner
from distill_plugins.aligners.vocab import as_backend, same_vocabulary
from distill_plugins.data.alignment_collate import pair_rows
from distill_plugins.data.iterators import resolve_tokenizer
from distill_plugins.data.stream import rank0_first
from distill_plugins.data.text_batches import load_tokenizer_pair
from distill_plugins.engine.loss import REPORT_KEYS, LossParts, finish_report, valid_rows
from distill_plugins.errors import RecipeError
from distill_plugins.interfaces import AlignerInputs, Selection, TokenContext, VocabAligner
from distill_plugins.logging import get_logger

__all__ = ["AlignerRuntime", "PROJECTOR_ATTR"]

log = get_logger(__name__)

#: parameter attribute marking aligner parameters (optimizer group override)
PROJECTOR_ATTR = "is_distill_aligner_parameter"

#: report keys of every loss-computing aligner (coverage), before its own term keys
COVERAGE_KEYS = ("aligned", "student_targets")

#: sum over microbatches of ``aligned * CE_mean``: the CE term the step optimises (module docstring)
CE_ALIGNED_KEY = "ce_aligned_sum"


def _same_tokenizer(student_tok: Any, teacher_tok: Any) -> bool:
    """No second tokenizer, the same object, or every token string with the same id on both sides."""
    if teacher_tok is None or student_tok is None or teacher_tok is student_tok:
        return True
    return bool(same_vocabulary(student_tok, teacher_tok))


class AlignerRuntime:
    """The recipe's aligner, set up for this rank (see module docstring).

    Attributes:
        aligner: the built :class:`~distill_plugins.interfaces.VocabAligner`, or None (a run without teacher).
        name: its registered name.
        text_batches: batches must come from raw text with both tokenizations.
        student_vocab_size, teacher_vocab_size: real vocabularies.
    """

    def __init__(self, aligner: Optional[VocabAligner], name: str, *, student_vocab_size: int,
                 teacher_vocab_size: int, text_batches: bool, kd_weight: float = 1.0, ce_weight: float = 0.0):
        self.aligner, self.name = aligner, name
        self.text_batches = text_batches
        self.kd_weight, self.ce_weight = float(kd_weight), float(ce_weight)
        self.student_vocab_size, self.teacher_vocab_size = student_vocab_size, teacher_vocab_size
        self.stage: Any = None  # the DistillStage whose output weights a hidden-state aligner reads (attach)

    @property
    def computes_loss(self) -> bool:
        """:meth:`loss` replaces the objective glue."""
        return self.aligner is not None and self.aligner.computes_loss

    @property
    def needs_hidden(self) -> bool:
        """The stage must return both output layers' inputs."""
        return self.aligner is not None and self.aligner.needs_hidden_states

    @property
    def pairing(self) -> str:
        return self.aligner.pairing if self.aligner is not None else "eta"

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, recipe: Any, host: Any, *, student_vocab_size: int, teacher_vocab_size: int) -> "AlignerRuntime":
        """Build the (resolved) aligner through ``host`` and give it tokenizers and objective."""
        weights = dict(kd_weight=recipe.loss.kd_weight, ce_weight=recipe.loss.ce_weight)
        name = resolve_aligner(recipe).aligner.name
        if recipe.loss.kd_weight == 0:  # no teacher is built: CE only, on the batches the aligner would read
            text = host.part_class("vocab_aligner", name).cross_tokenizer and not _same_tokenizer(
                *(as_backend(t) if t is not None else None for t in _tokenizers(recipe)))
            if text:
                log.info("CE-only run on the raw-text batches of aligner %s (the baseline of that aligner's run)",
                         name)
            return cls(None, "none", student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size,
                       text_batches=text, **weights)
        aligner = host.build("vocab_aligner", name, dict(recipe.aligner.params))
        if not aligner.computes_loss:
            if student_vocab_size != teacher_vocab_size:
                raise RecipeError(f"aligner {name!r} compares logits over one vocabulary, but the student has "
                                  f"{student_vocab_size} tokens and the teacher {teacher_vocab_size}; use a "
                                  "cross-tokenizer aligner (dskd, eta, uld) with data.teacher_tokenizer set")
            return cls(aligner, name, student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size,
                       text_batches=False, **weights)
        problems = recipe_problems(recipe, name)  # the engine-side twin of the check-time rule
        if problems:
            raise RecipeError(problems)
        s_tok, t_tok = (as_backend(t) if t is not None else None for t in _tokenizers(recipe))
        text = aligner.cross_tokenizer and not _same_tokenizer(s_tok, t_tok)
        if not text and student_vocab_size != teacher_vocab_size:
            raise RecipeError(f"aligner {name!r}: the student has {student_vocab_size} tokens and the teacher "
                              f"{teacher_vocab_size}, but there is one tokenizer to align them with; set "
                              "data.tokenizer and data.teacher_tokenizer to the two models' tokenizers")
        spec = aligner.objective_name_and_params()
        objective = host.build("objective", spec[0], dict(spec[1])) if spec is not None else None
        aligner.setup(student_tokenizer=s_tok, teacher_tokenizer=t_tok, objective=objective)
        log.info("aligner %s: %s, %d student / %d teacher tokens", name,
                 f"two tokenizers, text batches paired by {aligner.pairing}" if text else "one tokenizer",
                 student_vocab_size, teacher_vocab_size)
        return cls(aligner, name, student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size,
                   text_batches=text, **weights)

    def attach(self, stage: Any, *, tp_group: Any, seed: int) -> None:
        """Build the aligner's trainable modules on the last stage and attach them to ``stage`` (before DDP)."""
        if not self.needs_hidden:
            return
        stage.capture_hidden_states()
        if not stage.last_stage:
            return
        self.stage = stage
        modules = self.aligner.build_modules(
            stage.output_weight("student"), stage.output_weight("teacher"), tp_group=tp_group,
            student_vocab_size=self.student_vocab_size, teacher_vocab_size=self.teacher_vocab_size, seed=seed)
        for module in modules:
            for p in module.parameters():
                setattr(p, PROJECTOR_ATTR, True)
        stage.attach_aligner_modules(modules)

    def optimizer_overrides(self, optimizer_config: Any) -> Optional[dict]:
        """megatron ``config_overrides`` giving the aligner's parameters their learning rate (None: no change)."""
        lr = self.aligner.learning_rate() if self.aligner is not None else None
        if not self.trainable_modules() or lr is None:
            return None
        overrides = dict(get_standard_config_overrides(optimizer_config))
        scale = optimizer_config.min_lr / optimizer_config.lr if optimizer_config.lr else 0.0
        overrides[ParamKey(attr=PROJECTOR_ATTR)] = {"max_lr": float(lr), "min_lr": float(lr) * scale}
        return overrides

    def trainable_modules(self) -> list[torch.nn.Module]:
        """This rank's trainable aligner modules (none off the last stage or without them)."""
        return list(self.aligner.trainable_modules()) if self.aligner is not None else []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Trainable modules' weights (this rank's; empty off the last stage or without modules)."""
        modules = self.trainable_modules()
        return {"modules": [m.state_dict() for m in modules]} if modules else {}

    def load_state_dict(self, state: dict) -> None:
        modules = self.trainable_modules()
        saved = (state or {}).get("modules", [])
        if len(saved) != len(modules):
            raise RecipeError(f"the checkpoint holds {len(saved)} aligner module(s) but aligner {self.name!r} has "
                              f"{len(modules)} here; resume with the aligner the checkpoint was trained with")
        with torch.no_grad():
            for module, sd in zip(modules, saved):
                module.load_state_dict(sd)

    # ------------------------------------------------------------------ loss
    def loss(self, batch: dict[str, torch.Tensor], output: Any, parts: LossParts, *, tp_group: Any, step: int,
             total_steps: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One microbatch's ``(loss_sum, count, report)`` through ``aligner.loss`` (see module docstring).

        ``output`` is the last stage's :class:`~distill_plugins.engine.stage.StageOutput`.
        """
        pairs = pair_rows(batch, layout="bs") if "align_teacher_pos" in batch else None
        labels = batch["labels"]
        rows = valid_rows(output.student_logits, output.teacher_logits, labels, batch.get("loss_mask"),
                          tp_group=tp_group, teacher_rows=pairs[1] if pairs is not None else None,
                          report_keys=self.report_keys_all)
        s_all, t_all, idx, report = rows.student, rows.teacher, rows.idx, rows.report
        report["student_targets"] += int(idx.numel())
        if rows.nonfinite:
            return rows.skip()
        hidden = {}
        if self.needs_hidden:
            hs, ht = output.student_hidden, output.teacher_hidden
            hidden = dict(student_hidden=hs.transpose(0, 1).reshape(-1, hs.shape[-1]),
                          teacher_hidden=ht.transpose(0, 1).reshape(-1, ht.shape[-1]),
                          student_head_weight=self.stage.output_weight("student"),
                          teacher_head_weight=self.stage.output_weight("teacher"))
        student_labels = torch.where(rows.valid, rows.labels, torch.full_like(rows.labels, -100))
        kd_sum, kd_count = s_all.float().sum() * 0.0, 0
        if parts.kd_weight > 0:
            tau = self._temperature(parts, s_all, idx, step, total_steps)
            out = self.aligner.loss(AlignerInputs(
                student_logits=s_all, teacher_logits=t_all, pairs=pairs, student_labels=student_labels,
                tp_group=tp_group, student_vocab_size=self.student_vocab_size,
                teacher_vocab_size=self.teacher_vocab_size, temperature=tau, **hidden))
            kd_sum, kd_count = out.loss_sum.float(), int(out.num_tokens)
            if parts.temperature is not None and parts.temperature.scale_loss_by_tau_squared:
                kd_sum = kd_sum * float(tau) ** 2
            report["aligned"] += float(out.report.get("aligned", kd_count))
            report["kept_tokens"] += kd_count
            for term in self.aligner.term_names:
                if term in out.terms:
                    report[f"aligner/{term}"] += out.terms[term].detach().double()
        # CE normaliser: the student's valid tokens (module docstring): scale this microbatch's CE by aligned / valid
        n_valid = int(idx.numel())
        ce_scale = kd_count / n_valid if parts.kd_weight > 0 and n_valid > 0 else 1.0
        ce_parts = dataclasses.replace(parts, ce_weight=parts.ce_weight * ce_scale) if ce_scale != 1.0 else parts
        loss, count, report = finish_report(report, ce_parts, kd_sum, kd_count, s_all, rows.labels, idx,
                                            tp_group=tp_group, vocab_size=self.student_vocab_size)
        report[CE_ALIGNED_KEY] += report["ce_sum"] * ce_scale
        return loss, count, report

    @staticmethod
    def _temperature(parts: LossParts, s_all: torch.Tensor, idx: torch.Tensor, step: int, total_steps: int) -> float:
        """The policy's temperature (a float: only logit-free policies combine with these aligners)."""
        if parts.temperature is None:
            return 1.0
        rows = s_all[idx[:1]].detach()
        ctx = TokenContext(student_logits=rows, teacher_logits=rows, step=step, total_steps=total_steps)
        tau = parts.temperature.temperatures(ctx, Selection(keep=torch.ones(rows.shape[0], dtype=torch.bool)))
        if isinstance(tau, torch.Tensor):
            if tau.numel() > 1 and not bool((tau == tau.reshape(-1)[0]).all()):
                raise RecipeError("cross-tokenizer aligners take one temperature per step; use temperature: "
                                  f"{' or '.join(LOGIT_FREE_POLICIES)}")
            tau = float(tau.reshape(-1)[0]) if tau.numel() else 1.0
        return float(tau)

    # ------------------------------------------------------------------ reporting
    @property
    def report_keys(self) -> tuple[str, ...]:
        """Additive report keys this aligner adds to :data:`~distill_plugins.engine.loss.REPORT_KEYS`."""
        if not self.computes_loss:
            return ()
        return COVERAGE_KEYS + (CE_ALIGNED_KEY,) + tuple(f"aligner/{t}" for t in self.aligner.term_names)

    @property
    def report_keys_all(self) -> tuple[str, ...]:
        """Every key of this run's per-microbatch reports."""
        return REPORT_KEYS + self.report_keys

    def metrics(self, sums: dict[str, float], *, prefix: str = "") -> dict[str, float]:
        """Coverage and per-term token means from a step's (or evaluation's) reduced report sums."""
        if not self.computes_loss or sums.get("student_targets", 0) <= 0:
            return {}
        out = {f"{prefix}aligned_fraction": sums["aligned"] / sums["student_targets"]}
        if not prefix and sums.get("kd_count", 0) > 0:
            # the objective the step optimises (CE normalised by valid tokens), overriding the trainer's sum / aligned
            out["loss"] = (self.kd_weight * sums["kd_sum"] + self.ce_weight * sums[CE_ALIGNED_KEY]) / sums["kd_count"]
        if not prefix:
            for term in self.aligner.term_names:
                key = f"aligner/{term}"
                out[key] = sums[key] / sums["aligned"] if sums["aligned"] > 0 else 0.0
        return out


def _tokenizers(recipe: Any) -> tuple[Any, Any]:
    """Both tokenizers; with no ``data.teacher_tokenizer`` the student's (possibly None) serves both."""
    if recipe.data.teacher_tokenizer:
        return load_tokenizer_pair(recipe)
    student = rank0_first(lambda: resolve_tokenizer(recipe, "student"))
    return student, student
