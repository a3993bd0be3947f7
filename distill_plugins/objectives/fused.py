"""The output layer fused with the distillation loss and the student's cross-entropy, vocab-parallel.

Design
------
On the last pipeline stage the materialised path holds both models' logits
``z = h W^T`` (``[N, V_local]`` each: this TP rank's slice of the padded
vocabulary), a private fp32 copy of the student's logits for the logged
cross-entropy, and in backward the logits' gradient. Here the ``N`` token rows
are processed in chunks of ``R`` rows; for one chunk (``W`` rows are the
``[V_local, H]`` shards of ColumnParallelLinear, no bias)::

    z_S = h_S[rows] W_S^T,   z_T = h_T[kept rows] W_T^T          [R, V_local], model dtype
    ce_i  = lse(z_S,i) - z_S,i[y_i]                               student CE over the real vocabulary
    l_i, dl/dz_S = objective.loss_and_grad(z_S[kept], z_T, tau, row_weights=w)
    G     = ce_weight * (softmax(z_S) - onehot(y)) + sum_kept w_i dl_i/dz_S        [R, V_local] fp32
    dL/dh_S[rows]  = G W_S                                        [R, H_S]
    dL/dW_S       += G^T h_S[rows]                                [V_local, H_S], fp32 accumulator

with ``w_i = kd_weight * tau_i**2`` when the temperature policy has
``scale_loss_by_tau_squared`` (else ``kd_weight``), so that the back-propagated
value is the materialised path's ``L = kd_weight * sum_kept tau_i**2 l_i +
ce_weight * sum_valid ce_i``. Padded vocabulary columns (at or past
``vocab_size``, a suffix of the padded vocabulary) are excluded from the CE and
the objective and get exactly zero gradient, as on the materialised path.

The chunk contract for objectives
---------------------------------
A chunk spans whole rows of the rank's shard, so every per-row statistic an
objective needs (maxima, sums of exponentials, weighted sums over the full
vocabulary) is complete after the objective's own per-token all-reduces within
one call on the chunk. The contract is therefore *row independence*: an
objective that declares ``supports_fused_output_layer`` promises that calling
it on the chunks of a partition of the rows (the same chunks in the same order
on every TP rank) gives the per-row losses and gradients of one call on all
rows, and it is reached through :meth:`~distill_plugins.Objective.loss_and_grad`
(autograd through ``__call__`` by default). The per-token collectives are
unchanged (the built-ins' one MAX and one or two SUM all-reduces of a few fp32
scalars per token; the CE adds a MAX of ``[R, 2]`` that also carries the
non-finite flags and a SUM of ``[R, 2]``); only their count per microbatch grows,
from 2-3 to 2-3 per chunk, each carrying ``R`` rows.

Gradients in forward, not recompute in backward
-----------------------------------------------
The gradients with respect to ``h_S`` and ``W_S`` are computed chunk by chunk in
the forward (Liger's fused-linear-loss choice) and scaled by the incoming
scalar gradient in backward. Recomputing the logits in backward would keep only
``[N]`` statistics between the passes but would run the student's and the
teacher's logit GEMMs twice: six ``N x H x V_local`` GEMMs against the
materialised path's four (two forward, two backward), about 1.5x the time of a
stage whose cost is those GEMMs. With gradients in forward the fused path runs
exactly the materialised path's GEMMs. The price is that ``dL/dW_S``
(``[V_local, H_S]`` fp32) and ``dL/dh_S`` (``[N, H_S]``) live from forward to
backward; on the last stage megatron's 1F1B schedule runs a microbatch's
backward right after its forward, so nothing accumulates across microbatches.
Without grad mode (evaluation) no gradient work is done. The function is
``once_differentiable``.

Chunk size
----------
``R = chunk_rows`` (default :func:`default_chunk_rows`: ``2**25 / V_local``
rows, at least 256). The extra memory is about five ``[R, V_local]`` fp32
buffers (both logit chunks, the CE exponentials, ``G``, the objective's gradient)
plus the ``dL/dW_S`` accumulator: ~0.6 GiB plus ``4 V_local H_S`` bytes at the
default, whatever ``N``. 256 rows keep the GEMMs' arithmetic intensity high
enough (about ``R`` flops per weight byte read) for CPUs and GPUs; lower
``chunk_rows`` to trade speed for memory.

Tensor parallelism
------------------
Without sequence parallelism every TP rank holds the same ``h_S``; its gradient
is the sum over ranks of ``G W_S`` (each rank holds one vocabulary slice), so
the function all-reduces it in backward, like megatron's ColumnParallelLinear
(``copy_to_tensor_model_parallel_region``). With ``sequence_parallel=True`` the
hidden states are this rank's sequence shard ``[s/TP, b, H]``: they are
all-gathered in forward and the gradient is reduce-scattered in backward.

Selectors and temperature policies
----------------------------------
Parts that score tokens (LATF's Hellinger distances, IDTS, AdaSPEC's loss gap)
get per-token statistics from :func:`token_statistics`, a first pass over the
chunks computing the logits without gradient and reducing them to ``[N]``
values with the same functions as the materialised path
(:mod:`distill_plugins.selection.scores`). The parts receive a
:class:`~distill_plugins.TokenContext` whose ``token_stats`` holds them and whose
logits fields are :class:`UnmaterialisedLogits` placeholders (shape and device
only; reading values raises). A part declares what it reads with
``fused_token_stats()``; :func:`fused_support` says whether every part of a
recipe can run fused, and why not. The statistics pass costs one more logit
GEMM per model (two for AdaSPEC's reference).

Non-finite logits
-----------------
As on the materialised path, a NaN/Inf logit in a computed row of either model,
on any TP rank, makes the microbatch contribute zero (count 0,
``report["nonfinite"] = 1``). The flags ride in the CE's MAX all-reduce (and in
one scalar MAX after the statistics pass), so all ranks agree. Difference: the
teacher's logits are computed, and checked, for the kept rows only (and for all
valid rows when a statistics pass runs).

Usage (rows already flattened; the engine's entry point, which takes the stage's
``[s, b, H]`` hidden states, picks the valid rows and runs the selector and
temperature policy, is :func:`distill_plugins.engine.fused_loss.fused_distill_loss`)::

    out = fused_output_layer_loss(h_s, w_s, h_t, w_t, labels, objective, keep=keep, temperature=tau,
                                  kd_weight=1.0, ce_weight=0.5, tp_group=tp_group, vocab_size=vocab_size)
    out.loss.backward()   # dL/dh_s, dL/dw_s
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from distill_plugins.errors import DistillError, InputError
from distill_plugins.interfaces import Objective, Temperature, TokenContext
from distill_plugins.parallel import all_reduce_max, all_reduce_sum_, group_size, local_real_width, vocab_shard_start
from distill_plugins.selection import scores as token_scores

__all__ = [
    "DEFAULT_CHUNK_LOGITS",
    "FusedDecision",
    "FusedLoss",
    "FusedSupport",
    "MIN_CHUNK_ROWS",
    "TOKEN_STATS",
    "TokenStatistics",
    "UnmaterialisedLogits",
    "decide_fused_output_layer",
    "default_chunk_rows",
    "fused_output_layer_loss",
    "fused_support",
    "gather_sequence_parallel",
    "objective_supports_fused",
    "replicated_input",
    "token_statistics",
]

#: logits per chunk at the default chunk size (2**25 = 128 MiB per fp32 ``[R, V_local]`` buffer).
DEFAULT_CHUNK_LOGITS = 1 << 25

#: smallest default chunk (rows), so the GEMMs stay efficient at large vocabulary shards.
MIN_CHUNK_ROWS = 256

#: per-token statistics the statistics pass computes, by name (the score functions of
#: :mod:`distill_plugins.selection.scores`; ``loss_gap`` needs the reference model).
TOKEN_STATS: tuple[str, ...] = ("hellinger", "forward_kl", "reverse_kl", "student_entropy", "loss_gap")


def default_chunk_rows(v_local: int) -> int:
    """Rows per chunk: ``max(MIN_CHUNK_ROWS, DEFAULT_CHUNK_LOGITS // v_local)``."""
    return max(MIN_CHUNK_ROWS, DEFAULT_CHUNK_LOGITS // max(1, v_local))


def _chunks(n: int, rows: int):
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


# --------------------------------------------------------------------------- support


def objective_supports_fused(objective: Objective) -> bool:
    """Whether ``objective`` declares the fused row-chunk contract (``supports_fused_output_layer``)."""
    return bool(objective.supports_fused_output_layer)


@dataclass(frozen=True)
class FusedSupport:
    """Whether a set of loss parts can run on the fused output layer.

    Attributes:
        supported: every part can.
        reasons: one sentence per part that cannot (for the engine's notice).
        token_stats: statistics the statistics pass must compute (empty: no pass).
    """

    supported: bool
    reasons: tuple[str, ...] = ()
    token_stats: tuple[str, ...] = ()


def fused_support(parts: Any) -> FusedSupport:
    """Check the objective, selector and temperature policy of ``parts`` (a ``LossParts``).

    With ``kd_weight == 0`` only the student's CE runs, which is always supported.
    """
    if parts.kd_weight <= 0:
        return FusedSupport(True)
    reasons, needed = [], []
    if not objective_supports_fused(parts.objective):
        reasons.append(f"objective {parts.objective.name or type(parts.objective).__name__!r} does not declare "
                       "supports_fused_output_layer (docs/objectives.md, 'The fused output layer')")
    for kind, part in (("selector", parts.selector), ("temperature policy", parts.temperature)):
        if part is None:
            continue
        names = part.fused_token_stats()
        label = part.name or type(part).__name__
        if names is None:
            reasons.append(f"{kind} {label!r} reads the logits (its fused_token_stats() is None)")
            continue
        unknown = [n for n in names if n not in TOKEN_STATS]
        if unknown:
            reasons.append(f"{kind} {label!r} asks for unknown token statistics {unknown}; "
                           f"known: {', '.join(TOKEN_STATS)}")
        needed += [n for n in names if n in TOKEN_STATS]
    return FusedSupport(not reasons, tuple(reasons), tuple(dict.fromkeys(needed)))


@dataclass(frozen=True)
class FusedDecision:
    """What ``loss.fused_output_layer`` comes to for one run (:func:`decide_fused_output_layer`).

    Attributes:
        on: the last stage runs the fused output layer (no ``[N, V_local]`` logits).
        reasons: one sentence per part or setting that keeps the logits (empty when ``on``).
        error: set for ``true`` with a reason: the message of the recipe error.
        notice: set for ``auto`` falling back: the one line the engine logs.
    """

    on: bool
    reasons: tuple[str, ...] = ()
    error: Optional[str] = None
    notice: Optional[str] = None


def decide_fused_output_layer(setting: Any, parts: Any, *, aligner: str, separate_teacher: bool) -> FusedDecision:
    """The one rule ``distill check``, ``distill plan`` and ``distill run`` apply to ``loss.fused_output_layer``.

    The fused path is possible when ``loss.kd_weight == 0`` (the student's CE alone), or
    when the objective, the selector and the temperature policy support it
    (:func:`fused_support`), the aligner is ``identity`` (one vocabulary: the teacher's
    logits are compared column by column) and the teacher is co-located (a teacher on
    its own ranks sends logits, not hidden states). ``auto`` takes it when possible and
    otherwise keeps the logits with a notice; ``true`` makes a reason an error;
    ``false`` always keeps the logits.

    Args:
        setting: ``"auto"``, True or False (``recipe.loss.fused_output_layer``).
        parts: a ``LossParts`` (objective, selector, temperature, kd_weight).
        aligner: the resolved aligner name (``recipe.aligner.name`` after ``auto`` is resolved).
        separate_teacher: the recipe has ``teacher_parallel`` (a teacher on its own ranks).
    """
    if setting is False:
        return FusedDecision(False)
    if setting not in ("auto", True):
        raise InputError(f"loss.fused_output_layer={setting!r}; expected auto, true or false")
    reasons: list[str] = []
    if parts.kd_weight > 0:
        reasons += list(fused_support(parts).reasons)
        if aligner != "identity":
            reasons.append(f"aligner {aligner!r} compares two vocabularies through the logits (only identity, "
                           "one tokenizer, runs fused)")
        if separate_teacher:
            reasons.append("teacher_parallel: a teacher on its own ranks sends its logits, not hidden states")
    if not reasons:
        return FusedDecision(True)
    joined = "; ".join(reasons)
    if setting is True:
        return FusedDecision(False, tuple(reasons), error=(
            f"loss.fused_output_layer=true but {joined}; set loss.fused_output_layer: auto (falls back to "
            "materialised logits with a notice) or false, or use parts that support the fused output layer "
            "(docs/objectives.md, 'The fused output layer')"))
    return FusedDecision(False, tuple(reasons), notice=(
        f"loss.fused_output_layer=auto: the last stage materialises [tokens, vocab] logits because {joined} "
        "(set loss.fused_output_layer: false to silence this, or see docs/objectives.md, 'The fused output layer')"))


# --------------------------------------------------------------------------- TP input regions


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward SUM all-reduces the gradient (every rank used the same input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def replicated_input(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``x`` for use by every TP rank on its own vocabulary slice: its gradient is summed over ``group``.

    megatron's ``copy_to_tensor_model_parallel_region``; the identity for ``group=None`` or one rank.
    """
    if group is None or group_size(group) == 1:
        return x
    return _CopyToTensorParallel.apply(x, group)


def _all_gather_dim0(x: torch.Tensor, group: Any) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


class _GatherSequenceParallel(torch.autograd.Function):
    """All-gather along dim 0 in forward; reduce-scatter (sum, keep this rank's slice) in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rows = group, x.shape[0]
        return _all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        rank, rows = dist.get_rank(ctx.group), ctx.rows
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty((rows,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
            return out, None
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)  # gloo has no reduce-scatter
        return grad[rank * rows:(rank + 1) * rows].clone(), None


def gather_sequence_parallel(x: torch.Tensor, group: Any, *, grad: bool = True) -> torch.Tensor:
    """This rank's sequence shard ``[s/TP, b, H]`` -> the full ``[s, b, H]`` (megatron's SP gather).

    With ``grad`` the gradient is reduce-scattered back (summed over ranks); without it the
    result is detached.
    """
    if group is None or group_size(group) == 1:
        return x if grad else x.detach()
    if not grad:
        with torch.no_grad():
            return _all_gather_dim0(x.detach(), group)
    return _GatherSequenceParallel.apply(x, group)


# --------------------------------------------------------------------------- placeholders for parts


class UnmaterialisedLogits(torch.Tensor):
    """Stands in for ``[N, V_local]`` logits in a fused :class:`~distill_plugins.TokenContext`.

    Has a shape, dtype and device (enough for parts that count rows) but no data:
    any other use raises :class:`~distill_plugins.errors.DistillError` telling the
    part to read ``ctx.token_stats`` (and declare them in ``fused_token_stats()``).
    """

    _ALLOWED = frozenset([torch.Tensor.shape.__get__, torch.Tensor.device.__get__, torch.Tensor.dtype.__get__,
                          torch.Tensor.ndim.__get__, torch.Tensor.is_cuda.__get__,
                          torch.Tensor.requires_grad.__get__, torch.Tensor.size, torch.Tensor.dim,
                          torch.Tensor.numel, torch.Tensor.__len__])

    @staticmethod
    def __new__(cls, n_rows: int, v_local: int, *, device: Any, dtype: torch.dtype = torch.float32):
        return torch.Tensor._make_wrapper_subclass(cls, (n_rows, v_local), dtype=dtype, device=device)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"UnmaterialisedLogits(shape={tuple(self.shape)}, device={self.device})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls._ALLOWED:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        raise DistillError(f"a selector or temperature policy used the logits ({name}) on the fused output layer, "
                           "where they are never materialised; read ctx.token_stats instead and list the names in "
                           "fused_token_stats(), or set loss.fused_output_layer: false")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise DistillError(f"fused output layer: logits placeholder used by {func}; read ctx.token_stats instead")


# --------------------------------------------------------------------------- statistics pass


@dataclass
class TokenStatistics:
    """Result of :func:`token_statistics`.

    Attributes:
        values: name -> fp32 ``[N]`` (TP-replicated).
        nonfinite: some computed logit was NaN/Inf on some TP rank (agreed over TP).
    """

    values: dict[str, torch.Tensor]
    nonfinite: bool = False


def _check_layer(name: str, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise InputError(f"{name}: hidden states must be [N, H] and the weight [V_local, H]; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise InputError(f"{name}: hidden size {hidden.shape[1]} != output-layer weight width {weight.shape[1]} "
                         f"(weight {tuple(weight.shape)} must be this rank's [V_local, H] shard)")
    if hidden.dtype != weight.dtype:
        raise InputError(f"{name}: hidden dtype {hidden.dtype} != weight dtype {weight.dtype}; pass both in the "
                         "model's compute dtype")


def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.mm(hidden, weight.t())


def _nonfinite_rows(z: torch.Tensor) -> torch.Tensor:
    """fp32 ``[r]``: 1 where the row holds a NaN or an infinity.

    Read off the fp32 row sum (NaN, +-inf and +inf together all leave it non-finite):
    one reduction, about 15x cheaper than ``isfinite(z).all(1)`` on CPU. A row of
    finite logits whose sum overflows fp32 (``|z| ~ 1e33``) also counts as non-finite.
    """
    return (~torch.isfinite(z.sum(dim=1, dtype=torch.float32))).float()


@torch.no_grad()
def token_statistics(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                     teacher_weight: torch.Tensor, names: Sequence[str], *,
                     reference_hidden: Optional[torch.Tensor] = None,
                     reference_weight: Optional[torch.Tensor] = None, tp_group: Any = None,
                     vocab_size: Optional[int] = None, chunk_rows: Optional[int] = None) -> TokenStatistics:
    """Per-token statistics for selectors and temperature policies, without ``[N, V_local]`` logits.

    For each chunk of rows the logits ``h W^T`` of the student, the teacher (and the
    reference, for ``loss_gap``) are computed without gradient and reduced with the
    score functions of :mod:`distill_plugins.selection.scores` (each a MAX and two SUM
    all-reduces of a few fp32 scalars per token over ``tp_group``):

    * ``hellinger``: ``||sqrt(p) - sqrt(q)||_2 / sqrt(2)``; ``forward_kl``: ``KL(p || q)``;
      ``reverse_kl``: ``KL(q || p)``; ``student_entropy``: ``H(q)``;
    * ``loss_gap``: ``KL(p || q) - KL(p || r)`` (AdaSPEC; ``r`` the reference model).

    Args:
        student_hidden, teacher_hidden, reference_hidden: ``[N, H_*]`` rows (the valid tokens).
        student_weight, teacher_weight, reference_weight: ``[V_local, H_*]`` output-layer shards.
        names: statistics to compute, from :data:`TOKEN_STATS`.
        tp_group, vocab_size: vocabulary sharding and the real vocabulary size.
        chunk_rows: rows per chunk (default :func:`default_chunk_rows`).

    Returns:
        :class:`TokenStatistics`: fp32 ``[N]`` per name, identical on every TP rank,
        and whether any computed logit was non-finite (one scalar MAX all-reduce).

    Raises:
        InputError: an unknown name, ``loss_gap`` without the reference model, or bad shapes.
    """
    unknown = [n for n in names if n not in TOKEN_STATS]
    if unknown:
        raise InputError(f"unknown token statistics {unknown}; known: {', '.join(TOKEN_STATS)}")
    _check_layer("student", student_hidden, student_weight)
    _check_layer("teacher", teacher_hidden, teacher_weight)
    need_ref = "loss_gap" in names
    if need_ref:
        if reference_hidden is None or reference_weight is None:
            raise InputError("token statistic 'loss_gap' needs the reference model's hidden states and "
                             "output-layer weight (recipe key 'reference')")
        _check_layer("reference", reference_hidden, reference_weight)
    n, v_local = student_hidden.shape[0], student_weight.shape[0]
    if teacher_weight.shape[0] != v_local or (need_ref and reference_weight.shape[0] != v_local):
        raise InputError(f"output-layer shards differ in vocabulary rows: student {v_local}, teacher "
                         f"{teacher_weight.shape[0]}; the models need the same padded vocabulary")
    dev = student_hidden.device
    values = {name: torch.zeros(n, dtype=torch.float32, device=dev) for name in dict.fromkeys(names)}
    flag = torch.zeros(1, dtype=torch.float32, device=dev)
    rows = chunk_rows or default_chunk_rows(v_local)
    kw = dict(tp_group=tp_group, vocab_size=vocab_size)
    for sl in _chunks(n, rows):
        zs = _logits(student_hidden[sl].detach(), student_weight.detach())
        zt = _logits(teacher_hidden[sl].detach(), teacher_weight.detach())
        flag = torch.maximum(flag, torch.maximum(_nonfinite_rows(zs).amax(), _nonfinite_rows(zt).amax()))
        zr = _logits(reference_hidden[sl].detach(), reference_weight.detach()) if need_ref else None
        for name, out in values.items():
            if name == "loss_gap":
                out[sl] = token_scores.loss_gap(zs, zt, zr, **kw)
            else:
                out[sl] = token_scores.compute_score(name, TokenContext(zs, zt, **kw))
        del zs, zt, zr
    flag = all_reduce_max(flag, tp_group)
    return TokenStatistics(values, bool(flag.item() > 0))


# --------------------------------------------------------------------------- the fused loss


@dataclass
class _Plan:
    """Everything but tensors that the autograd Function needs."""

    objective: Optional[Objective]
    keep: Optional[torch.Tensor]          # bool [N] or None (all rows)
    tau: Any                              # float or fp32 [N_kept]
    tau_sq: bool
    kd_weight: float
    ce_weight: float
    group: Any
    vocab_size: Optional[int]
    chunk_rows: int
    grad: bool                            # compute gradients (grad mode on and an input requires grad)
    nonfinite: bool = False               # set by forward


def _cross_entropy_rows(zs: torch.Tensor, labels: torch.Tensor, start: int, width: int, flags: torch.Tensor,
                        group: Any):
    """Student CE of a chunk and the exponentials for its gradient.

    Returns ``None`` when a flag (``flags`` or a non-finite student logit) is set on any
    rank, else ``(ce [r], e [r, width], sumexp [r])`` with ``e = exp(z - max)`` on the
    real columns: ``softmax = e / sumexp``. Two all-reduces: MAX ``[r, 2]`` (row max and
    the flags), SUM ``[r, 2]`` (sum of exponentials and the target logit).
    """
    x = zs[:, :width].float()
    m = x.amax(dim=1) if width > 0 else x.new_full((x.shape[0],), float("-inf"))
    flags = torch.maximum(flags, _nonfinite_rows(zs))
    packed = all_reduce_max(torch.stack([torch.nan_to_num(m, nan=0.0), flags], dim=1), group)
    if bool(packed[:, 1].any()):
        return None
    gmax = packed[:, 0]
    e = torch.exp(x - gmax.unsqueeze(1))
    local = labels - start
    here = (local >= 0) & (local < width)
    if width > 0:
        target = torch.where(here, x.gather(1, local.clamp(0, width - 1).unsqueeze(1)).squeeze(1),
                             torch.zeros_like(gmax))
    else:
        target = torch.zeros_like(gmax)
    sums = all_reduce_sum_(torch.stack([e.sum(dim=1), target], dim=1), group)
    ce = gmax + torch.log(sums[:, 0]) - sums[:, 1]
    return ce, e, sums[:, 0]


class _FusedOutputLayerLoss(torch.autograd.Function):
    """``(loss, kd_sum, ce_sum)`` of a microbatch's rows with gradients computed in forward (module docstring)."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, plan: _Plan):
        n, v_local = h_s.shape[0], w_s.shape[0]
        group, width = plan.group, local_real_width(v_local, plan.group, plan.vocab_size)
        start = vocab_shard_start(v_local, group)
        dev = h_s.device
        kd = plan.objective is not None and plan.kd_weight > 0
        grad_h = torch.zeros_like(h_s) if plan.grad else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=dev) if plan.grad else None
        kd_sum = torch.zeros((), dtype=torch.float64, device=dev)
        ce_sum = torch.zeros((), dtype=torch.float64, device=dev)
        keep = plan.keep
        if kd and keep is not None:
            kept_index = torch.cumsum(keep.long(), 0) - 1  # row -> position among kept rows
        tau = plan.tau
        if kd and isinstance(tau, torch.Tensor):
            tau = tau.to(device=dev, dtype=torch.float32)
        for sl in _chunks(n, plan.chunk_rows):
            hs = h_s[sl]
            zs = _logits(hs, w_s)
            r = zs.shape[0]
            flags = torch.zeros(r, dtype=torch.float32, device=dev)
            kr = zt = None
            if kd:
                if keep is None:
                    kr = None
                    zt = _logits(h_t[sl], w_t)
                    flags = _nonfinite_rows(zt)
                else:
                    kr = keep[sl].nonzero(as_tuple=True)[0]
                    if kr.numel():
                        zt = _logits(h_t[sl][kr], w_t)
                        flags[kr] = _nonfinite_rows(zt)
            ce = _cross_entropy_rows(zs, labels[sl], start, width, flags, group)
            if ce is None:
                plan.nonfinite = True
                break
            ce_rows, e, sumexp = ce
            ce_sum += ce_rows.double().sum()
            g = None
            if plan.grad and plan.ce_weight > 0:
                g = torch.zeros((r, v_local), dtype=torch.float32, device=dev)
                g[:, :width] = e.mul_((plan.ce_weight / sumexp).unsqueeze(1))
                here = ((labels[sl] - start) >= 0) & ((labels[sl] - start) < width)
                rows_here = here.nonzero(as_tuple=True)[0]
                g[rows_here, labels[sl][rows_here] - start] -= plan.ce_weight
            del e
            if zt is not None:
                pos = None if keep is None else kept_index[sl][kr]
                if isinstance(tau, torch.Tensor):
                    tau_c = tau[sl] if pos is None else tau[pos]
                else:
                    tau_c = tau
                sq = (tau_c * tau_c if isinstance(tau_c, torch.Tensor) else
                      torch.full((zt.shape[0],), tau_c * tau_c, device=dev)) if plan.tau_sq else None
                weights = None
                if plan.grad:
                    weights = plan.kd_weight * (sq if sq is not None else torch.ones(zt.shape[0], device=dev))
                zs_k = zs if kr is None else zs[kr]
                loss_rows, grad_k = plan.objective.loss_and_grad(
                    zs_k, zt, temperature=tau_c, tp_group=group, vocab_size=plan.vocab_size, row_weights=weights)
                kd_sum += (loss_rows * sq if sq is not None else loss_rows).double().sum()
                if grad_k is not None:
                    if g is None and kr is None:
                        g = grad_k  # cast (or not) once, for the GEMMs below
                    else:
                        if g is None:
                            g = torch.zeros((r, v_local), dtype=torch.float32, device=dev)
                        if kr is None:
                            g += grad_k
                        else:
                            g.index_add_(0, kr, grad_k.float())
                del zs_k, grad_k
            del zs, zt
            if plan.grad and g is not None:
                gc = g if g.dtype == w_s.dtype else g.to(w_s.dtype)
                del g
                torch.mm(gc, w_s, out=grad_h[sl]) if grad_h[sl].is_contiguous() else grad_h[sl].copy_(gc @ w_s)
                if gc.dtype == torch.float32:
                    grad_w.addmm_(gc.t(), hs)
                else:
                    grad_w += torch.mm(gc.t(), hs)
                del gc
        if plan.nonfinite:
            kd_sum.zero_()
            ce_sum.zero_()
            if plan.grad:
                grad_h.zero_()
                grad_w.zero_()
        kd_sum, ce_sum = kd_sum.float(), ce_sum.float()
        loss = plan.kd_weight * kd_sum + plan.ce_weight * ce_sum if kd else plan.ce_weight * ce_sum
        if plan.grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype, ctx.has_grad = w_s.dtype, plan.grad
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return loss, kd_sum, ce_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _kd, _ce):
        if not ctx.has_grad:
            return None, None, None, None, None, None
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss.float()
        grad_h = grad_h.mul_(scale.to(grad_h.dtype))
        grad_w = grad_w.mul_(scale).to(ctx.w_dtype)
        return (grad_h if ctx.needs_input_grad[0] else None, grad_w if ctx.needs_input_grad[1] else None,
                None, None, None, None)


@dataclass
class FusedLoss:
    """Result of :func:`fused_output_layer_loss`.

    Attributes:
        loss: differentiable fp32 scalar, ``kd_weight * kd_sum + ce_weight * ce_sum``.
        kd_sum: detached fp32 scalar, ``sum_kept tau_i**2 l_i`` (``tau**2`` only when scaling).
        ce_sum: detached fp32 scalar, the student's CE summed over the rows.
        nonfinite: a computed logit was NaN/Inf on some TP rank; everything is then 0.
    """

    loss: torch.Tensor
    kd_sum: torch.Tensor
    ce_sum: torch.Tensor
    nonfinite: bool = False


def fused_output_layer_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                            teacher_hidden: Optional[torch.Tensor], teacher_weight: Optional[torch.Tensor],
                            labels: torch.Tensor, objective: Optional[Objective], *,
                            keep: Optional[torch.Tensor] = None, temperature: Temperature = 1.0,
                            scale_loss_by_tau_squared: bool = False, kd_weight: float = 1.0,
                            ce_weight: float = 0.0, tp_group: Any = None, vocab_size: Optional[int] = None,
                            chunk_rows: Optional[int] = None, reduce_hidden_grad: bool = True) -> FusedLoss:
    """Output layer + objective + student CE over rows that are all valid tokens (module docstring).

    Args:
        student_hidden: ``[N, H_S]`` output-layer input (grad), identical on every TP rank.
        student_weight: ``[V_local, H_S]`` this rank's output-layer shard (grad; tied
            embeddings: the shared weight), same dtype as ``student_hidden``.
        teacher_hidden, teacher_weight: ``[N, H_T]``, ``[V_local, H_T]`` (no grad), or None
            when ``kd_weight == 0`` / ``objective is None``.
        labels: ``[N]`` global next-token ids in ``[0, vocab_size)``.
        objective: the distillation objective (``supports_fused_output_layer``), or None (CE only).
        keep: bool ``[N]`` rows the objective covers (None: all).
        temperature: float or fp32 ``[N_kept]`` (one per kept row, in row order).
        scale_loss_by_tau_squared: multiply each kept row's loss by ``tau**2``.
        kd_weight, ce_weight: the mix; the CE is always computed, its gradient only when ``ce_weight > 0``.
        tp_group, vocab_size: vocabulary sharding and the real vocabulary size (padding excluded).
        chunk_rows: rows per chunk (default :func:`default_chunk_rows`).
        reduce_hidden_grad: all-reduce the gradient of ``student_hidden`` over ``tp_group``
            (False when the caller's own input region does it, e.g. a sequence-parallel gather).

    Returns:
        :class:`FusedLoss`. No ``[N, V_local]`` tensor exists beyond one chunk.

    Raises:
        InputError: bad shapes or dtypes, a label outside the vocabulary, a bad chunk size.
    """
    kd = objective is not None and kd_weight > 0
    _check_layer("student", student_hidden, student_weight)
    n, v_local = student_hidden.shape[0], student_weight.shape[0]
    if kd:
        if teacher_hidden is None or teacher_weight is None:
            raise InputError("the fused loss needs the teacher's hidden states and output-layer weight when "
                             "kd_weight > 0")
        _check_layer("teacher", teacher_hidden, teacher_weight)
        if teacher_weight.shape[0] != v_local or teacher_hidden.shape[0] != n:
            raise InputError(f"teacher rows/vocabulary {teacher_hidden.shape[0]}/{teacher_weight.shape[0]} != "
                             f"student {n}/{v_local}: the models need the same rows and padded vocabulary")
    if labels.shape != (n,):
        raise InputError(f"labels have shape {tuple(labels.shape)}; expected [N] = [{n}]")
    real = vocab_size if vocab_size is not None else v_local * group_size(tp_group)
    local_real_width(v_local, tp_group, vocab_size)  # validates vocab_size
    if n and bool(((labels < 0) | (labels >= real)).any()):
        bad = labels[(labels < 0) | (labels >= real)][0].item()
        raise InputError(f"label {bad} is outside the vocabulary [0, {real}); mark ignored tokens with -100 "
                         "and drop them before the fused loss")
    if keep is not None and keep.shape != (n,):
        raise InputError(f"keep has shape {tuple(keep.shape)}; expected [N] = [{n}]")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise InputError(f"chunk_rows={chunk_rows!r} must be a positive integer")
    n_kept = n if keep is None else int(keep.sum())
    if kd and isinstance(temperature, torch.Tensor) and temperature.dim() > 0 and temperature.shape != (n_kept,):
        raise InputError(f"temperature has shape {tuple(temperature.shape)}; expected a float or [N_kept] = "
                         f"[{n_kept}] (one per kept row)")
    if kd and isinstance(temperature, torch.Tensor) and temperature.dim() == 0:
        temperature = float(temperature)
    grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
    plan = _Plan(objective if kd else None, None if keep is None else keep.to(student_hidden.device, torch.bool),
                 temperature.detach() if isinstance(temperature, torch.Tensor) else float(temperature),
                 bool(scale_loss_by_tau_squared), float(kd_weight), float(ce_weight), tp_group, vocab_size,
                 chunk_rows or default_chunk_rows(v_local), grad)
    h_s = replicated_input(student_hidden, tp_group) if reduce_hidden_grad else student_hidden
    h_t = teacher_hidden.detach() if kd else None
    w_t = teacher_weight.detach() if kd else None
    loss, kd_sum, ce_sum = _FusedOutputLayerLoss.apply(h_s, student_weight, h_t, w_t, labels, plan)
    return FusedLoss(loss, kd_sum, ce_sum, plan.nonfinite)
