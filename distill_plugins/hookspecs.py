"""Every hook distill_plugins calls, in one place.

Hooks are named ``distill_*`` and grouped by when they run. A plugin implements
any subset with ``@distill_plugins.hookimpl``; pluggy lets an implementation take
fewer arguments than its spec, so specs may gain arguments but never lose them.
Built-in parts are registered through these same hooks (see
``distill_plugins.builtin``). docs/plugin_hooks.md documents each hook.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import pluggy

PROJECT_NAME = "distill_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: ``register(name, part_class)``: adds a part under a name; raises PluginError on a duplicate.
Register = Callable[[str, type], None]


# ---------------------------------------------------------------------------
# Registration: called once, when the plugin manager is built.
# ---------------------------------------------------------------------------


@hookspec
def distill_register_objectives(register: Register) -> None:
    """Register distillation objectives (losses).

    Args:
        register: ``register(name, cls)`` where ``cls`` subclasses
            :class:`distill_plugins.Objective`.

    Returns:
        Nothing. Not firstresult: every plugin's implementation is called.
    """


@hookspec
def distill_register_token_selectors(register: Register) -> None:
    """Register token selectors.

    Args:
        register: ``register(name, cls)`` where ``cls`` subclasses
            :class:`distill_plugins.TokenSelector`.

    Returns:
        Nothing. Not firstresult: every plugin's implementation is called.
    """


@hookspec
def distill_register_temperature_policies(register: Register) -> None:
    """Register temperature policies.

    Args:
        register: ``register(name, cls)`` where ``cls`` subclasses
            :class:`distill_plugins.TemperaturePolicy`.

    Returns:
        Nothing. Not firstresult: every plugin's implementation is called.
    """


@hookspec
def distill_register_vocab_aligners(register: Register) -> None:
    """Register vocabulary aligners.

    Args:
        register: ``register(name, cls)`` where ``cls`` subclasses
            :class:`distill_plugins.VocabAligner`.

    Returns:
        Nothing. Not firstresult: every plugin's implementation is called.
    """


@hookspec
def distill_register_sequence_sources(register: Register) -> None:
    """Register sequence sources (where each step's responses come from: data, student, teacher).

    Args:
        register: ``register(name, cls)`` where ``cls`` subclasses
            :class:`distill_plugins.SequenceSource`.

    Returns:
        Nothing. Not firstresult: every plugin's implementation is called.
    """


# ---------------------------------------------------------------------------
# Validation: called by ``distill check`` and before every run.
# ---------------------------------------------------------------------------


@hookspec
def distill_validate_recipe(recipe: Mapping[str, Any]) -> list[str]:
    """Check a resolved recipe for problems this plugin knows about.

    Called only when the schema and every part's parameters passed their own
    checks, so no value here is unchecked.

    Args:
        recipe: the resolved recipe as a plain nested mapping (after
            ``extends:``, command-line overrides and defaults; this plugin's own
            copy). Part sections (``objective``, ``selector``, ``temperature``,
            ``aligner``, ``sequences``) are ``{"name": str, "params": {field:
            value}}`` with every field of the part's ``Config``, defaults filled
            in; ``aligner: auto`` is already resolved. E.g.
            ``recipe["objective"] == {"name": "csd", "params": {"w1": "U", "w2":
            "S", "weight_temperature": 1.0}}``.

    Returns:
        A list of error strings, empty when the plugin has no complaint (a bare
        string counts as one error). Not firstresult: the lists of all plugins
        are concatenated and reported together with the other checks' errors.
        An exception raised here becomes an error naming the plugin.
    """


# ---------------------------------------------------------------------------
# Observation: called during training.
# ---------------------------------------------------------------------------


@hookspec
def distill_on_step_end(step: int, metrics: Mapping[str, float]) -> None:
    """Observe the end of an optimizer step (logging, early stopping flags, ...).

    Args:
        step: optimizer steps completed (1 after the first step).
        metrics: the step's figures, already reduced across ranks (loss,
            kd_loss, ce_loss, tokens_per_second, kept_fraction, lr, ...).

    Returns:
        Nothing. Not firstresult. Called on the rank that logs (the last
        pipeline stage's first rank) only.
    """
