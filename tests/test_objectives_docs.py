"""The objective-writing example in docs/objectives.md runs and keeps the objective contract."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from distill_plugins.testing.contracts import check_objective_contract

DOC = Path(__file__).resolve().parents[1] / "docs" / "objectives.md"


def example_namespace(monkeypatch) -> dict:
    blocks = re.findall(r"```python\n(# doctest: objective-example\n.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/objectives.md should hold exactly one '# doctest: objective-example' block"
    module = types.ModuleType("objectives_doc_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(blocks[0], str(DOC), "exec"), module.__dict__)
    return module.__dict__


def test_documented_example_keeps_the_contract(monkeypatch):
    ns = example_namespace(monkeypatch)
    check_objective_contract(ns["CappedReverseKL"], distributed=False, cap=3.0)
    with pytest.raises(ValueError, match="cap=-1"):
        ns["CappedReverseKL"].Config(cap=-1)


def test_documented_example_registers(monkeypatch):
    ns = example_namespace(monkeypatch)
    seen = {}
    ns["distill_register_objectives"](lambda name, cls: seen.setdefault(name, cls))
    assert seen == {"capped_reverse_kl": ns["CappedReverseKL"]}


def test_recipe_snippets_name_registered_objectives():
    import distill_plugins

    names = set(distill_plugins.build_plugin_host().names("objective"))
    yaml = "\n".join(re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S))
    used = set(re.findall(r"objective: (?:\{name: )?(\w+)", yaml))
    assert used and used <= names, sorted(used - names)
