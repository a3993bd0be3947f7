"""Built-in objectives, registered through ``distill_register_objectives`` like any plugin's.

See docs/objectives.md for each objective's maths, parameters and recipe syntax.
"""

from __future__ import annotations

from distill_plugins.hookspecs import hookimpl
from distill_plugins.objectives import CSD, JSD, TVD, ForwardKL, LogitMSE, ReverseKL, SkewKL, SkewReverseKL
from distill_plugins.objectives.taid import TAID


@hookimpl
def distill_register_objectives(register):
    register("forward_kl", ForwardKL)
    register("reverse_kl", ReverseKL)
    register("jsd", JSD)
    register("tvd", TVD)
    register("skew_kl", SkewKL)
    register("skew_reverse_kl", SkewReverseKL)
    register("logit_mse", LogitMSE)
    register("csd", CSD)
    register("taid", TAID)
