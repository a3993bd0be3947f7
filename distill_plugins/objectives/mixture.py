"""Divergences that compare the normalised distributions elementwise: JSD(beta), TVD, skew KL, skew reverse KL.

Math (per token; ``a = f_S / tau``, ``b = f_T / tau``, ``q = softmax(a)`` the
student, ``p = softmax(b)`` the teacher, over the real vocabulary):

    jsd(beta)       = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                      (TRL GKD form; beta = 0 is KL(p || q) and beta = 1 is KL(q || p) exactly)
    tvd             = 1/2 sum_v |p_v - q_v|
    skew_kl(alpha)  = KL(p || alpha p + (1 - alpha) q)
    skew_reverse_kl(alpha) = KL(q || (1 - alpha) p + alpha q)

Each is ``D = sum_v phi(p_v, q_v)``. With ``g_v = d phi / d q_v`` the gradient
through the softmax is ``dD / d a = q (g - E_q[g])``, so the backward needs one
per-token scalar ``E_q[g]`` besides the normalisers:

    jsd:     g = (1 - beta) log(q / m) + const   ->  E_q[g] from sum q log(q / m)
    tvd:     g = 1/2 sign(q - p)
    skew_kl: g = -(1 - alpha) p / m
    skew_rkl: g = log(q / m') + 1 - alpha q / m'

The elementwise terms need the global normalisers first, so these take two
passes and three collectives: MAX ``[N, 2]`` + SUM ``[N, 2]`` (normalisers),
then SUM ``[N, 2]`` (the value and ``E_q[g]`` partials). Terms of the form
``0 * inf`` (a probability that underflows to 0) count as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from distill_plugins.interfaces import PartConfig
from distill_plugins.objectives.base import (
    ShardInfo,
    VocabParallelObjective,
    check_flags,
    check_global_max,
    grad_coefficient,
    scaled_chunk,
    scaled_chunk_and_shift,
)
from distill_plugins.objectives.kl import vocab_parallel_kl
from distill_plugins.parallel import all_reduce_sum_, merge_partials

__all__ = ["JSD", "TVD", "SkewKL", "SkewReverseKL", "vocab_parallel_normalizers"]

_NAMES = ("student_logits", "teacher_logits")


def vocab_parallel_normalizers(student: torch.Tensor, teacher: torch.Tensor, inv_tau: Optional[torch.Tensor],
                               info: ShardInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse(f_S / tau), lse(f_T / tau))``, each ``[N]`` fp32, in one pass and two collectives.

    Not differentiable (used inside autograd Functions). Raises
    :class:`~distill_plugins.errors.InputError` on NaN, +inf or all -inf rows.
    """
    n, w = info.n_rows, info.width
    f32 = dict(dtype=torch.float32, device=student.device)
    local_max = torch.full((n, 2), float("-inf"), **f32)
    partials = torch.zeros((n, 2), **f32)
    flags = torch.zeros((n, 2), **f32)
    if w > 0:
        for rows in info.chunks():
            for j, x in enumerate((student, teacher)):
                c, m, s = scaled_chunk_and_shift(x, rows, w, inv_tau)
                partials[rows, j] = torch.exp(c - s.unsqueeze(1)).sum(dim=1)
                local_max[rows, j] = m
                flags[rows, j] = torch.isnan(m).float()
    global_max, partials, gflags = merge_partials(local_max, partials, (0, 1), info.group, flags)
    check_flags(gflags, _NAMES)
    check_global_max(global_max, _NAMES)
    lse = global_max + torch.log(partials)
    return lse[:, 0].contiguous(), lse[:, 1].contiguous()


class _Terms:
    """Elementwise pieces of one divergence ``sum_v phi(p_v, q_v)``."""

    def partials(self, p, q, logp, logq) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(sum_v phi, sum_v q g)``-like partials (whatever :meth:`value` and :meth:`grad` need)."""
        raise NotImplementedError

    def value(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grad(self, p, q, logp, logq, s0, s1) -> torch.Tensor:
        """``dD/da`` for a chunk (``s0``, ``s1`` are the global partials as ``[r, 1]``)."""
        raise NotImplementedError


class _JSDTerms(_Terms):
    def __init__(self, beta: float):
        self.beta = beta

    def _logm(self, p, q):
        return torch.log(p * self.beta + q * (1.0 - self.beta))

    def partials(self, p, q, logp, logq):
        logm = self._logm(p, q)
        return (p * (logp - logm)).nansum(dim=1), (q * (logq - logm)).nansum(dim=1)

    def value(self, s0, s1):
        return self.beta * s0 + (1.0 - self.beta) * s1

    def grad(self, p, q, logp, logq, s0, s1):
        return (logq - self._logm(p, q) - s1).mul_(q).mul_(1.0 - self.beta)


class _TVDTerms(_Terms):
    def partials(self, p, q, logp, logq):
        diff = q - p
        return diff.abs().sum(dim=1), (q * torch.sign(diff)).sum(dim=1)

    def value(self, s0, s1):
        return 0.5 * s0

    def grad(self, p, q, logp, logq, s0, s1):
        return (torch.sign(q - p) - s1).mul_(q).mul_(0.5)


class _SkewKLTerms(_Terms):
    def __init__(self, alpha: float):
        self.alpha = alpha

    def partials(self, p, q, logp, logq):
        m = p * self.alpha + q * (1.0 - self.alpha)
        return (p * (logp - torch.log(m))).nansum(dim=1), (q * p / m).nansum(dim=1)

    def value(self, s0, s1):
        return s0

    def grad(self, p, q, logp, logq, s0, s1):
        m = p * self.alpha + q * (1.0 - self.alpha)
        return (p / m - s1).mul_(q).mul_(-(1.0 - self.alpha))


class _SkewReverseKLTerms(_Terms):
    def __init__(self, alpha: float):
        self.alpha = alpha

    def partials(self, p, q, logp, logq):
        m = p * (1.0 - self.alpha) + q * self.alpha
        return (q * (logq - torch.log(m))).nansum(dim=1), (q * q / m).nansum(dim=1)

    def value(self, s0, s1):
        return s0

    def grad(self, p, q, logp, logq, s0, s1):
        m = p * (1.0 - self.alpha) + q * self.alpha
        ratio = q / m
        return (logq - torch.log(m) - s0 - self.alpha * (ratio - s1)).mul_(q)


class _MixtureFunction(torch.autograd.Function):
    """Per-token ``sum_v phi(p_v, q_v)`` with a recomputed elementwise backward."""

    @staticmethod
    def forward(ctx, student, teacher, inv_tau, info: ShardInfo, terms: _Terms):
        lse_a, lse_b = vocab_parallel_normalizers(student, teacher, inv_tau, info)
        sums = torch.zeros((info.n_rows, 2), dtype=torch.float32, device=student.device)
        w = info.width
        if w > 0:
            for rows in info.chunks():
                logq = scaled_chunk(student, rows, w, inv_tau) - lse_a[rows].unsqueeze(1)
                logp = scaled_chunk(teacher, rows, w, inv_tau) - lse_b[rows].unsqueeze(1)
                s0, s1 = terms.partials(torch.exp(logp), torch.exp(logq), logp, logq)
                sums[rows, 0], sums[rows, 1] = s0, s1
        all_reduce_sum_(sums, info.group)
        ctx.save_for_backward(student, teacher, inv_tau, lse_a, lse_b, sums)
        ctx.info, ctx.terms = info, terms
        return terms.value(sums[:, 0], sums[:, 1]).clamp_min(0.0)  # every member is >= 0 exactly

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        student, teacher, inv_tau, lse_a, lse_b, sums = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        info, terms = ctx.info, ctx.terms
        grad = torch.zeros_like(student)
        coef = grad_coefficient(grad_loss, inv_tau)
        w = info.width
        if w > 0:
            for rows in info.chunks():
                logq = scaled_chunk(student, rows, w, inv_tau) - lse_a[rows].unsqueeze(1)
                logp = scaled_chunk(teacher, rows, w, inv_tau) - lse_b[rows].unsqueeze(1)
                g = terms.grad(torch.exp(logp), torch.exp(logq), logp, logq,
                               sums[rows, 0].unsqueeze(1), sums[rows, 1].unsqueeze(1))
                torch.nan_to_num_(g, nan=0.0, posinf=float("inf"), neginf=float("-inf"))  # 0 * inf -> 0
                grad[rows, :w] = g.mul_(coef[rows].unsqueeze(1))
        return grad, None, None, None, None


def _check_unit_interval(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name}={value!r} is outside [0, 1]")


class JSD(VocabParallelObjective):
    """Generalized Jensen-Shannon divergence (TRL GKD form).

    ``JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``.
    As in TRL's ``generalized_jsd_loss``, ``beta = 0`` computes ``KL(p || q)`` (forward)
    and ``beta = 1`` computes ``KL(q || p)`` (reverse) exactly; note that the mixture
    formula itself tends to 0 at both ends, so the endpoints are a deliberate switch.
    Temperature divides both logits. Tensor contract: see
    :class:`~distill_plugins.objectives.base.VocabParallelObjective`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        beta: float = field(default=0.5, metadata={"help": "weight of the teacher in the mixture m = beta p + "
                                                           "(1 - beta) q; 0 -> KL(p||q), 1 -> KL(q||p)"})

        def __post_init__(self):
            _check_unit_interval("beta", self.beta)

    def forward_kernel(self, student, teacher, inv_tau, info):
        beta = float(self.config.beta)
        if beta == 0.0:
            return vocab_parallel_kl(student, teacher, inv_tau, info, reverse=False)
        if beta == 1.0:
            return vocab_parallel_kl(student, teacher, inv_tau, info, reverse=True)
        return _MixtureFunction.apply(student, teacher, inv_tau, info, _JSDTerms(beta))


class TVD(VocabParallelObjective):
    """Total variation distance ``1/2 sum_v |p_v - q_v|`` (in [0, 1]).

    Temperature divides both logits. Tensor contract: see
    :class:`~distill_plugins.objectives.base.VocabParallelObjective`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        """tvd has no parameters."""

    def forward_kernel(self, student, teacher, inv_tau, info):
        return _MixtureFunction.apply(student, teacher, inv_tau, info, _TVDTerms())


class SkewKL(VocabParallelObjective):
    """Skew (forward) KL, ``KL(p || alpha p + (1 - alpha) q)`` (DistiLLM).

    The gradient flows through ``q`` inside the mixture. ``alpha = 0`` is forward KL;
    ``alpha = 1`` is identically 0. Temperature divides both logits. Tensor
    contract: see :class:`~distill_plugins.objectives.base.VocabParallelObjective`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        alpha: float = field(default=0.1, metadata={"help": "teacher weight in the mixture "
                                                            "alpha p + (1 - alpha) q"})

        def __post_init__(self):
            _check_unit_interval("alpha", self.alpha)

    def forward_kernel(self, student, teacher, inv_tau, info):
        if float(self.config.alpha) == 0.0:
            return vocab_parallel_kl(student, teacher, inv_tau, info, reverse=False)
        return _MixtureFunction.apply(student, teacher, inv_tau, info, _SkewKLTerms(float(self.config.alpha)))


class SkewReverseKL(VocabParallelObjective):
    """Skew reverse KL, ``KL(q || (1 - alpha) p + alpha q)`` (DistiLLM).

    The gradient flows through both ``q`` terms (DistiLLM's form, not DistiLLM-2's
    detached mixture). ``alpha = 0`` is reverse KL; ``alpha = 1`` is identically 0.
    Temperature divides both logits. Tensor contract: see
    :class:`~distill_plugins.objectives.base.VocabParallelObjective`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        alpha: float = field(default=0.1, metadata={"help": "student weight in the mixture "
                                                            "(1 - alpha) p + alpha q"})

        def __post_init__(self):
            _check_unit_interval("alpha", self.alpha)

    def forward_kernel(self, student, teacher, inv_tau, info):
        if float(self.config.alpha) == 0.0:
            return vocab_parallel_kl(student, teacher, inv_tau, info, reverse=True)
        return _MixtureFunction.apply(student, teacher, inv_tau, info,
                                      _SkewReverseKLTerms(float(self.config.alpha)))
