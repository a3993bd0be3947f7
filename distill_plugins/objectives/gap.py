"""Weighted moments of the logit gap ``d = f_S - f_T``: the kernel behind CSD and logit MSE.

Design
------
For weights ``w`` in {U, S, T} (uniform over the real vocabulary, detached
student softmax, detached teacher softmax) the kernel computes, per token, the
weighted moments ``E_w[d - c]`` and ``E_w[(d - c)^2]`` about a per-token centre
``c`` in one pass over the shard and two collectives:

* each rank takes its moments about a local centre ``c_r`` (the difference of
  its local maxima, a good guess for where the gap lives), relative to its
  local softmax maxima;
* after the MAX all-reduce every rank knows the global maxima and the global
  centre ``c = max(a) - max(b)``; it rescales its partial sums and moves them to
  ``c`` exactly (``A' = A + delta Z``, ``B' = B + 2 delta A + delta^2 Z``,
  ``delta = c_r - c``);
* one SUM all-reduce of ``[N, 3 x (number of distinct weights)]``.

Centring matters for CSD: its value ``1/2 (E1[d^2] + E2[d^2]) - E1[d] E2[d]`` is
a variance-like difference that cancels catastrophically in fp32 when ``d``
carries a large per-token offset (student = teacher + 1000). Logit MSE is not
shift invariant and uses ``c = 0``.

Columns where student and teacher are both ``-inf`` (a vocabulary entry masked
on both sides) have ``d = 0`` and contribute nothing beyond their uniform count.
"""

from __future__ import annotations

from typing import Optional

import torch

from distill_plugins.objectives.base import (
    ShardInfo,
    Workspace,
    check_flags,
    check_global_max,
    grad_coefficient,
    gradient_buffer,
    nan_flags,
    scaled_chunk,
    scaled_chunk_and_shift,
)
from distill_plugins.parallel import all_reduce_max_packed, all_reduce_sum_, finite_shift, rescale_partials_

__all__ = ["GapSpec", "weighted_gap_moments"]

_NAMES = ("student_logits", "teacher_logits")


class GapSpec:
    """What the kernel computes.

    Args:
        w1, w2: weight kinds in {"U", "S", "T"}; for logit MSE pass the same kind twice.
        s_temperature: temperature of the S weights, ``softmax(a / s_temperature)``.
        t_temperature: temperature of the T weights, ``softmax(b / t_temperature)``.
        center: take moments about ``c = max(a) - max(b)`` (True, CSD) or about 0 (False, MSE).
        kind: "csd" (value ``1/2 (E1[d^2] + E2[d^2]) - E1[d] E2[d]``) or "mse" (``1/2 E1[d^2]``).
    """

    def __init__(self, w1: str, w2: str, *, s_temperature: float = 1.0, t_temperature: float = 1.0,
                 center: bool = True, kind: str = "csd"):
        self.w1, self.w2 = w1, w2
        self.kinds = tuple(dict.fromkeys((w1, w2)))  # distinct kinds, in order
        self.s_temperature, self.t_temperature = float(s_temperature), float(t_temperature)
        self.center, self.kind = center, kind


def _weights_exp(x: torch.Tensor, shift: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """``exp(x / temperature - shift)`` for a chunk, into ``out`` (``shift`` is per row, already divided)."""
    if temperature == 1.0:
        return torch.sub(x, shift.unsqueeze(1), out=out).exp_()
    return torch.mul(x, 1.0 / temperature, out=out).sub_(shift.unsqueeze(1)).exp_()


class _GapFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, inv_tau, info: ShardInfo, spec: GapSpec):
        n, w = info.n_rows, info.width
        f32 = dict(dtype=torch.float32, device=student.device)
        kinds = spec.kinds
        # max columns: 0 max a, 1 max b, 2 max a / tS, 3 max b / tT
        local_max = torch.full((n, 4), float("-inf"), **f32)
        partials = torch.zeros((n, 3 * len(kinds)), **f32)  # per kind: Z, A = sum e (d - c_r), B = sum e (d - c_r)^2
        flags = torch.zeros((n, 2), **f32)
        guarded = torch.zeros(n, dtype=torch.bool, device=student.device)
        c_local = torch.zeros(n, **f32)
        if w > 0:
            ws = Workspace(info, 3, student.device)
            for rows in info.chunks():
                a, ma, sa = scaled_chunk_and_shift(student, rows, w, inv_tau)
                b, mb, sb = scaled_chunk_and_shift(teacher, rows, w, inv_tau)
                ms, mt = ma / spec.s_temperature, mb / spec.t_temperature
                if spec.center:  # d - c_r with c_r = sa - sb: (a - sa) - (b - sb)
                    c_r = sa - sb
                    c_local[rows] = c_r
                    dc = torch.sub(a, b, out=ws.get(0, rows)).sub_(c_r.unsqueeze(1))
                else:
                    dc = torch.sub(a, b, out=ws.get(0, rows))
                cols = []
                for k in kinds:
                    if k == "U":
                        sq = torch.mul(dc, dc, out=ws.get(1, rows))
                        cols += [torch.full_like(ma, float(w)), dc.sum(dim=1), sq.sum(dim=1)]
                        continue
                    if k == "S":
                        e = _weights_exp(a, finite_shift(ms), spec.s_temperature, ws.get(1, rows))
                    else:
                        e = _weights_exp(b, finite_shift(mt), spec.t_temperature, ws.get(1, rows))
                    z = e.sum(dim=1)
                    ed = e.mul_(dc)
                    cols += [z, ed.sum(dim=1), torch.mul(ed, dc, out=ws.get(2, rows)).sum(dim=1)]
                block = torch.stack(cols, dim=1)
                bad = torch.isnan(block).any(dim=1)
                if bool(bad.any()):  # -inf logits: both -inf -> d = 0; 0 * inf -> 0
                    block[bad] = _guarded_moments(a[bad], b[bad], spec, ms[bad], mt[bad],
                                                  c_local[rows][bad] if spec.center else None, w)
                    guarded[rows] |= bad
                partials[rows] = block
                local_max[rows] = torch.stack([ma, mb, ms, mt], dim=1)
                flags[rows] = nan_flags(ma, mb)
        global_max, gflags = all_reduce_max_packed(local_max, info.group, flags)
        check_flags(gflags, _NAMES)
        check_global_max(global_max[:, :2], _NAMES)
        shift_of = []
        for k in kinds:
            s = None if k == "U" else (2 if k == "S" else 3)
            shift_of += [s, s, s]
        rescale_partials_(partials, local_max, global_max, shift_of)
        if spec.center:
            c = global_max[:, 0] - global_max[:, 1]
            delta = c_local - c
            for j in range(len(kinds)):
                z, a_, b_ = partials[:, 3 * j], partials[:, 3 * j + 1], partials[:, 3 * j + 2]
                b_new = b_ + delta * (2.0 * a_ + delta * z)
                a_new = a_ + delta * z
                partials[:, 3 * j + 1], partials[:, 3 * j + 2] = a_new, b_new
        else:
            c = torch.zeros(n, **f32)
        all_reduce_sum_(partials, info.group)
        means = {}  # kind -> (E[d - c], E[(d - c)^2], log normaliser or None)
        for j, k in enumerate(kinds):
            z = partials[:, 3 * j]
            if k == "U":
                z = torch.full_like(z, float(info.vocab_size))
                log_norm = None
            else:
                log_norm = global_max[:, 2 if k == "S" else 3] + torch.log(z)
            means[k] = (partials[:, 3 * j + 1] / z, partials[:, 3 * j + 2] / z, log_norm)
        m1, q1, _ = means[spec.w1]
        m2, q2, _ = means[spec.w2]
        if spec.kind == "csd":
            loss = (0.5 * (q1 + q2) - m1 * m2).clamp_min(0.0)  # a weighted variance-like form: >= 0 exactly
        else:
            loss = 0.5 * q1
        zeros = torch.zeros(n, **f32)
        lse_s = means["S"][2] if "S" in means else zeros
        lse_t = means["T"][2] if "T" in means else zeros
        ctx.save_for_backward(student, teacher, inv_tau, c, m1, m2, lse_s, lse_t, guarded)
        ctx.info, ctx.spec = info, spec
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        student, teacher, inv_tau, c, m1, m2, lse_s, lse_t, guarded = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        info, spec = ctx.info, ctx.spec
        grad = gradient_buffer(student, info)
        coef = grad_coefficient(grad_loss, inv_tau)
        w = info.width
        inv_v = 1.0 / float(info.vocab_size)
        if w > 0:
            ws = Workspace(info, 3, student.device)
            for rows in info.chunks():
                a = scaled_chunk(student, rows, w, inv_tau)
                b = scaled_chunk(teacher, rows, w, inv_tau)
                k_coef = coef[rows].unsqueeze(1)
                d = torch.sub(a, b, out=ws.get(0, rows))
                guard = bool(guarded[rows].any())
                if guard:
                    torch.nan_to_num_(d, nan=0.0, posinf=float("inf"), neginf=float("-inf"))

                def weight(kind, buf):
                    if kind == "S":
                        return _weights_exp(a, lse_s[rows], spec.s_temperature, ws.get(buf, rows))
                    return _weights_exp(b, lse_t[rows], spec.t_temperature, ws.get(buf, rows))

                if spec.kind == "mse":  # coef w d
                    g = d.mul_(k_coef * inv_v) if spec.w1 == "U" else d.mul_(k_coef).mul_(weight(spec.w1, 1))
                elif spec.w1 == spec.w2:  # coef w (2 (d - c) - m1 - m2)
                    shift = (2.0 * c[rows] + m1[rows] + m2[rows]).unsqueeze(1)
                    g = d.sub_(0.5 * shift).mul_(2.0 * k_coef)
                    g = g.mul_(inv_v) if spec.w1 == "U" else g.mul_(weight(spec.w1, 1))
                else:  # coef (w2 (d - c - m1) + w1 (d - c - m2))
                    t2 = torch.sub(d, (c[rows] + m1[rows]).unsqueeze(1), out=ws.get(1, rows))
                    t2 = t2.mul_(inv_v) if spec.w2 == "U" else t2.mul_(weight(spec.w2, 2))
                    g = d.sub_((c[rows] + m2[rows]).unsqueeze(1))
                    g = g.mul_(inv_v) if spec.w1 == "U" else g.mul_(weight(spec.w1, 2))
                    g = g.add_(t2).mul_(k_coef)
                if guard:
                    torch.nan_to_num_(g, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
                grad[rows, :w] = g
        return grad, None, None, None, None


def _guarded_moments(a, b, spec: GapSpec, ms, mt, c_r: Optional[torch.Tensor], w: int) -> torch.Tensor:
    """The forward partials for rows with -inf logits, with ``0 * inf = 0`` and ``d = 0`` where both are -inf."""
    d = torch.nan_to_num(a - b, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    if c_r is not None:
        d = d - c_r.unsqueeze(1)
    cols = []
    for k in spec.kinds:
        if k == "U":
            cols += [torch.full_like(ms, float(w)), d.sum(dim=1), (d * d).sum(dim=1)]
            continue
        e = _weights_exp(a, finite_shift(ms), spec.s_temperature, torch.empty_like(d)) if k == "S" else \
            _weights_exp(b, finite_shift(mt), spec.t_temperature, torch.empty_like(d))
        ed = e * d
        cols += [e.sum(dim=1), ed.nansum(dim=1), (ed * d).nansum(dim=1)]
    return torch.stack(cols, dim=1)


def weighted_gap_moments(student: torch.Tensor, teacher: torch.Tensor, inv_tau: Optional[torch.Tensor],
                         info: ShardInfo, spec: GapSpec) -> torch.Tensor:
    """Per-token CSD or logit-MSE value on checked inputs (``[N]`` fp32, differentiable in ``student``)."""
    return _GapFunction.apply(student, teacher, inv_tau, info, spec)
