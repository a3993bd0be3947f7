"""Tensor-parallel helpers the aligners need on top of :mod:`distill_plugins.parallel`.

* :func:`copy_to_tp`: identity forward, SUM all-reduce backward. Put it in front
  of a vocab-sharded output layer fed by a replicated activation (a projector's
  output): each rank's backward only sees its shard's contribution to the
  activation's gradient, and the all-reduce makes it the full gradient, equal on
  every rank, so replicated projectors stay in sync without a separate gradient
  all-reduce. Megatron's ``copy_to_tensor_model_parallel_region`` does the same.
* :func:`gather_vocab`: all-gather ``[N, V_local]`` shards to ``[N, V]``. Backward
  keeps this rank's slice, which is right when everything computed from the
  gathered tensor is replicated on all ranks.
* SUM forward with SUM backward, for a reduced value whose consumers differ per
  rank, is :func:`distill_plugins.parallel.all_reduce_sum_for_shards`.
* :func:`vocab_parallel_argmax`: global argmax id of sharded logits (smallest id
  among ties, so every rank agrees).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from ..parallel import group_rank, group_size, masked_logits_fp32, vocab_shard_start


def _active(group: Any) -> bool:
    return group is not None and group_size(group) > 1


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def copy_to_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Identity forward; backward all-reduces (SUM) the gradient over ``group``."""
    if not _active(group):
        return x
    return _CopyToTP.apply(x, group)


class _GatherVocab(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group, ctx.width = group, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(group_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = group_rank(ctx.group) * ctx.width
        return grad[..., start:start + ctx.width].contiguous(), None


def gather_vocab(x: torch.Tensor, group: Any) -> torch.Tensor:
    """All-gather the last (vocab) dimension: ``[N, V_local] -> [N, V_local * TP]``.

    Differentiable; the backward keeps this rank's slice of the (replicated)
    upstream gradient.
    """
    if not _active(group):
        return x
    return _GatherVocab.apply(x, group)


def vocab_parallel_argmax(logits: torch.Tensor, group: Any, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Global argmax id ``[N]`` (int64) of ``[N, V_local]`` shards, padding excluded.

    Ties resolve to the smallest global id on every rank.
    """
    x = masked_logits_fp32(logits.detach(), group, vocab_size)
    local_val, local_idx = x.max(dim=-1)
    local_idx = local_idx + vocab_shard_start(x.shape[-1], group)
    if not _active(group):
        return local_idx
    best = local_val.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    big = torch.iinfo(torch.long).max
    cand = torch.where(local_val == best, local_idx, torch.full_like(local_idx, big))
    dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=group)
    return cand


def local_columns(global_ids: torch.Tensor, v_local: int, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of ``global_ids`` live in this rank's shard: ``(positions, local_ids)``."""
    start = vocab_shard_start(v_local, group)
    inside = (global_ids >= start) & (global_ids < start + v_local)
    pos = inside.nonzero(as_tuple=True)[0]
    return pos, global_ids[pos] - start


def all_reduce_(x: torch.Tensor, group: Any) -> torch.Tensor:
    """In-place SUM all-reduce of a non-differentiable tensor (no-op without a group)."""
    if _active(group):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x
