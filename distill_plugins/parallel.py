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

Autograd: two SUM all-reduces differ only in their backward.

* :func:`all_reduce_sum` has an identity backward. Use it for the *last*
  reduction, whose result every rank uses in the same way to compute the same
  (replicated) loss: each rank then back-propagates the same upstream gradient
  into its own partial. :func:`vocab_parallel_logsumexp` uses it, so its
  result is meant for replicated use (``lse - target_logit``).
* :func:`all_reduce_sum_for_shards` all-reduces the gradient in backward. Use it
  when the reduced value feeds rank-specific, sharded computations (the
  normaliser inside a log-softmax whose columns each rank uses differently):
  the gradient of the reduced value is then the sum of every rank's
  contribution. :func:`vocab_parallel_log_softmax`, :func:`vocab_parallel_softmax`
  and :func:`vocab_parallel_expectation` use it internally.

Max is used only as a detached shift. The fused objectives do not rely on
either: their custom autograd Functions compute the gradient slice directly.

Fused building blocks (non-differentiable, for custom autograd Functions):
:func:`local_real_width` (padding is a suffix, so real columns are a prefix of
every shard), :func:`row_chunks`, :func:`finite_shift`,
:func:`all_reduce_max_packed` (maxima plus 0/1 flags in one collective),
:func:`rescale_partials_`, :func:`all_reduce_sum_` and :func:`merge_partials`
(one MAX and one SUM all-reduce for any number of per-token partial sums taken
relative to local maxima). docs/objectives.md shows how they compose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .errors import InputError


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
        InputError: (a ValueError) when ``vocab_size`` is not positive or exceeds
            the padded vocabulary.
    """
    if vocab_size is None:
        return None
    padded = v_local * group_size(group)
    if vocab_size > padded or vocab_size <= 0:
        raise InputError(
            f"vocab_size={vocab_size} is outside [1, {padded}], the padded vocabulary "
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


class _AllReduceSumForShards(torch.autograd.Function):
    """Sum over the group; backward sums the gradients over the group too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum_for_shards(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Differentiable SUM all-reduce whose backward also SUM-reduces; identity for ``group=None``.

    For a reduced value that each rank then uses in its own way (see the module docstring).
    """
    if group is None or group_size(group) == 1:
        return x
    return _AllReduceSumForShards.apply(x, group)


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


def _logsumexp(x: torch.Tensor, group: Any, reduce) -> torch.Tensor:
    local_max = x.detach().amax(dim=-1)
    global_max = all_reduce_max(local_max, group)
    shift = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
    sum_exp = reduce(torch.exp(x - shift.unsqueeze(-1)).sum(dim=-1), group)
    return shift + torch.log(sum_exp)


def vocab_parallel_logsumexp(logits: torch.Tensor, group: Any, vocab_size: Optional[int] = None) -> torch.Tensor:
    """log sum_v exp(logits[:, v]) over the whole (real) vocabulary: ``[N, V_local] -> [N]`` fp32.

    Differentiable; gradient is softmax on the local shard. The result is meant
    for replicated use (identity-backward all-reduce; see the module docstring).
    """
    return _logsumexp(masked_logits_fp32(logits, group, vocab_size), group, all_reduce_sum)


def vocab_parallel_log_softmax(logits: torch.Tensor, group: Any, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Log-softmax over the sharded vocabulary: ``[N, V_local] -> [N, V_local]`` fp32, -inf on padding.

    Differentiable: combine its per-shard results into the loss with
    :func:`all_reduce_sum` (the normaliser's own reduction sums gradients over
    ranks, so the gradient is correct whatever each rank does with its columns).
    """
    x = masked_logits_fp32(logits, group, vocab_size)
    return x - _logsumexp(x, group, all_reduce_sum_for_shards).unsqueeze(-1)


# ---------------------------------------------------------------------------
# Fused building blocks for memory-lean objectives (custom autograd Functions).
#
# The pattern, per token row (see docs/objectives.md, "Writing your own"):
#   1. each rank walks its shard in row chunks and computes, per row, local
#      maxima (one column per softmax it needs) and partial sums *relative to
#      its local maxima* (sum of exp, weighted sums);
#   2. one MAX all-reduce of the packed ``[N, k]`` maxima (plus validation
#      flags), after which every rank rescales its partials by
#      ``exp(local_max - global_max)``;
#   3. one SUM all-reduce of the packed ``[N, j]`` partials.
# Backward recomputes the gradient slice elementwise from saved per-token
# scalars, chunk by chunk, without communication.
# ---------------------------------------------------------------------------

#: fp32 elements per row chunk in the fused kernels (1 MiB): small enough to stay
#: cache-resident on CPU and to bound the extra memory, large enough that the
#: per-chunk Python overhead is negligible.
DEFAULT_CHUNK_ELEMENTS = 1 << 18


def local_real_width(v_local: int, group: Any, vocab_size: Optional[int]) -> int:
    """How many leading columns of this rank's shard are real (not padding).

    Megatron pads the vocabulary at its end, so the real columns of every shard
    form a prefix: ``clamp(vocab_size - rank * V_local, 0, V_local)``.

    Raises:
        InputError: ``vocab_size`` is not positive or exceeds the padded vocabulary.
    """
    if vocab_size is None:
        return v_local
    padded = v_local * group_size(group)
    if vocab_size <= 0 or vocab_size > padded:
        raise InputError(
            f"vocab_size={vocab_size} is outside [1, {padded}] (the padded vocabulary: "
            f"V_local={v_local} x TP={group_size(group)}); pass the real vocabulary size"
        )
    return max(0, min(v_local, vocab_size - vocab_shard_start(v_local, group)))


def row_chunks(n_rows: int, row_width: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """Yield ``slice`` objects covering ``range(n_rows)`` with about ``chunk_elements`` per chunk."""
    step = max(1, chunk_elements // max(1, row_width))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def all_reduce_sum_(x: torch.Tensor, group: Any) -> torch.Tensor:
    """In-place, non-differentiable SUM all-reduce (for use inside autograd Functions)."""
    if group is not None and group_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def finite_shift(local_max: torch.Tensor) -> torch.Tensor:
    """The shift a rank subtracts before exponentiating: its local max, or 0 where that is not finite.

    A shard with no real column (or only -inf) has local max -inf; shifting by 0
    keeps its exponentials at 0 instead of NaN.
    """
    return torch.where(torch.isfinite(local_max), local_max, torch.zeros_like(local_max))


def all_reduce_max_packed(local_max: torch.Tensor, group: Any, flags: Optional[torch.Tensor] = None):
    """One MAX all-reduce of per-token maxima ``[N, k]`` and optional 0/1 flags ``[N, f]``.

    Flags ride in the same collective so that a condition seen on one rank (a
    NaN in its shard, say) is known to all ranks, which can then raise together
    instead of deadlocking in the next collective.

    Returns:
        ``(global_max [N, k], global_flags [N, f] or None)``, detached.
    """
    k = local_max.shape[-1]
    packed = local_max.detach() if flags is None else torch.cat([local_max.detach(), flags.to(local_max.dtype)], -1)
    packed = all_reduce_max(packed, group)
    return packed[..., :k], (None if flags is None else packed[..., k:])


def rescale_partials_(partials: torch.Tensor, local_max: torch.Tensor, global_max: torch.Tensor,
                      shift_of: Sequence[Optional[int]]) -> torch.Tensor:
    """Rescale partial sums taken relative to local maxima onto the global maxima, in place.

    Column ``j`` of ``partials`` was computed as ``sum_v exp(x_v - shift) * g_v`` with
    ``shift = finite_shift(local_max[:, shift_of[j]])``; afterwards it is relative to
    ``global_max[:, shift_of[j]]``. ``shift_of[j] = None`` leaves column ``j`` alone
    (plain sums such as uniform averages).
    """
    scale = torch.where(torch.isfinite(local_max), torch.exp(local_max - global_max), torch.zeros_like(local_max))
    for j, s in enumerate(shift_of):
        if s is not None:
            partials[:, j] *= scale[:, s]
    return partials


def merge_partials(local_max: torch.Tensor, partials: torch.Tensor, shift_of: Sequence[Optional[int]], group: Any,
                   flags: Optional[torch.Tensor] = None):
    """Steps 2 and 3 of the fused pattern: MAX all-reduce, rescale, one SUM all-reduce.

    Args:
        local_max: ``[N, k]`` per-token maxima of the ``k`` softmax arguments on this shard.
        partials: ``[N, j]`` partial sums relative to ``finite_shift(local_max)`` (modified in place).
        shift_of: for each partial column, the index of the max it is relative to, or None.
        group: TP group or None.
        flags: optional ``[N, f]`` 0/1 flags, MAX-reduced with the maxima.

    Returns:
        ``(global_max [N, k], partials [N, j] summed over the group, global_flags or None)``.
        Two collectives in total, whatever ``k`` and ``j``.
    """
    global_max, global_flags = all_reduce_max_packed(local_max, group, flags)
    if group is not None and group_size(group) > 1:
        rescale_partials_(partials, local_max, global_max, shift_of)
        all_reduce_sum_(partials, group)
    return global_max, partials, global_flags


def vocab_parallel_sum(values: torch.Tensor, group: Any, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Sum over the real vocabulary of per-column values ``[N, V_local] -> [N]`` fp32, differentiable."""
    width = local_real_width(values.shape[-1], group, vocab_size)
    return all_reduce_sum(values[..., :width].float().sum(dim=-1), group)


def vocab_parallel_softmax(logits: torch.Tensor, group: Any, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Softmax over the sharded real vocabulary: ``[N, V_local] -> [N, V_local]`` fp32, 0 on padding."""
    return torch.exp(vocab_parallel_log_softmax(logits, group, vocab_size))


def vocab_parallel_expectation(logits: torch.Tensor, values: torch.Tensor, group: Any,
                               vocab_size: Optional[int] = None) -> torch.Tensor:
    """``sum_v softmax(logits)_v * values_v`` over the real vocabulary: ``[N]`` fp32.

    Differentiable with respect to both ``logits`` and ``values``. Padded columns
    carry zero weight whatever ``values`` holds there; where the weight is 0 the
    product counts as 0 (so ``0 * inf`` terms vanish).
    """
    width = local_real_width(logits.shape[-1], group, vocab_size)
    weights = vocab_parallel_softmax(logits, group, vocab_size)[..., :width]
    v = values[..., :width].float()
    terms = torch.where(weights > 0, weights * v, torch.zeros_like(v))
    return all_reduce_sum(terms.sum(dim=-1), group)
