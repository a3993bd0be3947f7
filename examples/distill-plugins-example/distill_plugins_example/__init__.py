"""Example distill_plugins plugin: a squared-Hellinger objective and a teacher-confidence selector.

Installed with ``pip install examples/distill-plugins-example``, it is found
through the ``distill_plugins`` entry-point group and its parts appear in
``distill plugins list`` under the distribution ``distill-plugins-example``.
docs/writing_plugins.md walks through this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distill_plugins import Objective, PartConfig, Selection, TokenContext, TokenSelector, hookimpl
from distill_plugins.parallel import all_reduce_max, all_reduce_sum, vocab_parallel_log_softmax


class SquaredHellinger(Objective):
    """H^2(p, q) = 1 - sum_v sqrt(p_v q_v), per token; p teacher, q student, both at temperature tau.

    Shapes: logits ``[N, V_local]`` sharded over ``tp_group``; returns fp32 ``[N]``.
    One SUM all-reduce of a per-token scalar (plus those inside the log-softmaxes).
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        scale: float = field(default=1.0, metadata={"help": "multiplies the loss"})

        def __post_init__(self):
            if self.scale <= 0:
                raise ValueError(f"scale must be > 0, got {self.scale!r}")

    def __call__(self, student_logits, teacher_logits, *, temperature=1.0, tp_group=None, vocab_size=None):
        tau = temperature.unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature
        log_q = vocab_parallel_log_softmax(student_logits.float() / tau, tp_group, vocab_size)
        log_p = vocab_parallel_log_softmax(teacher_logits.detach().float() / tau, tp_group, vocab_size)
        overlap = torch.exp(0.5 * (log_p + log_q)).sum(dim=-1)  # padded columns give exp(-inf) = 0
        return self.config.scale * (1.0 - all_reduce_sum(overlap, tp_group))


class TeacherConfident(TokenSelector):
    """Keep tokens where the teacher's top probability is at least ``threshold``."""

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        threshold: float = field(default=0.5, metadata={"help": "minimum teacher top-1 probability, in (0, 1]"})

        def __post_init__(self):
            if not 0.0 < self.threshold <= 1.0:
                raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")

    def select(self, ctx: TokenContext) -> Selection:
        log_p = vocab_parallel_log_softmax(ctx.teacher_logits.detach(), ctx.tp_group, ctx.vocab_size)
        top = all_reduce_max(log_p.amax(dim=-1), ctx.tp_group).exp()
        return Selection(keep=top >= self.config.threshold, normalize_by="kept", scores=top)


@hookimpl
def distill_register_objectives(register):
    register("squared_hellinger", SquaredHellinger)


@hookimpl
def distill_register_token_selectors(register):
    register("teacher_confident", TeacherConfident)
