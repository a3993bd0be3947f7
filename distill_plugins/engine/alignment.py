"""Vocabulary aligners inside the engine: building them, their projectors, their loss.

Design
------
:class:`AlignerRuntime` is what the engine holds for the recipe's ``aligner``:

* ``identity`` (or ``auto`` on one tokenizer): nothing to do; the engine's
  usual glue (:func:`.loss.distill_loss`) compares the logits.
* aligners that compute their own loss (``eta``, ``dskd``, ``uld``, and
  third-party :class:`~distill_plugins.aligners.AlignerBase` subclasses with
  ``computes_loss``): :meth:`AlignerRuntime.loss` replaces the objective glue.
  When the two tokenizers differ the batches come from raw text
  (:mod:`distill_plugins.data.text_batches`) and carry ``teacher_tokens`` and
  the exact token alignment; with one tokenizer the usual token batches serve
  and row ``i`` pairs with row ``i``.
* aligners with trainable modules (DSKD projectors): built on the last
  pipeline stage, initialised from both output layers (``init``), attached to
  the :class:`~.pipeline.DistillStage` before DDP wraps it (so DDP reduces their
  gradients over data-parallel ranks and the optimizer, clipping and NaN guard
  cover them), learning rate ``projector_lr`` through a megatron optimizer
  parameter-group override, state saved in the checkpoint's ``parts`` under
  ``aligner``.

Per microbatch (last stage), with ``b, s`` the batch and sequence sizes::

    zs [b, s, Vs_local], zt [b, s, Vt_local]     student / teacher logits
    hs [s, b, d_s],      ht [s, b, d_t]          output-layer inputs (DSKD only)
    pairs = pair_rows(batch, "bs")               aligned rows of the flattened logits
    out   = aligner.loss(AlignerInputs(...))     token sum + count (aligned tokens)
    loss  = kd_weight * out.loss_sum + ce_weight * CE(student, labels)

Only temperature policies that do not read the teacher's logits
(``constant``, ``schedule``) and the ``all`` selector combine with these
aligners (the teacher's vocabulary is not the student's); ``distill check``
says so.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from distill_plugins.errors import RecipeError
from distill_plugins.interfaces import Selection, TokenContext
from distill_plugins.logging import get_logger
from distill_plugins.aligners.base import LOGIT_FREE_POLICIES, recipe_problems
from distill_plugins.engine.loss import IGNORE_INDEX, LossParts, any_nonfinite, empty_report, finish_report

__all__ = ["AlignerRuntime", "PROJECTOR_ATTR"]

log = get_logger(__name__)

#: parameter attribute marking aligner parameters (optimizer group override)
PROJECTOR_ATTR = "is_distill_aligner_parameter"


def _same_tokenizer(student_tok: Any, teacher_tok: Any) -> bool:
    """No second tokenizer, the same object, or every token string with the same id on both sides."""
    if teacher_tok is None or student_tok is None or teacher_tok is student_tok:
        return True
    from distill_plugins.aligners.vocab import same_vocabulary

    return bool(same_vocabulary(student_tok, teacher_tok))


class AlignerRuntime:
    """The recipe's aligner, set up for this rank (see module docstring).

    Attributes:
        aligner: the built aligner part.
        name: its resolved registered name (``auto`` resolved).
        computes_loss: :meth:`loss` replaces the objective glue.
        text_batches: batches must come from raw text with both tokenizations.
        needs_hidden: the stage must return both output layers' inputs.
        student_vocab_size, teacher_vocab_size: real vocabularies.
    """

    def __init__(self, aligner: Any, name: str, *, student_vocab_size: int, teacher_vocab_size: int,
                 text_batches: bool):
        self.aligner, self.name = aligner, name  # aligner None: a run without teacher
        self.computes_loss = bool(getattr(aligner, "computes_loss", False))
        self.needs_hidden = bool(getattr(aligner, "needs_hidden_states", False))
        self.text_batches = text_batches
        self.student_vocab_size, self.teacher_vocab_size = student_vocab_size, teacher_vocab_size
        self.pairing = getattr(aligner, "pairing", "eta")
        self.term_names: tuple[str, ...] = tuple(getattr(aligner, "term_names", ()))
        self.stage: Any = None  # the DistillStage whose output weights DSKD reads (set by attach)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, recipe: Any, host: Any, *, student_vocab_size: int, teacher_vocab_size: int) -> "AlignerRuntime":
        """Resolve ``auto``, build the aligner through ``host`` and give it tokenizers and objective."""
        from distill_plugins.recipe.validate import resolve_auto_aligner

        if recipe.loss.kd_weight == 0:  # no teacher is built: the student trains on its own tokens
            return cls(None, "none", student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size,
                       text_batches=False)
        name = recipe.aligner.name
        if name == "auto":
            name = resolve_auto_aligner(recipe)
        aligner = host.build("vocab_aligner", name, dict(recipe.aligner.params))
        computes_loss = bool(getattr(aligner, "computes_loss", False))
        if not computes_loss:
            if student_vocab_size != teacher_vocab_size:
                raise RecipeError(f"aligner {name!r} compares logits over one vocabulary, but the student has "
                                  f"{student_vocab_size} tokens and the teacher {teacher_vocab_size}; use a "
                                  "cross-tokenizer aligner (dskd, eta, uld) with data.teacher_tokenizer set")
            return cls(aligner, name, student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size,
                       text_batches=False)
        _check_loss_parts(recipe, name)
        s_tok, t_tok = (_backend(t) for t in _tokenizers(recipe))
        text = bool(getattr(aligner, "cross_tokenizer", True)) and not _same_tokenizer(s_tok, t_tok)
        if not text and student_vocab_size != teacher_vocab_size:
            raise RecipeError(f"aligner {name!r}: the student has {student_vocab_size} tokens and the teacher "
                              f"{teacher_vocab_size}, but there is one tokenizer to align them with; set "
                              "data.tokenizer and data.teacher_tokenizer to the two models' tokenizers")
        setup_kw: dict[str, Any] = {"student_tokenizer": s_tok, "teacher_tokenizer": t_tok}
        if hasattr(aligner, "objective_name_and_params"):
            obj_name, obj_params = aligner.objective_name_and_params()
            setup_kw["objective"] = host.build("objective", obj_name, obj_params)
        aligner.setup(**setup_kw)
        pairing = getattr(aligner, "pairing", "eta")
        log.info("aligner %s: %s, %d student / %d teacher tokens", name,
                 f"two tokenizers, text batches paired by {pairing}" if text else "one tokenizer",
                 student_vocab_size, teacher_vocab_size)
        return cls(aligner, name, student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size,
                   text_batches=text)

    def attach(self, stage: Any, *, tp_group: Any, seed: int) -> None:
        """Build and initialise trainable modules on the last stage and attach them to ``stage`` (before DDP)."""
        if self.needs_hidden:
            stage.capture_hidden_states()
        if not self.needs_hidden or not stage.last_stage:
            return
        self.stage = stage
        a = self.aligner
        ws, wt = stage.output_weight("student"), stage.output_weight("teacher")
        a.build_projectors(ws.shape[1], wt.shape[1], dtype=torch.float32, device=ws.device, seed=seed)
        a.init_projectors(ws, wt, tp_group=tp_group, student_vocab_size=self.student_vocab_size,
                          teacher_vocab_size=self.teacher_vocab_size)
        modules = a.trainable_modules()
        for module in modules:
            for p in module.parameters():
                setattr(p, PROJECTOR_ATTR, True)
        stage.attach_aligner_modules(modules)

    def optimizer_overrides(self, optimizer_config: Any) -> Optional[dict]:
        """megatron ``config_overrides`` giving the aligner's parameters ``projector_lr`` (None: no change)."""
        lr = getattr(getattr(self.aligner, "config", None), "projector_lr", None)
        if not self.needs_hidden or lr is None:
            return None
        from megatron.core.optimizer import get_standard_config_overrides
        from megatron.core.optimizer.optimizer_config import ParamKey

        overrides = dict(get_standard_config_overrides(optimizer_config))
        scale = optimizer_config.min_lr / optimizer_config.lr if optimizer_config.lr else 0.0
        overrides[ParamKey(attr=PROJECTOR_ATTR)] = {"max_lr": float(lr), "min_lr": float(lr) * scale}
        return overrides

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Trainable modules' weights (this rank's; empty off the last stage or without modules)."""
        modules = self._modules()
        return {"modules": [m.state_dict() for m in modules]} if modules else {}

    def load_state_dict(self, state: dict) -> None:
        modules = self._modules()
        saved = (state or {}).get("modules", [])
        if len(saved) != len(modules):
            raise RecipeError(f"the checkpoint holds {len(saved)} aligner module(s) but aligner {self.name!r} has "
                              f"{len(modules)} here; resume with the aligner the checkpoint was trained with")
        with torch.no_grad():
            for module, sd in zip(modules, saved):
                module.load_state_dict(sd)

    def _modules(self) -> list:
        if not self.needs_hidden or getattr(self.aligner, "projectors", None) is None:
            return []
        return list(self.aligner.trainable_modules())

    # ------------------------------------------------------------------ loss
    def loss(self, batch: dict[str, torch.Tensor], output: Any, parts: LossParts, *, tp_group: Any, step: int,
             total_steps: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One microbatch's ``(loss_sum, count, report)`` through ``aligner.loss`` (see module docstring).

        ``output`` is the last stage's :class:`~.pipeline.StageOutput`.
        """
        from distill_plugins.aligners.base import AlignerInputs
        from distill_plugins.data.alignment_collate import pair_rows

        zs, zt = output.student_logits, output.teacher_logits
        s_all = zs.reshape(-1, zs.shape[-1])
        t_all = zt.reshape(-1, zt.shape[-1]).detach()
        labels = batch["labels"].reshape(-1).to(s_all.device)
        valid = labels != IGNORE_INDEX
        if batch.get("loss_mask") is not None:
            valid = valid & batch["loss_mask"].reshape(-1).to(s_all.device).bool()
        idx = valid.nonzero(as_tuple=True)[0]
        report = empty_report(zs, labels, int(idx.numel()))
        report["student_targets"] += int(idx.numel())
        pairs = pair_rows(batch, layout="bs") if "align_teacher_pos" in batch else None
        t_rows = pairs[1] if pairs is not None else idx
        if idx.numel() and any_nonfinite(s_all[idx], t_all[t_rows.to(t_all.device)], tp_group):
            report["nonfinite"] += 1
            zero = s_all.float().sum() * 0.0
            return zero, torch.tensor(0, dtype=torch.int64, device=zero.device), report
        hidden = {}
        if self.needs_hidden:
            hs, ht = output.student_hidden, output.teacher_hidden
            hidden = dict(student_hidden=hs.transpose(0, 1).reshape(-1, hs.shape[-1]),
                          teacher_hidden=ht.transpose(0, 1).reshape(-1, ht.shape[-1]),
                          student_head_weight=self.stage.output_weight("student"),
                          teacher_head_weight=self.stage.output_weight("teacher"))
        student_labels = torch.where(valid, labels, torch.full_like(labels, IGNORE_INDEX))
        kd_sum, kd_count = s_all.float().sum() * 0.0, 0
        if parts.kd_weight > 0:
            tau = self._temperature(parts, s_all, idx, step, total_steps)
            out = self.aligner.loss(AlignerInputs(
                student_logits=s_all, teacher_logits=t_all, pairs=pairs, student_labels=student_labels,
                tp_group=tp_group, student_vocab_size=self.student_vocab_size,
                teacher_vocab_size=self.teacher_vocab_size, temperature=tau, **hidden))
            kd_sum, kd_count = out.loss_sum.float(), int(out.num_tokens)
            if getattr(parts.temperature, "scale_loss_by_tau_squared", False):
                kd_sum = kd_sum * float(tau) ** 2
            report["aligned"] += float(out.report.get("aligned", kd_count))
            report["kept_tokens"] += kd_count
            for term in self.term_names:
                if term in out.terms:
                    report[f"aligner/{term}"] = out.terms[term].detach().double()
        for term in self.term_names:
            report.setdefault(f"aligner/{term}", torch.zeros((), dtype=torch.float64, device=s_all.device))
        return finish_report(report, parts, kd_sum, kd_count, s_all, labels, idx, tp_group=tp_group,
                             vocab_size=self.student_vocab_size)

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

    @property
    def report_keys(self) -> tuple[str, ...]:
        """Extra additive report keys this aligner produces (its loss terms)."""
        return tuple(f"aligner/{t}" for t in self.term_names) if self.computes_loss else ()


def _check_loss_parts(recipe: Any, name: str) -> None:
    """Selector ``all`` and a logit-free temperature policy (the engine-side twin of the check-time rule)."""
    problems = recipe_problems(recipe, name)
    if problems:
        raise RecipeError(problems)


def _tokenizers(recipe: Any) -> tuple[Any, Any]:
    """Both tokenizers; with no ``data.teacher_tokenizer`` the student's (possibly None) serves both."""
    if recipe.data.teacher_tokenizer:
        from distill_plugins.data.text_batches import load_tokenizer_pair

        return load_tokenizer_pair(recipe)
    from distill_plugins.data.iterators import _rank0_first, resolve_tokenizer

    student = _rank0_first(lambda: resolve_tokenizer(recipe, "student"))
    return student, student


def _backend(tok: Any) -> Any:
    """The ``tokenizers.Tokenizer`` inside a loaded :class:`~distill_plugins.data.tokenizer.Tokenizer` (or None)."""
    if tok is None:
        return None
    from distill_plugins.aligners.vocab import as_backend

    return as_backend(tok)
