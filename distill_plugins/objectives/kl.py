"""Forward and reverse KL over vocab-parallel logits, fused and chunked.

Math (per token; ``a = f_S / tau``, ``b = f_T / tau``, ``q = softmax(a)``,
``p = softmax(b)`` over the real vocabulary):

    forward_kl = KL(p || q) = sum_v p_v (log p_v - log q_v)
               = sum_v p_v (b_v - a_v) + lse(a) - lse(b)
    reverse_kl = KL(q || p) = sum_v q_v (a_v - b_v) + lse(b) - lse(a)

Gradients with respect to the student logits:

    d forward_kl / d f_S = (q - p) / tau
    d reverse_kl / d f_S = q * ((a - b) - E_q[a - b]) / tau

The weighted sum ``sum_v p_v (b_v - a_v)`` does not need the global
normalisers: each rank sums ``exp(b - m_local) (b - a)`` relative to its own
maximum and rescales after the MAX all-reduce. Hence one pass over the data and
two collectives per call: MAX of ``[N, 2]`` (plus NaN flags), SUM of ``[N, 3]``.
Backward recomputes ``q`` and ``p`` from the saved ``lse(a)``, ``lse(b)`` (and
``E_q[a - b]`` for reverse KL).

Conventions: a term whose weight is 0 contributes 0 (``0 * log 0 = 0``), so
``-inf`` logits are allowed where the weighting distribution has no mass;
``-inf`` where it has mass gives ``+inf``, the true divergence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from distill_plugins.interfaces import PartConfig
from distill_plugins.objectives.base import (
    ShardInfo,
    VocabParallelObjective,
    Workspace,
    check_flags,
    check_global_max,
    grad_coefficient,
    gradient_buffer,
    nan_flags,
    scaled_chunk,
    scaled_chunk_and_shift,
)
from distill_plugins.parallel import merge_partials

__all__ = ["ForwardKL", "ReverseKL", "vocab_parallel_kl"]

_NAMES = ("student_logits", "teacher_logits")


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product ``[r, w] x [r, w] -> [r]`` (on CPU a product and a sum beat ``bmm``)."""
    return (x * y).sum(dim=1)


class _KLFunction(torch.autograd.Function):
    """KL(p || q) (``reverse=False``) or KL(q || p) (``reverse=True``), per token."""

    @staticmethod
    def forward(ctx, student, teacher, inv_tau, info: ShardInfo, reverse: bool):
        n, w = info.n_rows, info.width
        f32 = dict(dtype=torch.float32, device=student.device)
        local_max = torch.full((n, 2), float("-inf"), **f32)
        # columns: Z_a (rel. max a), Z_b (rel. max b), S = sum e_w (x_w - x_o) (rel. max of the weighting side)
        partials = torch.zeros((n, 3), **f32)
        flags = torch.zeros((n, 2), **f32)
        guarded = torch.zeros(n, dtype=torch.bool, device=student.device)
        if w > 0:
            ws = Workspace(info, 4, student.device)
            for rows in info.chunks():
                a, ma, sa = scaled_chunk_and_shift(student, rows, w, inv_tau)
                b, mb, sb = scaled_chunk_and_shift(teacher, rows, w, inv_tau)
                ua = torch.sub(a, sa.unsqueeze(1), out=ws.get(0, rows))
                ub = torch.sub(b, sb.unsqueeze(1), out=ws.get(1, rows))
                ea = torch.exp(ua, out=ws.get(2, rows))
                eb = torch.exp(ub, out=ws.get(3, rows))
                za = ea.sum(dim=1)
                zb = eb.sum(dim=1)
                if reverse:  # sum e^{ua} (a - b) = sum e^{ua} (ua - ub) + Z_a (sa - sb)
                    s = torch.mul(ea, ua.sub_(ub), out=ws.get(1, rows)).sum(dim=1) + za * (sa - sb)
                else:  # sum e^{ub} (b - a) = sum e^{ub} (ub - ua) + Z_b (sb - sa)
                    s = torch.mul(eb, ub.sub_(ua), out=ws.get(0, rows)).sum(dim=1) + zb * (sb - sa)
                bad = torch.isnan(s)
                if bool(bad.any()):  # 0 * (-inf) from -inf logits: redo those rows with 0 * log 0 = 0
                    idx = bad.nonzero().flatten()
                    e, x, y = (ea, a, b) if reverse else (eb, b, a)
                    s[idx] = (e[idx] * (x[idx] - y[idx])).nansum(dim=1)
                    guarded[rows] |= bad
                local_max[rows, 0], local_max[rows, 1] = ma, mb
                partials[rows, 0], partials[rows, 1], partials[rows, 2] = za, zb, s
                flags[rows] = nan_flags(ma, mb)
        shift_of = (0, 1, 0 if reverse else 1)
        global_max, partials, gflags = merge_partials(local_max, partials, shift_of, info.group, flags)
        check_flags(gflags, _NAMES)
        check_global_max(global_max, _NAMES)
        lse_a = global_max[:, 0] + torch.log(partials[:, 0])
        lse_b = global_max[:, 1] + torch.log(partials[:, 1])
        if reverse:
            mean_gap = partials[:, 2] / partials[:, 0]  # E_q[a - b]
            loss = mean_gap + lse_b - lse_a
        else:
            mean_gap = partials[:, 2] / partials[:, 1]  # E_p[b - a]
            loss = mean_gap + lse_a - lse_b
        ctx.save_for_backward(student, teacher, inv_tau, lse_a, lse_b, mean_gap, guarded)
        ctx.info, ctx.reverse = info, reverse
        return loss.clamp_min(0.0)  # exact KL is >= 0; clamp fp32 rounding below 0

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        student, teacher, inv_tau, lse_a, lse_b, mean_gap, guarded = ctx.saved_tensors
        info = ctx.info
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad = gradient_buffer(student, info)
        coef = grad_coefficient(grad_loss, inv_tau)
        w = info.width
        if w > 0:
            ws = Workspace(info, 2, student.device)
            for rows in info.chunks():
                a = scaled_chunk(student, rows, w, inv_tau)
                b = scaled_chunk(teacher, rows, w, inv_tau)
                q = torch.sub(a, lse_a[rows].unsqueeze(1), out=ws.get(0, rows)).exp_()
                if ctx.reverse:  # q (a - b - E_q[a - b])
                    g = torch.sub(a, b, out=ws.get(1, rows)).sub_(mean_gap[rows].unsqueeze(1)).mul_(q)
                    if bool(guarded[rows].any()):
                        torch.nan_to_num_(g, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
                else:  # q - p
                    p = torch.sub(b, lse_b[rows].unsqueeze(1), out=ws.get(1, rows)).exp_()
                    g = q.sub_(p)
                grad[rows, :w] = g.mul_(coef[rows].unsqueeze(1))
        return grad, None, None, None, None


def vocab_parallel_kl(student: torch.Tensor, teacher: torch.Tensor, inv_tau: Optional[torch.Tensor],
                      info: ShardInfo, reverse: bool = False) -> torch.Tensor:
    """Per-token KL(p || q) (or KL(q || p) with ``reverse=True``) on checked inputs: ``[N]`` fp32."""
    return _KLFunction.apply(student, teacher, inv_tau, info, reverse)


class ForwardKL(VocabParallelObjective):
    """Forward KL, ``KL(p || q) = sum_v p_v log(p_v / q_v)``: teacher p, student q (mode covering).

    Temperature divides both logits (no tau**2 here; a temperature policy asks
    the loss glue for it). Gradient ``(q - p) / tau``. Tensor contract: see
    :class:`~distill_plugins.objectives.base.VocabParallelObjective`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        """forward_kl has no parameters."""

    def forward_kernel(self, student, teacher, inv_tau, info):
        return vocab_parallel_kl(student, teacher, inv_tau, info, reverse=False)


class ReverseKL(VocabParallelObjective):
    """Reverse KL, ``KL(q || p) = sum_v q_v log(q_v / p_v)``: student q, teacher p (mode seeking).

    Temperature divides both logits. Gradient ``q (a - b - E_q[a - b]) / tau``.
    Tensor contract: see :class:`~distill_plugins.objectives.base.VocabParallelObjective`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        """reverse_kl has no parameters."""

    def forward_kernel(self, student, teacher, inv_tau, info):
        return vocab_parallel_kl(student, teacher, inv_tau, info, reverse=True)
