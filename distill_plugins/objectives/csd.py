"""CSD: Concrete Score Distillation (Kim et al., ICLR 2026), in linear time over the vocabulary.

Math (per token; ``a = f_S / tau``, ``b = f_T / tau``, ``d = a - b``, weights
``w1``, ``w2`` each a probability vector over the real vocabulary, detached):

    L = 1/2 sum_y sum_x w1(y) w2(x) (d[x] - d[y])^2                (O(V^2) pair form)
      = 1/2 (E_w1[d^2] + E_w2[d^2]) - E_w1[d] E_w2[d]               (O(V), computed here)
    dL/da[x] = w2(x) (d[x] - E_w1[d]) + w1(x) (d[x] - E_w2[d])

Weights: ``U`` = 1/vocab_size on real columns; ``S`` = sg[softmax(a / weight_temperature)];
``T`` = sg[softmax(b)]. ``weight_temperature`` scales only the S weights (as in
the reference code's ``loss_temp``). The per-call ``temperature`` (from a
temperature policy) divides both logits before anything else, like every other
objective here; at the default 1 it changes nothing, and no tau**2 is applied
inside. The logged value is the true objective, not the reference code's
surrogate, and the gradient is the exact one (the reference's is half of it).

L is invariant to adding a per-token constant to either logit vector and is 0
when ``f_S = f_T + const``.

Non-finite inputs (the contract of every objective, docs/objectives.md): NaN,
``+inf`` or an all-``-inf`` row raise ``InputError``; a column that is ``-inf``
on both sides has ``d = 0``; a column that is ``-inf`` on one side only has an
infinite gap, and where w1 or w2 gives it positive weight (U always, S where the
student is finite, T where the teacher is finite) the pair form is ``+inf``, which
is the value returned (the moment form would give ``inf - inf = NaN``). A zero-weight
infinite column adds nothing (``0 * inf = 0``). CSD(S, S) with weight temperature 1 has exactly twice
the reverse-KL gradient (methods.md section 10).

Kernel: :mod:`distill_plugins.objectives.gap` (one pass, MAX ``[N, 4]`` and SUM
``[N, 3 x distinct weights]`` all-reduces; backward recomputes the weights from
two saved log-normalisers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from distill_plugins.interfaces import PartConfig
from distill_plugins.objectives.base import VocabParallelObjective
from distill_plugins.objectives.gap import GapSpec, weighted_gap_moments

__all__ = ["CSD"]

WEIGHTS = ("U", "S", "T")


def check_weight_name(key: str, value: object) -> None:
    """``value`` is one of the weight names U (uniform), S (student), T (teacher); ValueError naming ``key`` if not."""
    if value not in WEIGHTS:
        raise ValueError(f"{key}={value!r} is not one of {list(WEIGHTS)} (U uniform, S student, T teacher)")


def check_positive_temperature(key: str, value: object) -> None:
    """``value`` is a finite number > 0; ValueError naming ``key`` if not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key}={value!r} must be a finite number > 0")


class CSD(VocabParallelObjective):
    """Concrete Score Distillation with separable weights ``w(y, x) = w1(y) w2(x)``.

    Tensor contract: see :class:`~distill_plugins.objectives.base.VocabParallelObjective`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        w1: Literal["U", "S", "T"] = field(default="S", metadata={
            "help": "weight over the reference token y: U uniform, S student (detached), T teacher"})
        w2: Literal["U", "S", "T"] = field(default="S", metadata={
            "help": "weight over the switched-to token x: U uniform, S student (detached), T teacher"})
        weight_temperature: float = field(default=1.0, metadata={
            "help": "temperature of the S weights only: softmax(f_S / (tau * weight_temperature))"})

        def __post_init__(self):
            check_weight_name("w1", self.w1)
            check_weight_name("w2", self.w2)
            check_positive_temperature("weight_temperature", self.weight_temperature)

    def forward_kernel(self, student, teacher, inv_tau, info):
        cfg = self.config
        spec = GapSpec(cfg.w1, cfg.w2, s_temperature=cfg.weight_temperature, center=True, kind="csd")
        loss = weighted_gap_moments(student, teacher, inv_tau, info, spec)
        # Inputs are checked (no NaN, no +inf, no all--inf row), so a NaN here is the moment form's
        # inf - inf for an infinite gap with positive weight: the pair form's value is +inf.
        return torch.where(torch.isnan(loss), torch.full_like(loss, float("inf")), loss)
