"""Built-in token selectors, registered like any plugin's (see docs/selectors.md)."""

from __future__ import annotations

from distill_plugins.hookspecs import hookimpl
from distill_plugins.selection.selectors import LATF, AdaSPEC, AllTokens, RandomFraction, TopFraction


@hookimpl
def distill_register_token_selectors(register):
    register("all", AllTokens)
    register("top_fraction", TopFraction)
    register("random_fraction", RandomFraction)
    register("latf", LATF)
    register("adaspec", AdaSPEC)
