"""Token selection and per-token temperatures (AdaKD's LATF and IDTS, AdaSPEC, fixed fractions).

Modules:
    scores:      vocab-parallel per-token difficulty scores (detached, TP-replicated).
    selectors:   TokenSelector parts: all, top_fraction, random_fraction, latf, adaspec.
    temperature: TemperaturePolicy parts: constant, schedule, idts.

The parts are registered by :mod:`distill_plugins.builtin.selectors` and
:mod:`distill_plugins.builtin.temperature`. See docs/selectors.md and
docs/temperature.md.
"""

from distill_plugins.selection.scores import SCORE_NAMES, ScoreName, compute_score
from distill_plugins.selection.selectors import LATF, AdaSPEC, AllTokens, RandomFraction, TopFraction
from distill_plugins.selection.temperature import IDTS, ConstantTemperature, ScheduledTemperature

__all__ = [
    "SCORE_NAMES",
    "AdaSPEC",
    "AllTokens",
    "ConstantTemperature",
    "IDTS",
    "LATF",
    "RandomFraction",
    "ScheduledTemperature",
    "ScoreName",
    "TopFraction",
    "compute_score",
]
