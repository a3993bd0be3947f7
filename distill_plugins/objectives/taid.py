"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025), vocab-parallel.

Design
------
The target is a logit-space interpolation between the (detached) student and
the teacher, moved from the student toward the teacher over training:

    p_t = softmax(((1 - t) * sg[f_S] + t * f_T) / tau),   q = softmax(f_S / tau)
    loss_i = KL(p_t || q) = sum_v p_t,v (log p_t,v - log q_v)        (loss_form: kl, default)
           or CE(p_t, q) = -sum_v p_t,v log q_v = KL + H(p_t)          (loss_form: ce, the reference code)

Both forms have the same gradient, ``d loss_i / d f_S = (q - p_t) / tau``; the
stop-gradient keeps ``f_S`` out of the target. TAID itself uses no temperature
(tau = 1); a temperature policy's tau (float or ``[N]``) scales both logits.

The value matters only for TAID's own t-update, which reads the step's loss.
``kl`` (default) is >= 0 and 0 when the student matches the target; ``ce``
reproduces the reference code's loss value (and so its t trajectory), whose
relative changes are damped and confounded by the moving entropy ``H(p_t)``.

t-update, once per optimizer step from the DP-all-reduced loss ``L`` (the
reference updates on every forward call, per rank; here every rank agrees bit
for bit and gradient accumulation does not multiply the updates):

    first step:  prev = L; no update
    delta = (prev - L) / (prev + 1e-15)                 relative loss drop
    m     = beta * m + (1 - beta) * delta               momentum, m_0 = 0
    t_lin = t_start + (t_end - t_start) * step / total_steps
    t     = min(t_end, max(t_lin, t + alpha * sigmoid(m) * (1 - t)))
    prev  = L

With ``adaptive: false``, ``t = t_lin``. A non-finite loss leaves the adaptive
state unchanged. State (fp64 Python floats): ``t``, ``momentum``, ``prev_loss``, ``step``.

Tensor contract: ``student [N, V_local]``, ``teacher [N, V_local]`` (any float
dtype; fp32 maths), vocab sharded over ``tp_group``, padding columns past
``vocab_size`` excluded; returns fp32 ``[N]`` per-token losses identical on
every TP rank, differentiable in ``student`` only. Collectives: one MAX
all-reduce of ``[N, 4]`` (both row maxima and two NaN flags) for the input
checks, one MAX and one SUM all-reduce of packed ``[N, 2]`` statistics for both
normalisers, one SUM for the per-token sums. The backward recomputes ``q`` and ``p_t`` from the inputs
and the two saved per-token log-normalisers, so no ``[N, V]`` tensor is kept for
backward and no collective runs in backward. Rows are processed in chunks of
``distill_plugins.selection.scores.CHUNK_ELEMENTS`` logits to bound the fp32
temporaries.

Non-finite inputs follow the contract of every objective here
(docs/objectives.md, "The call contract"): NaN or ``+inf`` in a real column of
either tensor, or a row whose real columns are all ``-inf``, raises
:class:`~distill_plugins.errors.InputError` naming the tensor and the row, on
every TP rank together (the flags ride in the MAX all-reduce). ``-inf`` in some
columns is a zero probability: with ``0 < t < 1`` the target ``p_t`` is 0 wherever
either side is ``-inf``, so the loss stays finite; at ``t = 1`` (plain forward KL)
a column the student masks and the teacher does not gives ``+inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from distill_plugins.errors import InputError
from distill_plugins.interfaces import Objective, PartConfig, StepStats, Temperature
from distill_plugins.objectives.base import check_flags, check_global_max, check_pair, nan_flags, row_max
from distill_plugins.parallel import all_reduce_max_packed, local_real_width
from distill_plugins.selection.scores import chunk_rows, partial_sums, softmax_stats

__all__ = ["TAID", "interpolated_kl"]


def _target_chunks(student: torch.Tensor, teacher: torch.Tensor, t: float, tau: Any, width: int):
    """A ChunkFn giving fp32 ``[f_S / tau, ((1 - t) f_S + t f_T) / tau]`` on the real columns of a row chunk."""

    def chunk_fn(sl: slice) -> list[torch.Tensor]:
        xs = student[sl, :width].detach().float()
        xt = teacher[sl, :width].detach().float()
        # t = 0 and t = 1 are exact (and avoid 0 * -inf = NaN for -inf logits).
        z = xs if t == 0.0 else xt if t == 1.0 else (1.0 - t) * xs + t * xt
        tau_c = tau[sl] if isinstance(tau, torch.Tensor) else tau
        return [xs / tau_c, z / tau_c]

    return chunk_fn


class _InterpolatedKL(torch.autograd.Function):
    """Per-token ``KL(p_t || q)`` (or CE) with an elementwise, communication-free backward.

    Forward: :func:`softmax_stats` (MAX + SUM all-reduce) for both normalisers,
    :func:`partial_sums` (SUM all-reduce) for the per-token sums, row-chunked.
    Saves the inputs and the ``[N, 2]`` log-normalisers only.
    """

    @staticmethod
    def forward(ctx, student, teacher, t, tau, group, vocab_size, form):
        n, v_local = student.shape
        width = local_real_width(v_local, group, vocab_size)
        chunk_fn = _target_chunks(student, teacher, t, tau, width)
        lse = softmax_stats(chunk_fn, n, width, 2, group, device=student.device)  # [N, 2]: q, p_t

        def terms(logps):
            logq, logp = logps
            p = torch.exp(logp)
            term = p * (logp - logq) if form == "kl" else -p * logq
            return [torch.where(torch.isfinite(logp), term, torch.zeros_like(term)).sum(dim=-1)]

        loss = partial_sums(chunk_fn, lse, terms, n, width, 1, group)[:, 0]
        ctx.save_for_backward(student, teacher, lse)
        ctx.t, ctx.tau, ctx.width = t, tau, width
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        student, teacher, lse = ctx.saved_tensors
        n, width = student.shape[0], ctx.width
        grad = torch.zeros_like(student)  # padding columns stay exactly 0
        chunk_fn = _target_chunks(student, teacher, ctx.t, ctx.tau, width)
        for sl in chunk_rows(n, width) if width > 0 else []:
            xs, z = chunk_fn(sl)
            q = torch.exp(xs - lse[sl, 0:1])
            p = torch.exp(z - lse[sl, 1:2])
            tau_c = ctx.tau[sl] if isinstance(ctx.tau, torch.Tensor) else ctx.tau
            grad[sl, :width] = ((q - p) * (grad_loss[sl].float().unsqueeze(-1) / tau_c)).to(student.dtype)
        return grad, None, None, None, None, None, None


_NAMES = ("student_logits", "teacher_logits")


def _check_finite_inputs(student: torch.Tensor, teacher: torch.Tensor, group: Any, width: int) -> None:
    """Raise on NaN, +inf or an all-``-inf`` row in the real columns, on every TP rank together.

    Raises:
        InputError: naming the tensor and the first offending row (the messages of the other objectives).
    """
    with torch.no_grad():
        ms, mt = row_max(student[:, :width].detach()).float(), row_max(teacher[:, :width].detach()).float()
        global_max, flags = all_reduce_max_packed(torch.stack([ms, mt], dim=1), group, nan_flags(ms, mt))
    check_flags(flags, _NAMES)
    check_global_max(global_max, _NAMES)


def _as_tau(temperature: Temperature, n: int, device) -> Any:
    """Validate a float or ``[N]`` temperature; tensors become detached fp32 ``[N, 1]``."""
    if isinstance(temperature, torch.Tensor):
        tau = temperature.detach().float().to(device)
        if tau.dim() == 0:
            tau = tau.reshape(1).expand(n)
        if tau.shape != (n,):
            raise InputError(f"temperature tensor has shape {tuple(tau.shape)}, expected [{n}] (one per token)")
        if n and not bool((tau > 0).all() and torch.isfinite(tau).all()):
            raise InputError("temperature tensor has entries that are not finite and > 0")
        return tau.unsqueeze(-1)
    tau = float(temperature)
    if not (tau > 0.0 and math.isfinite(tau)):
        raise InputError(f"temperature={temperature!r} must be finite and > 0")
    return tau


def interpolated_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float, *, temperature: Temperature = 1.0,
    tp_group: Any = None, vocab_size: Optional[int] = None, loss_form: str = "kl",
) -> torch.Tensor:
    """Per-token ``KL(p_t || q)`` (``loss_form="kl"``) or ``CE(p_t, q)`` (``"ce"``): fp32 ``[N]``.

    ``p_t = softmax(((1 - t) sg[f_S] + t f_T) / tau)``, ``q = softmax(f_S / tau)``.
    Gradient flows to ``student_logits`` only.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise InputError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must both be [N, V_local]")
    if loss_form not in ("kl", "ce"):
        raise InputError(f"loss_form={loss_form!r} must be 'kl' or 'ce'")
    info = check_pair(student_logits, teacher_logits, tp_group, vocab_size)
    tau = _as_tau(temperature, student_logits.shape[0], student_logits.device)
    if info.n_rows:
        _check_finite_inputs(student_logits, teacher_logits, tp_group, info.width)
    return _InterpolatedKL.apply(student_logits, teacher_logits, float(t), tau, tp_group, vocab_size, loss_form)


def _sigmoid(x: float) -> float:
    """Overflow-free logistic function on a Python float."""
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class TAID(Objective):
    """TAID objective with its interpolation parameter ``t`` as state (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        t_start: float = field(default=0.4, metadata={"help": "initial interpolation t (0 = student, 1 = teacher)"})
        t_end: float = field(default=1.0, metadata={"help": "final and maximal t, t_start <= t_end <= 1"})
        alpha: float = field(default=5e-4, metadata={"help": "adaptive step size of t, >= 0"})
        beta: float = field(default=0.99, metadata={"help": "momentum of the relative loss drop, in [0, 1)"})
        adaptive: bool = field(default=True, metadata={
            "help": "adapt t from the loss (true) or follow the linear schedule t_start -> t_end (false)"})
        loss_form: Literal["kl", "ce"] = field(default="kl", metadata={
            "help": "returned value: kl = KL(p_t||q) (>= 0), ce = -sum p_t log q (reference code's value)"})

        def __post_init__(self):
            if not (0.0 <= self.t_start <= 1.0):
                raise ValueError(f"t_start={self.t_start!r} must be in [0, 1]")
            if not (0.0 <= self.t_end <= 1.0):
                raise ValueError(f"t_end={self.t_end!r} must be in [0, 1]")
            if self.t_end < self.t_start:
                raise ValueError(f"t_end={self.t_end!r} must be >= t_start={self.t_start!r}")
            if not (self.alpha >= 0.0 and math.isfinite(self.alpha)):
                raise ValueError(f"alpha={self.alpha!r} must be a finite number >= 0")
            if not (0.0 <= self.beta < 1.0):
                raise ValueError(f"beta={self.beta!r} must be in [0, 1)")

    _STATE_KEYS = ("t", "momentum", "prev_loss", "step")

    #: rows are independent and t changes only in on_optimizer_step: runs on the fused output layer.
    supports_fused_output_layer = True

    def __init__(self, config: Optional[PartConfig] = None):
        super().__init__(config)
        self.t: float = float(self.config.t_start)
        self.momentum: float = 0.0
        self.prev_loss: Optional[float] = None
        self.step: int = 0

    def __call__(self, student_logits, teacher_logits, *, temperature: Temperature = 1.0,
                 tp_group: Any = None, vocab_size: Optional[int] = None) -> torch.Tensor:
        return interpolated_kl(student_logits, teacher_logits, self.t, temperature=temperature,
                               tp_group=tp_group, vocab_size=vocab_size, loss_form=self.config.loss_form)

    def linear_t(self, step: int, total_steps: int) -> float:
        """The floor schedule ``t_start + (t_end - t_start) * min(1, step / total_steps)``."""
        cfg = self.config
        return cfg.t_start + (cfg.t_end - cfg.t_start) * min(1.0, step / max(1, total_steps))

    def on_optimizer_step(self, stats: StepStats) -> None:
        cfg = self.config
        self.step = int(stats.step)
        t_lin = self.linear_t(stats.step, stats.total_steps)
        if not cfg.adaptive:
            self.t = min(cfg.t_end, t_lin)
            return
        loss = float(stats.kd_loss)
        if not math.isfinite(loss):
            return
        if self.prev_loss is None:
            self.prev_loss = loss
            return
        delta = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = cfg.beta * self.momentum + (1.0 - cfg.beta) * delta
        step_t = cfg.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
        self.t = min(cfg.t_end, max(t_lin, self.t + step_t))
        self.prev_loss = loss

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in self._STATE_KEYS if k not in state]
        extra = sorted(set(state) - set(self._STATE_KEYS))
        if missing or extra:
            raise ValueError(f"TAID state: missing keys {missing}, unexpected keys {extra}")
        self.t = float(state["t"])
        self.momentum = float(state["momentum"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        self.step = int(state["step"])
