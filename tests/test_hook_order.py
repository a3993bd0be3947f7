"""The order in which the host calls hook implementations, as docs/plugin_hooks.md states it.

Registration hooks and ``distill_validate_recipe`` are called one implementation
at a time in ``get_hookimpls()`` order (``trylast``, unmarked in load order,
``tryfirst``; wrappers not run); ``distill_on_step_end`` goes through pluggy's
caller (wrappers, ``tryfirst``, unmarked last-registered first, ``trylast``).
"""

from __future__ import annotations

import sys
import types

import pytest

from distill_plugins import hookimpl
from distill_plugins.manager import NO_ENTRY_POINTS_ENV, build_plugin_host

ORDER = [("p_plain", {}), ("p_first", {"tryfirst": True}), ("p_last", {"trylast": True}),
         ("p_wrap", {"wrapper": True}), ("p_plain2", {})]


def _plugin(name: str, calls: list[str], opts: dict) -> types.ModuleType:
    module = types.ModuleType(name)
    if opts.get("wrapper"):
        @hookimpl(**opts)
        def distill_register_objectives(register):
            calls.append(("register", name))
            return (yield)

        @hookimpl(**opts)
        def distill_validate_recipe(recipe):
            calls.append(("validate", name))
            return (yield)

        @hookimpl(**opts)
        def distill_on_step_end(step, metrics):
            calls.append(("step", name))
            return (yield)
    else:
        @hookimpl(**opts)
        def distill_register_objectives(register):
            calls.append(("register", name))

        @hookimpl(**opts)
        def distill_validate_recipe(recipe):
            calls.append(("validate", name))
            return []

        @hookimpl(**opts)
        def distill_on_step_end(step, metrics):
            calls.append(("step", name))
    module.distill_register_objectives = distill_register_objectives
    module.distill_validate_recipe = distill_validate_recipe
    module.distill_on_step_end = distill_on_step_end
    return module


@pytest.fixture
def calls(monkeypatch):
    monkeypatch.setenv(NO_ENTRY_POINTS_ENV, "1")
    log: list[tuple[str, str]] = []
    for name, opts in ORDER:
        monkeypatch.setitem(sys.modules, name, _plugin(name, log, opts))
    return log


def test_registration_and_validation_follow_get_hookimpls_and_skip_wrappers(calls):
    host = build_plugin_host([name for name, _ in ORDER])
    assert [n for kind, n in calls if kind == "register"] == ["p_last", "p_plain", "p_plain2", "p_first"]
    calls.clear()
    errors = host.validate_recipe({})
    assert [n for kind, n in calls if kind == "validate"] == ["p_last", "p_plain", "p_plain2", "p_first"]
    assert len(errors) == 1 and "p_wrap" in errors[0] and "generator" in errors[0]


def test_step_end_goes_through_pluggy_in_pluggys_order(calls):
    host = build_plugin_host([name for name, _ in ORDER])
    calls.clear()
    host.on_step_end(1, {"loss": 1.0})
    assert [n for _, n in calls] == ["p_wrap", "p_first", "p_plain2", "p_plain", "p_last"]
