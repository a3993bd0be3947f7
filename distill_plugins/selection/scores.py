"""Vocab-parallel per-token difficulty scores for token selectors and temperature policies.

Design
------
Every score is a per-token scalar computed from *detached* logits (scores steer
which tokens are trained and at what temperature; they never carry gradient).
Logits are ``[N, V_local]`` shards of the padded vocabulary over ``tp_group``
(``None`` = unsharded); columns at or past ``vocab_size`` are padding and are
excluded from every softmax and sum.

Only per-token scalars cross TP ranks, in three collectives whatever the
number of distributions involved (:func:`softmax_stats`, :func:`partial_sums`):

1. one MAX all-reduce of the packed ``[N, k]`` local maxima (a numerical shift),
2. one SUM all-reduce of the packed ``[N, k]`` local sums of exponentials
   (rescaled onto the global maxima), giving every distribution's log-normaliser,
3. one SUM all-reduce of the packed ``[N, j]`` local partial sums of the score.

The local work walks row chunks of at most :data:`CHUNK_ELEMENTS` logits, so
the fp32 temporaries stay small for large vocabularies. Padding columns form a
suffix of the padded vocabulary, so each shard's real columns are a prefix
(:func:`~distill_plugins.parallel.local_real_width`) and are sliced, not masked.

All-reduce gives every rank the same bits, and everything after it is
element-wise on replicated values, so each score is bitwise identical on every
TP rank. Maths is fp32 (inputs may be bf16/fp16).

Scores (p = softmax(teacher), q = softmax(student), r = softmax(reference)):

* ``hellinger``:       ``s = ||sqrt(p) - sqrt(q)||_2 / sqrt(2)`` in [0, 1] (AdaKD).
* ``forward_kl``:      ``KL(p || q) = sum_v p_v (log p_v - log q_v)``.
* ``reverse_kl``:      ``KL(q || p) = sum_v q_v (log q_v - log p_v)``.
* ``student_entropy``: ``H(q) = -sum_v q_v log q_v``.
* :func:`loss_gap`:    ``KL(p || q) - KL(p || r)`` (AdaSPEC; needs reference logits).

Usage::

    s = compute_score("hellinger", ctx)          # ctx: TokenContext
    s = hellinger(student, teacher, tp_group=g, vocab_size=50257)
"""

from __future__ import annotations

import typing
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from distill_plugins.errors import InputError
from distill_plugins.interfaces import TokenContext
from distill_plugins.parallel import all_reduce_max, all_reduce_sum_, finite_shift, local_real_width

#: names of the scores a selector or temperature policy can be configured with.
ScoreName = Literal["hellinger", "forward_kl", "reverse_kl", "student_entropy"]
SCORE_NAMES: tuple[str, ...] = typing.get_args(ScoreName)


#: rows of at most this many logits are processed at a time, bounding the fp32
#: temporaries (a few ``[rows, V_local]`` tensors) for large vocabularies. The
#: collectives run once for all rows, whatever the chunk size (TP ranks may chunk differently).
CHUNK_ELEMENTS = 1 << 24

#: ``chunk_fn(rows: slice) -> list of k fp32 [rows, width] tensors``: the softmax
#: arguments of k distributions on the real columns of this rank's shard.
ChunkFn = Callable[[slice], list]


def chunk_rows(n: int, width: int) -> list[slice]:
    """Row slices covering ``range(n)`` with at most :data:`CHUNK_ELEMENTS` elements each."""
    rows = max(1, CHUNK_ELEMENTS // max(1, width))
    return [slice(i, min(n, i + rows)) for i in range(0, n, rows)]


@torch.no_grad()
def softmax_stats(chunk_fn: ChunkFn, n: int, width: int, k: int, tp_group: Any = None,
                  device=None) -> torch.Tensor:
    """Log-normalisers ``log sum_v exp(x_v)`` of k distributions over the sharded vocabulary: ``[N, k]``.

    One local pass over row chunks gives each shard's maxima and shifted sums
    of exponentials; then one MAX all-reduce of the packed ``[N, k]`` maxima
    and one SUM all-reduce of the sums rescaled onto the global maxima.
    """
    if n == 0:  # every TP rank holds the same rows, so all skip the collectives together
        return torch.zeros((0, k), device=device)
    local_max = torch.full((n, k), float("-inf"), device=device)
    local_sum = torch.zeros((n, k), device=device)
    if width > 0:
        for sl in chunk_rows(n, width):
            for i, x in enumerate(chunk_fn(sl)):
                m = x.amax(dim=-1)
                local_max[sl, i] = m
                local_sum[sl, i] = torch.exp(x - finite_shift(m).unsqueeze(-1)).sum(dim=-1)
    global_max = all_reduce_max(local_max, tp_group)
    scale = torch.where(torch.isfinite(local_max), torch.exp(local_max - finite_shift(global_max)),
                        torch.zeros_like(local_max))
    total = all_reduce_sum_(local_sum * scale, tp_group)
    return finite_shift(global_max) + torch.log(total)


@torch.no_grad()
def partial_sums(chunk_fn: ChunkFn, lse: torch.Tensor, term_fn: Callable[[list], list], n: int, width: int,
                 j: int, tp_group: Any = None) -> torch.Tensor:
    """``[N, j]`` vocabulary sums of per-column terms, one SUM all-reduce for all of them.

    ``term_fn(log_probs)`` receives the k log-probability chunks ``x_i - lse_i``
    (``[rows, width]``) and returns j local per-row sums ``[rows]``.
    """
    out = torch.zeros((n, j), device=lse.device)
    if n == 0:
        return out
    if width > 0:
        for sl in chunk_rows(n, width):
            logps = [x - lse[sl, i : i + 1] for i, x in enumerate(chunk_fn(sl))]
            out[sl] = torch.stack(list(term_fn(logps)), dim=-1)
    return all_reduce_sum_(out, tp_group)


def real_columns(tensors: Sequence[torch.Tensor], width: int) -> ChunkFn:
    """A :data:`ChunkFn` giving the fp32 real columns of each tensor (views when already fp32)."""
    return lambda sl: [t[sl, :width].detach().float() for t in tensors]


def _check(tensors: Sequence[torch.Tensor], tp_group: Any, vocab_size: Optional[int]) -> tuple[int, int]:
    """``(N, real width of the local shard)``; raises InputError on mismatched shapes."""
    shape = tensors[0].shape
    if len(shape) != 2:
        raise InputError(f"logits must be [N, V_local], got shape {tuple(shape)}")
    for x in tensors[1:]:
        if x.shape != shape:
            raise InputError(f"logit shards differ in shape: {tuple(shape)} vs {tuple(x.shape)}")
    return shape[0], local_real_width(shape[1], tp_group, vocab_size)


@torch.no_grad()
def _score(tensors: Sequence[torch.Tensor], term_fn, j: int, tp_group: Any, vocab_size: Optional[int]):
    n, width = _check(tensors, tp_group, vocab_size)
    chunk_fn = real_columns(tensors, width)
    lse = softmax_stats(chunk_fn, n, width, len(tensors), tp_group, device=tensors[0].device)
    return partial_sums(chunk_fn, lse, term_fn, n, width, j, tp_group)


def _plogp_minus(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Local ``sum_v p_v (log p_v - log q_v)``; columns with ``log p_v = -inf`` add 0."""
    term = torch.exp(logp) * (logp - logq)
    return torch.where(torch.isfinite(logp), term, torch.zeros_like(term)).sum(dim=-1)


def hellinger(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, tp_group: Any = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Hellinger distance ``||sqrt(p) - sqrt(q)||_2 / sqrt(2)`` per token: ``[N, V_local] x2 -> [N]`` in [0, 1].

    Computed as a sum of squared differences of ``exp(log p / 2)`` (not as
    ``1 - sum sqrt(pq)``, which cancels catastrophically for close distributions).
    """
    def terms(logps):
        logq, logp = logps
        diff = torch.exp(0.5 * logp) - torch.exp(0.5 * logq)
        return [(diff * diff).sum(dim=-1)]

    total = _score([student_logits, teacher_logits], terms, 1, tp_group, vocab_size)[:, 0]
    return torch.sqrt(0.5 * total.clamp_min(0.0))


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, tp_group: Any = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """``KL(p_teacher || q_student)`` per token: ``[N]`` fp32, >= 0 up to rounding."""
    return _score([student_logits, teacher_logits], lambda lp: [_plogp_minus(lp[1], lp[0])], 1,
                  tp_group, vocab_size)[:, 0]


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, tp_group: Any = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """``KL(q_student || p_teacher)`` per token: ``[N]`` fp32."""
    return _score([student_logits, teacher_logits], lambda lp: [_plogp_minus(lp[0], lp[1])], 1,
                  tp_group, vocab_size)[:, 0]


def student_entropy(
    student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None, *, tp_group: Any = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Entropy ``H(q) = -sum_v q_v log q_v`` of the student per token: ``[N]`` fp32 (teacher unused)."""
    def terms(logps):
        (logq,) = logps
        term = torch.exp(logq) * logq
        return [-torch.where(torch.isfinite(logq), term, torch.zeros_like(term)).sum(dim=-1)]

    return _score([student_logits], terms, 1, tp_group, vocab_size)[:, 0]


def loss_gap(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, reference_logits: torch.Tensor, *,
    tp_group: Any = None, vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """AdaSPEC's gap ``KL(p || q_student) - KL(p || q_reference)`` per token: ``[N]`` fp32.

    Large when the student (draft) is still far from the teacher on a token the
    reference model fits well, i.e. a token the student can still learn.
    Three collectives for the three distributions and both KL sums.
    """
    def terms(logps):
        logq, logp, logr = logps
        return [_plogp_minus(logp, logq), _plogp_minus(logp, logr)]

    kls = _score([student_logits, teacher_logits, reference_logits], terms, 2, tp_group, vocab_size)
    return kls[:, 0] - kls[:, 1]


_SCORES = {
    "hellinger": hellinger,
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "student_entropy": student_entropy,
}


def compute_score(name: str, ctx: TokenContext) -> torch.Tensor:
    """Score ``name`` (one of :data:`SCORE_NAMES`) for the tokens of ``ctx``: detached fp32 ``[N]``.

    Raises:
        InputError: for an unknown score name.
    """
    try:
        fn = _SCORES[name]
    except KeyError:
        raise InputError(f"unknown score {name!r}; known scores: {', '.join(SCORE_NAMES)}") from None
    if ctx.token_stats is not None:  # the fused output layer computed it in its statistics pass
        return token_stat(ctx, name)
    return fn(ctx.student_logits, ctx.teacher_logits, tp_group=ctx.tp_group, vocab_size=ctx.vocab_size)


def token_stat(ctx: TokenContext, name: str) -> torch.Tensor:
    """``ctx.token_stats[name]`` (fused output layer), or an InputError naming the part's missing declaration."""
    if name not in ctx.token_stats:
        raise InputError(f"token statistic {name!r} was not computed by the fused output layer's statistics "
                         f"pass (computed: {sorted(ctx.token_stats)}); list it in the part's fused_token_stats()")
    return ctx.token_stats[name]
