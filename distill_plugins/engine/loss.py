"""Loss glue: selector, temperature policy and objective over vocab-parallel logits.

Design
------
For one microbatch on the last pipeline stage, :func:`distill_loss` takes the
student's and teacher's logits ``[b, s, V_local]`` (this TP rank's slice of the
padded vocabulary), the pre-shifted labels ``[b, s]`` and an optional loss mask,
and does, in this order::

    flatten to [N, V_local]; drop masked rows (label == -100 or mask == 0)
    selection = selector.select(TokenContext(valid rows))
    keep the selected rows
    tau       = policy.temperatures(TokenContext(kept rows), selection)
    per_token = objective(kept student, kept teacher, temperature=tau, tp_group, vocab_size)
    per_token *= tau**2                      if policy.scale_loss_by_tau_squared
    kd_sum    = sum(per_token);  kd_count = kept tokens ("kept") or valid tokens ("all")

Student cross-entropy: megatron-core's ``vocab_parallel_cross_entropy`` on the
valid rows, with padded vocabulary columns at -inf. It is always computed and
logged (``ce_loss``, so a pure-KD run still shows the student's own loss); it
joins the back-propagated loss only when ``ce_weight > 0`` (otherwise it runs
under ``no_grad``). That function overwrites fp32 input logits in place (``.float()``
of an fp32 tensor is the same tensor), so it always receives a private copy and
runs *after* the distillation loss; ``tests/test_megatron_loss.py`` catches a
regression.

Reduction: the function returns *sums* and *counts*, never means. The value
back-propagated is ``kd_weight * kd_sum + ce_weight * ce_sum`` and the count is
the KD normaliser (``kd_count``; the valid-token count when ``kd_weight == 0``).
megatron's schedule (``calculate_per_token_loss=True``) adds the counts of all
microbatches, ``finalize_model_grads`` all-reduces them over data-parallel
ranks and divides the gradients by the total, so the step's loss is normalised
by the *global* token count of the step whatever the TP/PP/DP split. With a
selector that normalises by kept tokens *and* a CE mix, the CE sum is divided by
that same (kept) count; the logged ``ce_loss`` is always the exact token mean.

A microbatch with no valid token (or none kept) contributes zero with count 0
(no NaN) and is counted in ``report["empty_microbatches"]``.

Non-finite logits (NaN/Inf in a valid row of either model, on any TP rank) are
checked before any part runs: the microbatch then contributes zero with count 0
and ``report["nonfinite"] = 1``, and the training loop skips the step on every
rank (objectives would otherwise raise on NaN input on some ranks only).

The report holds fp64 sums that add across microbatches and ranks:
``kd_sum``, ``kd_count``, ``ce_sum``, ``ce_count``, ``valid_tokens``,
``kept_tokens``, ``total_tokens``, ``empty_microbatches``, ``nonfinite``, and for
cross-tokenizer aligners (:mod:`.alignment`) ``aligned`` and ``student_targets``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from distill_plugins.errors import DistillError
from distill_plugins.interfaces import (IGNORE_INDEX, Objective, Selection, TemperaturePolicy, TokenContext,
                                        TokenSelector)
from distill_plugins.parallel import masked_logits_fp32

__all__ = ["LossParts", "distill_loss", "REPORT_KEYS", "build_loss_parts", "cross_entropy_sum", "any_nonfinite",
           "MicrobatchRows", "valid_rows", "finish_report"]


#: Keys of the per-microbatch report, all additive (loss-computing aligners add their own:
#: :attr:`distill_plugins.engine.alignment.AlignerRuntime.report_keys`).
REPORT_KEYS = ("kd_sum", "kd_count", "ce_sum", "ce_count", "valid_tokens", "kept_tokens", "total_tokens",
               "empty_microbatches", "nonfinite")


@dataclass
class LossParts:
    """The parts and weights :func:`distill_loss` applies.

    Attributes:
        objective: the distillation objective.
        selector: token selector, or None for "keep every valid token".
        temperature: temperature policy, or None for a constant 1.
        kd_weight: weight of the distillation loss.
        ce_weight: weight of the student's cross-entropy on labels.
    """

    objective: Objective
    selector: Optional[TokenSelector] = None
    temperature: Optional[TemperaturePolicy] = None
    kd_weight: float = 1.0
    ce_weight: float = 0.0

    def stateful(self) -> dict[str, Any]:
        """Parts by recipe section name (for checkpoints and ``on_optimizer_step``)."""
        parts = {"objective": self.objective, "selector": self.selector, "temperature": self.temperature}
        return {k: v for k, v in parts.items() if v is not None}


def build_loss_parts(recipe, host) -> LossParts:
    """Build the recipe's objective, selector and temperature policy through the plugin host.

    A selector with ``needs_reference_model`` (AdaSPEC) makes the trainer build
    the recipe's ``reference`` model next to the teacher.
    """
    objective = host.build("objective", recipe.objective.name, dict(recipe.objective.params))
    selector = host.build("token_selector", recipe.selector.name, dict(recipe.selector.params))
    policy = host.build("temperature_policy", recipe.temperature.name, dict(recipe.temperature.params))
    return LossParts(objective=objective, selector=selector, temperature=policy,
                     kd_weight=recipe.loss.kd_weight, ce_weight=recipe.loss.ce_weight)


def cross_entropy_sum(student_logits: torch.Tensor, labels: torch.Tensor, *, tp_group: Any,
                      vocab_size: Optional[int]) -> torch.Tensor:
    """Sum of the student's cross-entropy over rows ``[N, V_local]`` with global label ids ``[N]``.

    Uses megatron's ``vocab_parallel_cross_entropy`` on a private fp32 copy with
    padded columns at -inf (the function works in place on its input). Needs
    megatron's parallel_state when ``tp_group`` is not None.
    """
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    x = masked_logits_fp32(student_logits, tp_group, vocab_size)
    if x.data_ptr() == student_logits.data_ptr():
        x = x.clone()  # never let megatron overwrite the caller's logits
    if tp_group is None:
        return torch.nn.functional.cross_entropy(x, labels, reduction="sum")
    # megatron expects [s, b, V_local] / [s, b]; a [N, 1] batch is the same thing.
    per_token = vocab_parallel_cross_entropy(x.unsqueeze(1), labels.unsqueeze(1))
    return per_token.sum()


def any_nonfinite(student: torch.Tensor, teacher: torch.Tensor, tp_group: Any) -> bool:
    """Whether any valid row of either model has a NaN/Inf logit on *any* TP rank (collective over TP)."""
    flag = torch.tensor([0.0 if bool(torch.isfinite(student.detach()).all() and torch.isfinite(teacher).all())
                         else 1.0], device=student.device)
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    return bool(flag.item() > 0)


def _zero(like: torch.Tensor) -> torch.Tensor:
    # Keeps the graph connected to the student logits (so backward works) with value 0.
    return like.float().sum() * 0.0


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    parts: LossParts,
    *,
    loss_mask: Optional[torch.Tensor] = None,
    reference_logits: Optional[torch.Tensor] = None,
    tp_group: Any = None,
    vocab_size: Optional[int] = None,
    step: int = 0,
    total_steps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation (+ optional CE) loss of one microbatch.

    Args:
        student_logits: ``[..., V_local]`` vocab-parallel student logits (grad).
        teacher_logits: ``[..., V_local]`` same partition, no grad needed; None
            when the run has no teacher (``kd_weight == 0``).
        labels: ``[...]`` global next-token ids, ``-100`` = no loss.
        parts: objective, selector, policy and weights.
        loss_mask: optional ``[...]`` 0/1 mask ANDed with ``labels != -100``.
        reference_logits: ``[..., V_local]`` of a frozen reference model (AdaSPEC's
            selector reads them as ``TokenContext.reference_logits``), or None.
        tp_group: the TP group the vocabulary is sharded over (None = unsharded).
        vocab_size: real vocabulary size (padding columns excluded).
        step, total_steps: optimizer steps done / planned (for schedules).

    Returns:
        ``(loss_sum, count, report)``: ``loss_sum`` a differentiable fp32 scalar,
        ``count`` an int64 scalar (the normaliser), ``report`` additive fp64
        scalars (see module docstring).
    """
    if teacher_logits is None:  # a run without teacher (kd_weight 0): the student's CE only
        if parts.kd_weight > 0:
            raise DistillError("distill_loss got no teacher logits but loss.kd_weight > 0")
        teacher_logits = student_logits.detach()
    if teacher_logits.shape != student_logits.shape:
        raise DistillError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                           f"{tuple(teacher_logits.shape)} differ: the models need the same padded vocabulary")
    rows = valid_rows(student_logits, teacher_logits, labels, loss_mask, tp_group=tp_group)
    s_all, t_all, lab_all, idx, report = rows.student, rows.teacher, rows.labels, rows.idx, rows.report
    v_local, n_valid = s_all.shape[-1], int(idx.numel())
    if rows.nonfinite:
        return rows.skip()

    kd_sum = _zero(s_all)
    kd_count = 0
    if parts.kd_weight > 0 and n_valid > 0:
        s, t, lab = s_all[idx], t_all[idx], lab_all[idx]
        ref = reference_logits.reshape(-1, v_local)[idx].detach() if reference_logits is not None else None
        ctx = TokenContext(student_logits=s, teacher_logits=t, tp_group=tp_group, vocab_size=vocab_size,
                           labels=lab, step=step, total_steps=total_steps, reference_logits=ref)
        selection = parts.selector.select(ctx) if parts.selector is not None else Selection(
            keep=torch.ones(n_valid, dtype=torch.bool, device=s.device))
        keep = selection.keep.to(device=s.device, dtype=torch.bool)
        if keep.shape != (n_valid,):
            raise DistillError(f"selector {parts.selector.name!r} returned keep of shape "
                               f"{tuple(keep.shape)} for {n_valid} tokens")
        n_kept = int(keep.sum())
        if n_kept < n_valid:
            kidx = keep.nonzero(as_tuple=True)[0]
            ctx = TokenContext(student_logits=s[kidx], teacher_logits=t[kidx], tp_group=tp_group,
                               vocab_size=vocab_size, labels=lab[kidx], step=step, total_steps=total_steps,
                               reference_logits=ref[kidx] if ref is not None else None)
        report["kept_tokens"] += n_kept
        if n_kept > 0:
            tau = parts.temperature.temperatures(ctx, selection) if parts.temperature is not None else 1.0
            per_token = parts.objective(ctx.student_logits, ctx.teacher_logits, temperature=tau,
                                        tp_group=tp_group, vocab_size=vocab_size)
            if parts.temperature is not None and parts.temperature.scale_loss_by_tau_squared:
                tau_t = tau if isinstance(tau, torch.Tensor) else torch.tensor(float(tau))
                per_token = per_token * tau_t.to(per_token).detach() ** 2
            kd_sum = per_token.float().sum()
        kd_count = n_kept if selection.normalize_by == "kept" else n_valid

    return finish_report(report, parts, kd_sum, kd_count, s_all, lab_all, idx, tp_group=tp_group,
                         vocab_size=vocab_size)


@dataclass
class MicrobatchRows:
    """One microbatch flattened to rows, with its valid rows and a fresh report (:func:`valid_rows`).

    Attributes:
        student: ``[N, Vs_local]`` student logits (grad).
        teacher: ``[N_t, Vt_local]`` teacher logits, detached.
        labels: ``[N]`` next-token ids, ``-100`` = no loss.
        valid: bool ``[N]``, label set and loss mask 1.
        idx: int64 ``[n_valid]`` indices of the valid rows.
        report: zero report with ``total_tokens`` and ``valid_tokens`` filled in.
        nonfinite: a valid row had a NaN/Inf logit on some TP rank (agreed over TP).
    """

    student: torch.Tensor
    teacher: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    idx: torch.Tensor
    report: dict[str, torch.Tensor]
    nonfinite: bool = False

    def skip(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The result of a non-finite microbatch: zero loss, count 0, ``report["nonfinite"] = 1``.

        Objectives reject NaN logits with an error; here the step is flagged instead, so the training
        loop can skip it on every rank together.
        """
        self.report["nonfinite"] += 1
        zero = _zero(self.student)
        return zero, torch.tensor(0, dtype=torch.int64, device=zero.device), self.report


def valid_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               loss_mask: Optional[torch.Tensor], *, tp_group: Any, teacher_rows: Any = None,
               report_keys: tuple[str, ...] = REPORT_KEYS) -> MicrobatchRows:
    """The preamble every loss path shares: flatten, pick valid rows, start the report, check finiteness.

    ``student_logits [..., Vs_local]`` and ``teacher_logits [..., Vt_local]`` are flattened to rows;
    a row is valid when its label is not -100 and ``loss_mask`` (if given) is 1. The finiteness check
    covers the valid student rows and the teacher rows they are compared with: the same rows, or
    ``teacher_rows`` (an index tensor, for aligners that pair rows across two tokenizations). It is a
    collective over ``tp_group`` (every TP rank reaches the same answer).
    """
    s_all = student_logits.reshape(-1, student_logits.shape[-1])
    t_all = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
    lab_all = labels.reshape(-1).to(s_all.device)
    valid = lab_all != IGNORE_INDEX
    if loss_mask is not None:
        valid = valid & loss_mask.reshape(-1).to(s_all.device).bool()
    idx = valid.nonzero(as_tuple=True)[0]
    f64 = dict(dtype=torch.float64, device=s_all.device)
    report = {k: torch.zeros((), **f64) for k in report_keys}
    report["total_tokens"] += lab_all.numel()
    report["valid_tokens"] += int(idx.numel())
    rows = MicrobatchRows(s_all, t_all, lab_all, valid, idx, report)
    if idx.numel():
        t_idx = idx if teacher_rows is None else teacher_rows.to(t_all.device)
        rows.nonfinite = any_nonfinite(s_all[idx], t_all[t_idx], tp_group)
    return rows


def finish_report(report: dict[str, torch.Tensor], parts: LossParts, kd_sum: torch.Tensor, kd_count: int,
                  s_all: torch.Tensor, lab_all: torch.Tensor, idx: torch.Tensor, *, tp_group: Any,
                  vocab_size: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Add the student's CE on rows ``idx`` and combine: ``(kd_weight*kd + ce_weight*ce, count, report)``.

    The CE is computed after the KD loss (megatron's CE overwrites fp32
    logits in place; it gets a private copy anyway), with gradient only when
    ``ce_weight > 0``. ``count`` is ``kd_count``, or the valid-token count when
    ``kd_weight == 0``.
    """
    n_valid = int(idx.numel())
    ce_sum = _zero(s_all)
    if n_valid > 0:
        with torch.set_grad_enabled(torch.is_grad_enabled() and parts.ce_weight > 0):
            ce = cross_entropy_sum(s_all[idx], lab_all[idx], tp_group=tp_group, vocab_size=vocab_size)
        report["ce_count"] += n_valid
        report["ce_sum"] += ce.detach().double()
        if parts.ce_weight > 0:
            ce_sum = ce
    count = kd_count if parts.kd_weight > 0 else n_valid
    if count == 0:
        report["empty_microbatches"] += 1
    report["kd_sum"] += kd_sum.detach().double()
    report["kd_count"] += kd_count
    loss = parts.kd_weight * kd_sum + parts.ce_weight * ce_sum
    if not bool(torch.isfinite(loss.detach())) or not bool(torch.isfinite(report["ce_sum"])):
        report["nonfinite"] += 1
    return loss, torch.tensor(count, dtype=torch.int64, device=loss.device), report
