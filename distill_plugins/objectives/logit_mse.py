"""Direct logit distillation (DLD): weighted mean squared error between the logits.

Math (per token; ``a = f_S / tau``, ``b = f_T / tau``, ``d = a - b``):

    L = 1/2 sum_v w_v d_v^2 = 1/2 E_w[d^2]          (methods.md section 1, Eq. 4)
    dL/da = w d

with detached weights ``w``: ``U`` = 1/vocab_size on real columns (the default:
half the mean squared logit gap over the real vocabulary), ``S`` =
sg[softmax(a / weight_temperature)] or ``T`` = sg[softmax(b / weight_temperature)].
The reference ablation code's ``sum_v w_v d_v^2 / 4`` is half of this value.

Unlike CSD, L is *not* invariant to shifting the student's logits by a constant:
it pins the absolute logit level to the teacher's. The per-call ``temperature``
divides both logits, so it scales L by ``1 / tau^2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from distill_plugins.interfaces import PartConfig
from distill_plugins.objectives.base import VocabParallelObjective
from distill_plugins.objectives.csd import check_positive_temperature, check_weight_name
from distill_plugins.objectives.gap import GapSpec, weighted_gap_moments

__all__ = ["LogitMSE"]


class LogitMSE(VocabParallelObjective):
    """Weighted logit MSE, ``1/2 sum_v w_v (f_S - f_T)_v^2`` (direct logit distillation).

    Tensor contract: see :class:`~distill_plugins.objectives.base.VocabParallelObjective`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(PartConfig):
        weight: Literal["U", "S", "T"] = field(default="U", metadata={
            "help": "per-column weight: U uniform (plain mean), S student softmax, T teacher softmax (detached)"})
        weight_temperature: float = field(default=1.0, metadata={
            "help": "temperature of the S or T weight softmax (ignored for U)"})

        def __post_init__(self):
            check_weight_name("weight", self.weight)
            check_positive_temperature("weight_temperature", self.weight_temperature)

    def forward_kernel(self, student, teacher, inv_tau, info):
        cfg = self.config
        spec = GapSpec(cfg.weight, cfg.weight, s_temperature=cfg.weight_temperature,
                       t_temperature=cfg.weight_temperature, center=False, kind="mse")
        return weighted_gap_moments(student, teacher, inv_tau, info, spec)
