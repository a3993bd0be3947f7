"""Process-group context and the vocab-parallel primitives every objective shares.

Design
------
Logits arrive as ``[N, V_local]`` shards of the padded vocabulary, rank ``r`` of
the TP group holding columns ``[r * V_local, (r + 1) * V_local)``. Objectives
never gather the vocabulary: they reduce each shard to a few per-token scalars
(max, sum of exponentials, weighted sums) and all-reduce those. Groups are
passed in explicitly; nothing here reads megatron's global parallel state.

``group=None`` means "unsharded": every collective is the identity, so the same
code serves TP=1 without a process group.

Autograd: :func:`all_reduce_sum` has an identity backward, which is correct when
the value computed from the reduced result is replicated on every TP rank (each
rank then back-propagates the same upstream gradient into its own partial).
Max is used only as a detached shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    """The process groups a step runs with. ``None`` groups mean size 1."""

    tp_group: Any = None
    dp_group: Any = None
    pp_group: Any = None

    @property
    def tp_size(self) -> int:
        return group_size(self.tp_group)

    @property
    def tp_rank(self) -> int:
        return group_rank(self.tp_group)

    @property
    def dp_size(self) -> int:
        return group_size(self.dp_group)

    @property
    def dp_rank(self) -> int:
        return group_rank(self.dp_group)


def group_size(group: Any) -> int:
    """World size of ``group``; 1 for ``None``."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Any) -> int:
    """Rank within ``group``; 0 for ``None``."""
    return 0 if group is None else dist.get_rank(group)


def vocab_shard_start(v_local: int, group: Any) -> int:
    """First global vocab id held by this rank's shard of width ``v_local``."""
    return group_rank(group) * v_local


def real_column_mask(v_local: int, group: Any, vocab_size: Optional[int], device=None) -> Optional[torch.Tensor]:
    """Bool ``[V_local]``, True on real columns, or ``None`` when no column is padding.

    Raises:
        ValueError: when ``vocab_size`` exceeds the padded vocabulary.
    """
    if vocab_size is None:
        return None
    padded = v_local * group_size(group)
    if vocab_size > padded:
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the padded vocabulary {padded} "
            f"(V_local={v_local} x TP={group_size(group)}); pass the real vocabulary size"
        )
    if vocab_size == padded:
        return None
    start = vocab_shard_start(v_local, group)
    ids = torch.arange(start, start + v_local, device=device)
    return ids < vocab_size


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; backward passes the (replicated) gradient through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Differentiable SUM all-reduce (identity backward); identity for ``group=None``."""
    if group is None or group_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


def all_reduce_max(x: torch.Tensor, group: Any) -> torch.Tensor:
    """MAX all-reduce of a detached tensor (used only as a numerical shift)."""
    x = x.detach().clone()
    if group is not None and group_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def masked_logits_fp32(logits: torch.Tensor, group: Any, vocab_size: Optional[int]) -> torch.Tensor:
    """fp32 copy-or-view of ``logits`` with padded columns set to -inf."""
    x = logits.float()
    mask = real_column_mask(x.shape[-1], group, vocab_size, device=x.device)
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf"))
    return x


def vocab_parallel_logsumexp(logits: torch.Tensor, group: Any, vocab_size: Optional[int] = None) -> torch.Tensor:
    """log sum_v exp(logits[:, v]) over the whole (real) vocabulary: ``[N, V_local] -> [N]`` fp32.

    Differentiable; gradient is softmax on the local shard.
    """
    x = masked_logits_fp32(logits, group, vocab_size)
    local_max = x.detach().amax(dim=-1)
    global_max = all_reduce_max(local_max, group)
    shift = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
    sum_exp = all_reduce_sum(torch.exp(x - shift.unsqueeze(-1)).sum(dim=-1), group)
    return shift + torch.log(sum_exp)


def vocab_parallel_log_softmax(logits: torch.Tensor, group: Any, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Log-softmax over the sharded vocabulary: ``[N, V_local] -> [N, V_local]`` fp32, -inf on padding."""
    x = masked_logits_fp32(logits, group, vocab_size)
    return x - vocab_parallel_logsumexp(logits, group, vocab_size).unsqueeze(-1)
