"""Built-in distillation objectives (vocab-parallel, fused, chunked).

Each class is an :class:`distill_plugins.Objective` registered by
:mod:`distill_plugins.builtin.objectives`; build them by name with
``distill_plugins.build_objective("csd", w1="U", w2="S")``. docs/objectives.md
documents the maths, parameters and the tensor contract.

Importing this package does not import the TAID objective (its own module).
"""

from distill_plugins.objectives.base import VocabParallelObjective
from distill_plugins.objectives.csd import CSD
from distill_plugins.objectives.kl import ForwardKL, ReverseKL
from distill_plugins.objectives.logit_mse import LogitMSE
from distill_plugins.objectives.mixture import JSD, TVD, SkewKL, SkewReverseKL

__all__ = [
    "CSD",
    "JSD",
    "TVD",
    "ForwardKL",
    "LogitMSE",
    "ReverseKL",
    "SkewKL",
    "SkewReverseKL",
    "VocabParallelObjective",
]
