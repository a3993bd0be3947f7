"""The fused output layer in the engine: a microbatch's loss from the last stage's hidden states.

Design
------
:func:`fused_distill_loss` is :func:`distill_plugins.engine.loss.distill_loss`
without logits. The last pipeline stage (:class:`~distill_plugins.engine.stage.DistillStage`
with :meth:`~distill_plugins.engine.stage.DistillStage.fuse_output_layers`) hands
over each model's output-layer input ``[s, b, H]`` (``[s/TP, b, H]`` with sequence
parallelism) and output-layer weight shard ``[V_local, H]`` (the shared embedding
weight with tied embeddings) instead of ``[b, s, V_local]`` logits. Per microbatch::

    rows      = hidden states flattened to the labels' order [N, H]; SP: all-gathered over TP first
    valid     = label != -100 and loss_mask == 1
    stats     = token_statistics(valid rows)          only when the selector/policy declare statistics
    selection = selector.select(TokenContext(placeholders, token_stats=stats))
    tau       = policy.temperatures(TokenContext(kept rows), selection)
    loss      = fused_output_layer_loss(valid rows, keep, tau)   KD + student CE, chunk by chunk

and returns ``(loss_sum, count, report)`` exactly as ``distill_loss`` does (same
normaliser, same additive fp64 report keys :data:`~distill_plugins.engine.loss.REPORT_KEYS`),
so the trainer, megatron's per-token normalisation and the metrics are unchanged.
``loss_sum`` is differentiable with respect to the student's hidden states and
output-layer weight (the autograd Function of :mod:`distill_plugins.objectives.fused`),
so megatron's backward runs through it into the decoder. The maths, the chunking,
the TP collectives and the chunk contract are in that module's docstring.

Usage (``Trainer._loss_fn``, last pipeline stage)::

    loss_sum, count, report = fused_distill_loss(
        out.student_hidden, out.student_weight, out.teacher_hidden, out.teacher_weight, batch["labels"], parts,
        loss_mask=batch.get("loss_mask"), reference_hidden=out.reference_hidden,
        reference_weight=out.reference_weight, tp_group=tp_group, vocab_size=vocab_size,
        sequence_parallel=recipe.parallel.sequence_parallel, step=step, total_steps=total_steps)
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from distill_plugins.engine.loss import REPORT_KEYS
from distill_plugins.errors import DistillError, InputError
from distill_plugins.interfaces import IGNORE_INDEX, Selection, TokenContext
from distill_plugins.objectives.fused import (UnmaterialisedLogits, fused_output_layer_loss, fused_support,
                                              gather_sequence_parallel, token_statistics)

__all__ = ["fused_distill_loss"]


def _rows(hidden: Optional[torch.Tensor], n_labels: int, labels_shape: torch.Size, sequence_parallel: bool,
          group: Any, *, grad: bool, who: str) -> Optional[torch.Tensor]:
    """``[s, b, H]`` (or ``[s/TP, b, H]`` with SP) or ``[N, H]`` -> ``[N, H]`` rows in the labels' order."""
    if hidden is None:
        return None
    if sequence_parallel:
        if hidden.dim() != 3:
            raise InputError(f"{who} hidden states must be [s/TP, b, H] with sequence parallelism, got "
                             f"{tuple(hidden.shape)}")
        hidden = gather_sequence_parallel(hidden, group, grad=grad)
    if not grad:
        hidden = hidden.detach()
    if hidden.dim() == 3:
        if len(labels_shape) != 2 or tuple(labels_shape) != (hidden.shape[1], hidden.shape[0]):
            raise InputError(f"{who} hidden states {tuple(hidden.shape)} ([s, b, H]) do not match labels "
                             f"{tuple(labels_shape)} ([b, s])")
        hidden = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])
    if hidden.dim() != 2 or hidden.shape[0] != n_labels:
        raise InputError(f"{who} hidden states {tuple(hidden.shape)} do not give one row per label "
                         f"({n_labels} labels); pass [s, b, H] with labels [b, s], or [N, H] with labels [N]")
    return hidden


def _placeholder(n: int, v_local: int, device: Any) -> UnmaterialisedLogits:
    return UnmaterialisedLogits(n, v_local, device=device)


def fused_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor],
    teacher_weight: Optional[torch.Tensor],
    labels: torch.Tensor,
    parts: Any,
    *,
    loss_mask: Optional[torch.Tensor] = None,
    reference_hidden: Optional[torch.Tensor] = None,
    reference_weight: Optional[torch.Tensor] = None,
    tp_group: Any = None,
    vocab_size: Optional[int] = None,
    step: int = 0,
    total_steps: int = 1,
    chunk_rows: Optional[int] = None,
    sequence_parallel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`distill_plugins.engine.loss.distill_loss` from hidden states: same results, no logits.

    Args:
        student_hidden: the student's output-layer input, ``[s, b, H_S]`` (megatron's layout;
            ``[s/TP, b, H_S]`` with ``sequence_parallel``) or ``[N, H_S]``; grad.
        student_weight: ``[V_local, H_S]`` this rank's output-layer shard (the shared
            embedding weight with tied embeddings); grad.
        teacher_hidden, teacher_weight: the teacher's, same layouts, frozen; None when
            ``parts.kd_weight == 0``.
        labels: ``[b, s]`` (or ``[N]``) global next-token ids, -100 = no loss.
        parts: a :class:`~distill_plugins.engine.loss.LossParts`.
        loss_mask: optional ``[b, s]`` 0/1 mask ANDed with ``labels != -100``.
        reference_hidden, reference_weight: the frozen reference model's (AdaSPEC), or None.
        tp_group, vocab_size: vocabulary sharding and the real vocabulary size.
        step, total_steps: optimizer steps done / planned (for the parts' schedules).
        chunk_rows: rows per chunk (default :func:`~distill_plugins.objectives.fused.default_chunk_rows`).
        sequence_parallel: the hidden states are sequence shards to gather over ``tp_group``.

    Returns:
        ``(loss_sum, count, report)`` as ``distill_loss``: a differentiable fp32 scalar
        ``kd_weight * kd_sum + ce_weight * ce_sum``, the int64 normaliser and the additive
        fp64 report (keys :data:`~distill_plugins.engine.loss.REPORT_KEYS`).

    Raises:
        DistillError: a part cannot run fused (:func:`~distill_plugins.objectives.fused.fused_support`),
            or no teacher with ``kd_weight > 0``.
        InputError: shapes, dtypes or labels break the contract.
    """
    kd = parts.kd_weight > 0
    if kd and (teacher_hidden is None or teacher_weight is None):
        raise DistillError("fused_distill_loss got no teacher hidden states/weight but loss.kd_weight > 0")
    support = fused_support(parts)
    if not support.supported:
        raise DistillError("these loss parts cannot run on the fused output layer: " + "; ".join(support.reasons)
                           + " (set loss.fused_output_layer: false or auto)")
    lab_all = labels.reshape(-1).to(student_hidden.device)
    n_all = lab_all.numel()
    h_s = _rows(student_hidden, n_all, labels.shape, sequence_parallel, tp_group, grad=True, who="student")
    h_t = _rows(teacher_hidden, n_all, labels.shape, sequence_parallel, tp_group, grad=False, who="teacher") \
        if kd else None
    v_local = student_weight.shape[0]
    valid = lab_all != IGNORE_INDEX
    if loss_mask is not None:
        valid = valid & loss_mask.reshape(-1).to(valid.device).bool()
    idx = valid.nonzero(as_tuple=True)[0]
    n_valid = int(idx.numel())
    f64 = dict(dtype=torch.float64, device=student_hidden.device)
    report = {k: torch.zeros((), **f64) for k in REPORT_KEYS}
    report["total_tokens"] += n_all
    report["valid_tokens"] += n_valid

    def zero_loss():
        return (h_s.float().sum() + student_weight.float().sum()) * 0.0  # keeps both in the graph

    def skip():
        report["nonfinite"] += 1
        return zero_loss(), torch.tensor(0, dtype=torch.int64, device=student_hidden.device), report

    if n_valid == 0:
        report["empty_microbatches"] += 1
        return zero_loss(), torch.tensor(0, dtype=torch.int64, device=student_hidden.device), report
    hs_v, lab = h_s[idx], lab_all[idx]
    ht_v = h_t[idx] if kd else None

    keep, tau, tau_sq, kd_count = None, 1.0, False, 0
    if kd:
        stats = None
        if support.token_stats:
            ref = None
            if "loss_gap" in support.token_stats:
                ref = _rows(reference_hidden, n_all, labels.shape, sequence_parallel, tp_group, grad=False,
                            who="reference")
                ref = None if ref is None else ref[idx]
            stats = token_statistics(hs_v.detach(), student_weight.detach(), ht_v, teacher_weight,
                                     support.token_stats, reference_hidden=ref, reference_weight=reference_weight,
                                     tp_group=tp_group, vocab_size=vocab_size, chunk_rows=chunk_rows)
            if stats.nonfinite:
                return skip()
        dev = hs_v.device
        has_ref = reference_hidden is not None

        def context(rows: Optional[torch.Tensor], n: int) -> TokenContext:
            values = None if stats is None else {k: (v if rows is None else v[rows]) for k, v in stats.values.items()}
            return TokenContext(student_logits=_placeholder(n, v_local, dev),
                                teacher_logits=_placeholder(n, v_local, dev), tp_group=tp_group,
                                vocab_size=vocab_size, labels=lab if rows is None else lab[rows], step=step,
                                total_steps=total_steps,
                                reference_logits=_placeholder(n, v_local, dev) if has_ref else None,
                                token_stats=values if values is not None else {})

        ctx = context(None, n_valid)
        selection = parts.selector.select(ctx) if parts.selector is not None else Selection(
            keep=torch.ones(n_valid, dtype=torch.bool, device=dev))
        keep = selection.keep.to(device=dev, dtype=torch.bool)
        if keep.shape != (n_valid,):
            raise DistillError(f"selector {parts.selector.name!r} returned keep of shape {tuple(keep.shape)} "
                               f"for {n_valid} tokens")
        n_kept = int(keep.sum())
        if n_kept < n_valid:
            ctx = context(keep.nonzero(as_tuple=True)[0], n_kept)
        report["kept_tokens"] += n_kept
        if n_kept > 0 and parts.temperature is not None:
            tau = parts.temperature.temperatures(ctx, selection)
            tau_sq = bool(parts.temperature.scale_loss_by_tau_squared)
        kd_count = n_kept if selection.normalize_by == "kept" else n_valid
        if n_kept == n_valid:
            keep = None
    result = fused_output_layer_loss(hs_v, student_weight, ht_v, teacher_weight.detach() if kd else None, lab,
                                     parts.objective if kd else None, keep=keep, temperature=tau,
                                     scale_loss_by_tau_squared=tau_sq, kd_weight=parts.kd_weight,
                                     ce_weight=parts.ce_weight, tp_group=tp_group, vocab_size=vocab_size,
                                     chunk_rows=chunk_rows, reduce_hidden_grad=not sequence_parallel)
    if result.nonfinite:
        return skip()
    report["ce_count"] += n_valid
    report["ce_sum"] += result.ce_sum.double()
    count = kd_count if kd else n_valid
    if count == 0:
        report["empty_microbatches"] += 1
    report["kd_sum"] += result.kd_sum.double()
    report["kd_count"] += kd_count
    if not math.isfinite(float(result.loss.detach())) or not bool(torch.isfinite(report["ce_sum"])):
        report["nonfinite"] += 1
    return result.loss, torch.tensor(count, dtype=torch.int64, device=result.loss.device), report
